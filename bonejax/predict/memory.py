"""Memory planning: what a run keeps on the host, what one device call may use, and estimates.

Host: `memory_budget_gb` is split between the arrays kept for the whole run (volume,
accumulators, rotated volumes: `resident_bytes`), about two slabs of planes in flight
(`SLAB_FRACTION` each), tensorstore's chunk caches (`CACHE_FRACTION` each) and, on CPU, where
XLA's buffers are host memory too, the device's share (`DEVICE_FRACTION_CPU`). A run whose
resident arrays exceed `resident_limit` goes out of core.

Device: one compiled call may use `device_budget_bytes` on each device (its share of the call:
the engine's per-device batch); the engine shrinks batches or tiles planes until XLA's
(per-device) memory analysis of the compiled call fits. Where a backend has no memory
analysis, `peak_bytes` estimates the peak from the traced program instead: the live values of
its equations run one by one. XLA fuses (fewer temporaries) but also pads and keeps workspace,
so the two land close: on CPU, unet depth 4 width 16 at 128x128 batch 8 estimates 44 MB where
XLA says 36 MB; unet_resnet18 at 256x256 batch 4, 119 MB where XLA says 122 MB.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
import tensorstore as ts

from bonejax.predict import rotate
from bonejax.predict.planesets import PlaneSet

DEFAULT_BUDGET_GB = 4.0
SCRATCH_CHUNK = 32        # chunk edge of the out-of-core accumulators (shrunk for huge planes)
SLAB_FRACTION = 1 / 5     # of the host budget, per slab of planes (about two are in flight)
CACHE_FRACTION = 1 / 16   # of the host budget, per tensorstore chunk cache (input, scratch)
DEVICE_FRACTION_CPU = 1 / 4  # of the host budget for XLA's buffers when the device is the CPU
DEVICE_FRACTION_ACCELERATOR = 0.7  # of an accelerator's memory


# ---------------------------------------------------------------------------------------------
# Host.
# ---------------------------------------------------------------------------------------------


def resident_bytes(shape: Sequence[int], channels: int, itemsize: int, k: int,
                   sets: Sequence[PlaneSet], vote: str, per_set: bool = False,
                   volume_in_memory: bool = True, keep_probs: bool = False,
                   shared: bool = False) -> int:
  """Host bytes an in-memory run keeps for the whole run: the volume, the accumulators, the
  labels, a rotated volume and its probabilities, and (`keep_probs`) the mean probabilities
  handed back to the caller. `shared` (several processes): only the volume; everything else
  is in shared files."""
  v = math.prod(shape)
  total = v * channels * itemsize if volume_in_memory else 0
  if shared:
    return total
  total += v * k * 4 * (len(sets) if per_set else 1)
  total += v * k if vote == "majority" and not per_set else 0
  total += v  # the labels
  total += v * k * 4 if keep_probs else 0
  rot = 0
  for a in {ps.rot45 for ps in sets if ps.rot45 is not None}:
    rv = math.prod(rotate.Rotation(a, shape).rotated_shape)
    rot = max(rot, rv * (channels * itemsize + k * 4))
  return total + rot


def _on_cpu() -> bool:
  return jax.devices()[0].platform == "cpu"


def resident_limit(budget_bytes: int) -> int:
  """Host bytes in-memory arrays may take: the budget less two slabs in flight and, on CPU
  (where the device's buffers are host memory too), the device's share."""
  device = DEVICE_FRACTION_CPU if _on_cpu() else 0
  return int(budget_bytes * (1 - 2 * SLAB_FRACTION - device))


def cache_context(budget_bytes: int, fraction: float = CACHE_FRACTION) -> ts.Context:
  """A tensorstore context whose chunk cache takes `fraction` of the host budget (>= 4 MiB).

  Scratch arrays and outputs are rewritten from scratch on failure: no fsync per chunk.
  """
  limit = max(4 << 20, int(budget_bytes * fraction))
  return ts.Context({"cache_pool": {"total_bytes_limit": limit}, "file_io_sync": False})


_HEAP_TUNED = False


def limit_heap_growth() -> None:
  """Makes glibc return large blocks to the OS as soon as they are freed.

  Slabs of planes are allocated and freed by three threads (reader, main, writer); glibc's
  default raises its mmap threshold after the first free, so later slabs come from per-thread
  arenas that fragment and the resident size creeps upwards over a long run (measured on a
  512x256x256 scan, 0.3 GB budget: peak RSS 733 MB without, 551 MB with a fixed 1 MiB
  threshold, for a 228 MB runtime). Process-wide, harmless; a no-op without glibc.
  """
  global _HEAP_TUNED
  if _HEAP_TUNED:
    return
  _HEAP_TUNED = True
  try:
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(ctypes.c_int(-3), ctypes.c_int(1 << 20))  # M_MMAP_THRESHOLD
  except (OSError, AttributeError):
    pass


# ---------------------------------------------------------------------------------------------
# Device.
# ---------------------------------------------------------------------------------------------


def device_budget_bytes(device_memory_gb: float | None, memory_budget_gb: float,
                        devices: Sequence[Any] | None = None) -> int:
  """Memory one call may use on each of `devices` (default: this process's): given, else 70 %
  of an accelerator's, else (CPU devices share the host's memory) a quarter of the host budget
  split between them."""
  if device_memory_gb:
    return int(float(device_memory_gb) * 2**30)
  devices = list(devices) if devices else jax.local_devices()
  dev = devices[0]
  if dev.platform != "cpu":
    try:
      limit = (dev.memory_stats() or {}).get("bytes_limit")
    except Exception:  # pylint: disable=broad-except
      limit = None
    if limit:
      return int(DEVICE_FRACTION_ACCELERATOR * limit)
  return int(float(memory_budget_gb) * 2**30 * DEVICE_FRACTION_CPU / len(devices))


def xla_bytes(compiled: Any) -> int | None:
  """XLA's peak memory of one call of a compiled function (arguments + temporaries + outputs
  - aliased), or None where the backend does not report it."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # some backends raise
    return None
  if m is None:
    return None
  total = int(getattr(m, "temp_size_in_bytes", 0) + getattr(m, "argument_size_in_bytes", 0)
              + getattr(m, "output_size_in_bytes", 0) - getattr(m, "alias_size_in_bytes", 0))
  return total if total > 0 else None


