"""Measuring: timings and their spread, peak memory, and XLA's own figures for a jitted call.

    times = time_calls(step, repeats=5, warmup=2, sync=jax_sync)
    print(median(times), spread(times)["rel_halfrange"])

jax is imported only by the functions that need it.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence


def median(values: Iterable[float]) -> float:
  values = [float(v) for v in values if v is not None]
  return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> dict[str, float]:
  """Median, min, max and the relative half-range (a crude noise figure) of repeated timings."""
  values = [float(v) for v in values if v is not None]
  if not values:
    return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
  med = statistics.median(values)
  return {"median": med, "min": min(values), "max": max(values), "n": len(values),
          "rel_halfrange": (max(values) - min(values)) / (2 * med) if med else float("nan")}


def time_calls(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1,
               sync: Callable[[Any], Any] | None = None) -> list[float]:
  """Seconds per call of `fn()` over `repeats` calls after `warmup` calls.

  `sync(result)` waits for asynchronous work (`jax.block_until_ready`,
  `torch.cuda.synchronize`); without it the result is returned as is.
  """
  sync = sync or (lambda r: r)
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t0)
  return times


def matmul_peak(n: int, repeats: int = 3) -> dict[str, Any]:
  """TFLOP/s of a jitted (n x n) @ (n x n) matmul in fp32 and in bf16, median of `repeats` calls.

  The fp32 one runs at JAX's default precision: on NVIDIA GPUs from Ampere on that is TF32
  (tensor cores, 10-bit mantissa inputs), which `precision` says.
  """
  import jax
  import jax.numpy as jnp
  out: dict[str, Any] = {"matmul_n": n}
  gpu = jax.default_backend() == "gpu"
  for name, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dt)
    b = jax.random.normal(kb, (n, n), dt)
    mm = jax.jit(lambda a, b: a @ b)
    times = time_calls(lambda: mm(a, b), repeats=repeats, warmup=2, sync=jax_sync)
    out[name] = {"tflops": 2 * n**3 / median(times) / 1e12, **spread(times),
                 "precision": ("tf32" if gpu else "fp32") if name == "float32" else "bf16"}
  return out


def jax_sync(x: Any) -> Any:
  import jax
  return jax.block_until_ready(x)


def peak_rss_mb() -> float:
  """Peak resident memory of this process in MiB (VmHWM; getrusage where /proc is absent)."""
  try:
    for line in Path("/proc/self/status").read_text().splitlines():
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  except OSError:
    pass
  # ru_maxrss is KiB on Linux, bytes on macOS.
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def reset_peak_rss() -> bool:
  """Resets VmHWM to the current RSS (Linux only), so a peak can be read for one phase."""
  try:
    Path("/proc/self/clear_refs").write_text("5")
    return True
  except OSError:
    return False


def jax_peak_device_mb() -> float | None:
  """Peak device memory of JAX's first device in MiB, where the backend reports it (GPU/TPU)."""
  import jax
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    return None
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20


def xla_flops(jitted, *args) -> float | None:
  """FLOP of one call of a jitted function from XLA's cost analysis (2 per multiply-add)."""
  try:
    cost = jitted.lower(*args).compile().cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan"))) if cost else None


def xla_memory_mb(jitted, *args) -> float | None:
  """XLA's estimate of one call's peak device memory (arguments + temporaries + outputs - aliased)
  in MiB, from the compiled executable's memory analysis; None where the backend has none."""
  try:
    m = jitted.lower(*args).compile().memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  total = (getattr(m, "argument_size_in_bytes", 0) + getattr(m, "temp_size_in_bytes", 0)
           + getattr(m, "output_size_in_bytes", 0) - getattr(m, "alias_size_in_bytes", 0))
  return total / 2**20
