"""The machine a benchmark ran on: CPU, cores, memory, accelerators, library versions, a tag.

`machine()` is the record every result file carries; `machine_tag()` the short name in result
file names (`cpu-2c`, `nvidia-h100-80gb-hbm3`; override with BONEJAX_MACHINE). Only
`accelerators()` (and `machine(with_jax=True)`) import jax.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        flags = line.split(":", 1)[1].split()
        return sorted(f for f in flags if re.match(r"(avx512_bf16|amx|avx512f$|avx2$|fma$)", f))
  except OSError:
    pass
  return []


def usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _mem_total_gb() -> float | None:
  try:
    for line in Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemTotal"):
        return round(int(line.split()[1]) / 2**20, 1)
  except OSError:
    pass
  return None


def load_average() -> list[float] | None:
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return None


def _version(module: str) -> str | None:
  """Version of an installed distribution without importing it (torch import costs seconds)."""
  from importlib import metadata
  try:
    return metadata.version(module)
  except metadata.PackageNotFoundError:
    return None


def accelerators() -> list[dict[str, Any]]:
  """JAX's devices (imports jax): platform, kind and count."""
  import jax
  kinds: dict[tuple[str, str], int] = {}
  for d in jax.devices():
    key = (d.platform, getattr(d, "device_kind", d.platform))
    kinds[key] = kinds.get(key, 0) + 1
  return [{"platform": p, "kind": k, "count": n} for (p, k), n in kinds.items()]


def machine(with_jax: bool = True) -> dict[str, Any]:
  """A description of this machine for result files."""
  info: dict[str, Any] = {
      "tag": machine_tag(with_jax),
      "hostname": platform.node(),
      "cpu": _cpu_model(),
      "cpu_flags": _cpu_flags(),
      "cores": usable_cores(),
      "memory_gb": _mem_total_gb(),
      "python": platform.python_version(),
      "os": f"{platform.system()} {platform.release()}",
      "versions": {m: _version(m) for m in ("jax", "jaxlib", "flax", "optax", "numpy", "torch",
                                            "monai") if _version(m)},
  }
  if with_jax:
    info["accelerators"] = accelerators()
  return info


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_tag(with_jax: bool = True,
                accelerator_list: list[dict[str, Any]] | None = None) -> str:
  """Short file-name tag: the accelerator kind (`nvidia-h100-80gb-hbm3`) or `cpu-<cores>c`.

  `accelerator_list` (as `accelerators()` returns it, e.g. from a child process) is used
  instead of asking jax here."""
  if os.environ.get("BONEJAX_MACHINE"):
    return _slug(os.environ["BONEJAX_MACHINE"])
  if accelerator_list is None and with_jax:
    accelerator_list = accelerators()
  accs = [a for a in accelerator_list or [] if a["platform"] != "cpu"]
  if accs:
    a = accs[0]
    return _slug(a["kind"]) + (f"-x{a['count']}" if a["count"] > 1 else "")
  return f"cpu-{usable_cores()}c"


# Dense (no sparsity) peak TFLOP/s per device from NVIDIA's datasheets, whose tensor-core
# figures are quoted with 2:4 sparsity (halved here). Matched on JAX's device_kind, most specific
# first: "NVIDIA H100 80GB HBM3" is the SXM5 part; "NVIDIA H200" the SXM part.
DATASHEET_PEAKS: tuple[tuple[tuple[str, ...], str, dict[str, float]], ...] = (
    (("h200", "nvl"), "H200 NVL", {"bfloat16": 835.5, "tf32": 417.5}),
    (("h200",), "H200 SXM", {"bfloat16": 989.4, "tf32": 494.7}),
    (("h100", "nvl"), "H100 NVL", {"bfloat16": 835.5, "tf32": 417.5}),
    (("h100", "pcie"), "H100 PCIe", {"bfloat16": 756.0, "tf32": 378.0}),
    (("h100",), "H100 SXM", {"bfloat16": 989.4, "tf32": 494.7}),
    (("a100",), "A100", {"bfloat16": 312.0, "tf32": 156.0}),
)


def datasheet_peak(device_kind: str | None) -> dict[str, Any] | None:
  """{"name", "bfloat16", "tf32"} dense TFLOP/s of `device_kind` from its datasheet, or None
  for a device not in DATASHEET_PEAKS (a CPU, an unknown GPU)."""
  kind = (device_kind or "").lower()
  for keys, name, peaks in DATASHEET_PEAKS:
    if all(k in kind for k in keys):
      return {"name": name, **peaks}
  return None