def _nbytes(var: Any) -> int:
  aval = getattr(var, "aval", None)
  shape, dtype = getattr(aval, "shape", None), getattr(aval, "dtype", None)
  if shape is None or dtype is None:
    return 0  # tokens and the like
  try:
    return math.prod(shape) * np.dtype(dtype).itemsize
  except TypeError:  # extended dtypes (PRNG keys): small
    return 0


def _is_var(v: Any) -> bool:
  return hasattr(v, "aval") and not hasattr(v, "val")  # a Literal has .val


def _sub_jaxprs(params: dict) -> list:
  subs = []
  for value in params.values():
    for item in (value if isinstance(value, (list, tuple)) else (value,)):
      if hasattr(item, "jaxpr") and hasattr(item, "consts"):
        subs.append(item.jaxpr)  # ClosedJaxpr
      elif hasattr(item, "eqns"):
        subs.append(item)
  return subs


def peak_bytes(jaxpr: Any) -> int:
  """Peak bytes of live values when a jaxpr's equations run one by one in order.

  Inputs stay live throughout (the caller holds them); every other value is freed after its
  last use. A call, loop or branch adds its own peak over its inputs while it runs.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # a ClosedJaxpr
  eqns = list(jaxpr.eqns)
  last: dict = {}
  for i, e in enumerate(eqns):
    for v in e.invars:
      if _is_var(v):
        last[v] = i
  for v in jaxpr.outvars:
    if _is_var(v):
      last[v] = len(eqns)
  held = set(v for v in list(jaxpr.invars) + list(jaxpr.constvars))
  live = sum(_nbytes(v) for v in held)
  peak = live
  for i, e in enumerate(eqns):
    inner = 0
    for sub in _sub_jaxprs(e.params):
      inputs = sum(_nbytes(v) for v in list(sub.invars) + list(sub.constvars))
      inner = max(inner, peak_bytes(sub) - inputs)
    out = sum(_nbytes(v) for v in e.outvars)
    peak = max(peak, live + max(inner, out))  # a call's own peak includes its outputs
    live += out
    for v in e.outvars:
      if _is_var(v) and v not in last:  # never used
        live -= _nbytes(v)
    for v in set(v for v in e.invars if _is_var(v)):
      if last.get(v) == i and v not in held:
        live -= _nbytes(v)
  return peak


def device_peak_mb(devices: Sequence[Any]) -> float | None:
  """The highest peak memory in use on any of `devices` so far (MiB), where the backend
  reports it (GPU, TPU); None on CPU."""
  peaks = []
  for d in devices:
    try:
      peak = (d.memory_stats() or {}).get("peak_bytes_in_use")
    except Exception:  # pylint: disable=broad-except  # backends without memory stats
      peak = None
    if peak is not None:
      peaks.append(peak)
  return round(max(peaks) / 2**20, 1) if peaks else None
