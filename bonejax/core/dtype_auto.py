"""The compute dtype `auto` means: bfloat16 where the device computes it natively, else float32.

bf16 halves the memory traffic of every activation and, on hardware with bf16 units, doubles or
better the matrix throughput; where there are none it is emulated in float32 and only costs the
conversions. So `auto` is bfloat16 on a GPU or TPU, and on a CPU with AMX or AVX512-BF16
(`amx_bf16`, `avx512_bf16` in /proc/cpuinfo: the instructions XLA's dot emitter and oneDNN's
bf16 kernels use); float32 on any other CPU. (In bf16 the stem and the head stay float32:
`bonejax.predict.engine.with_compute_dtype`.)

BONEJAX_AUTO_DTYPE=float32 (or bfloat16, float16) pins what `auto` means on a machine: results
that must not move between machines, or a test suite whose references are float32.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

AUTO = "auto"
ENV = "BONEJAX_AUTO_DTYPE"
CHOICES = ("float32", "bfloat16", "float16")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
_ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")


@functools.lru_cache(maxsize=4)
def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
  """The first `flags` line of a /proc/cpuinfo (empty where there is none: not Linux, a VM
  that hides it)."""
  try:
    text = Path(cpuinfo).read_text(errors="replace")
  except OSError:
    return frozenset()
  for line in text.splitlines():
    key, _, value = line.partition(":")
    if key.strip() == "flags":
      return frozenset(value.split())
  return frozenset()


def cpu_has_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
  return any(f in cpu_flags(cpuinfo) for f in BF16_CPU_FLAGS)


def auto_dtype(platform: str | None = None, cpuinfo: str | Path = "/proc/cpuinfo") -> str:
  """'bfloat16' or 'float32' for `platform` (default: JAX's default backend), unless
  $BONEJAX_AUTO_DTYPE pins it."""
  pinned = os.environ.get(ENV, "").strip().lower()
  if pinned:
    if pinned not in CHOICES:
      from bonejax.core import errors
      raise errors.UserError(f"{ENV}={os.environ[ENV]!r} must be one of {', '.join(CHOICES)}")
    return pinned
  if platform is None:
    import jax
    platform = jax.default_backend()
  platform = platform.lower()
  if platform in _ACCELERATORS:
    return "bfloat16"
  if platform == "cpu" and cpu_has_bf16(cpuinfo):
    return "bfloat16"
  return "float32"


def resolve(name: str | None, platform: str | None = None,
            cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
  """`name` with `auto` replaced by this device's choice; anything else is returned as given."""
  if isinstance(name, str) and name.strip().lower() == AUTO:
    return auto_dtype(platform, cpuinfo)
  return name
