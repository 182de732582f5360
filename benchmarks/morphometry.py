r"""All bone indices of a trabecular-like volume (bonejax.evaluate.morphometry), timed by part.

    python benchmarks/morphometry.py          # 256^3 whole; 128^3 whole and in 64^3 blocks
    python benchmarks/morphometry.py --runs exact:16777216:256 auto:16777216:256

The volume: Gaussian-smoothed white noise (sigma 4 voxels) thresholded at its 75th percentile,
BV/TV 0.25: interconnected rods and plates with marrow spaces about twice as thick as the
trabeculae, as in trabecular bone. Goal (issue 27): all indices of 256^3 in < 60 s on 2 cores.
Each configuration runs once (one run is minutes): seconds per part, the peak of the arrays
allocated during the run (tracemalloc) and the process's peak resident memory, and the
indices, so a change that moves a number shows. The machine is shared with other agents: the load average is recorded beside the times.

Writes benchmarks/results/morphometry_<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from benchmarks import common  # noqa: E402
from bonejax.evaluate import morphometry  # noqa: E402


def phantom(size: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  g = ndimage.gaussian_filter(rng.standard_normal((size,) * 3, dtype=np.float32), 4)
  return g > np.quantile(g, 0.75)


def lscpu_model() -> str | None:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  return next((line.split(":", 1)[1].strip() for line in out.splitlines()
               if line.lower().startswith("model name")), None)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--voxel", default="8,6.24,6.24", help="Z,Y,X in um")
  ap.add_argument("--runs", nargs="*", default=["exact:16777216:256", "exact:16777216:128",
                                                  "exact:262144:128"],
                  help="configurations MODE:MAX_BLOCK_VOXELS:SIZE; MODE exact (every sphere "
                       "painted, the default of measure()) or auto (radius levels for large "
                       "spheres where cheaper, an approximation)")
  ap.add_argument("--threads", type=int, default=2)
  args = ap.parse_args()
  vs = tuple(float(v) for v in args.voxel.split(","))
  load0 = common.load_average()
  rows, runs, volumes = [], [], {}
  for spec in args.runs:
    mode, bv, size = spec.split(":")
    bv, size = int(bv), int(size)
    if size not in volumes:
      volumes.clear()
      t = time.perf_counter()
      volumes[size] = phantom(size)
      made = time.perf_counter() - t
      print(f"phantom {size}^3: BV/TV {volumes[size].mean():.3f}, {made:.1f} s", flush=True)
    vol = volumes[size]
    common.reset_peak_rss()  # the high-water mark restarts at the current RSS
    base_mb = common.peak_rss_mb()
    parts: dict[str, float] = {}
    tracemalloc.start()  # numpy's arrays are traced: the working set, whatever the allocator keeps
    t = time.perf_counter()
    m = morphometry.measure(vol, voxel_size_um=vs, max_block_voxels=bv, threads=args.threads,
                            exact_radius_um=None if mode == "auto" else float("inf"),
                            timings=parts)
    total = time.perf_counter() - t
    traced = tracemalloc.get_traced_memory()[1] / 2 ** 20
    tracemalloc.stop()
    peak = common.peak_rss_mb()
    runs.append({"mode": mode, "size": size, "max_block_voxels": bv, "seconds": total,
                 "parts_s": parts, "peak_traced_mb": traced, "peak_rss_mb": peak, "rss_before_mb": base_mb,
                 "bv_tv_phantom": float(vol.mean()), "indices": m.table(),
                 "delta_chi": m.delta_chi, "load_average_after": common.load_average()})
    rows.append({"size": f"{size}^3", "mode": mode, "block voxels": bv, "total s": total,
                 **{f"{k} s": v for k, v in parts.items()}, "peak traced MiB": traced,
                 "peak RSS MiB": peak,
                 "RSS before MiB": base_mb})
    print(f"{size}^3 {mode} max_block_voxels={bv}: {total:.1f} s, peak RSS {peak:.0f} MiB",
          flush=True)
  load1 = common.load_average()
  cols = list(rows[0])
  table = common.markdown_table(rows, cols)
  names = [f"{r['size']}^3 {r['mode']} {r['max_block_voxels']}" for r in runs]
  idx = common.markdown_table(
      [{"index": k, **{n: r["indices"][k] for n, r in zip(names, runs)}}
       for k in runs[0]["indices"]], ["index"] + names)
  info = common.machine(with_jax=False)
  info["lscpu_model"] = lscpu_model()
  md = (f"# Bone morphometry, voxel {vs} um\n\n"
        f"`{' '.join(sys.argv)}`; peak traced: the largest total of the arrays allocated during "
        "the run (tracemalloc: the working set); RSS before: the volume and Python; peak RSS: "
        "the whole process during the run (the allocator keeps pages of earlier runs, so only "
        "the first run's RSS shows its working set).\n"
        f"Load average at start {load0}, at end {load1}: the 2 cores are shared with other "
        "agents, so the times are upper bounds of an idle machine's.\n\n"
        f"{table}\n\n{idx}\n\n{common.machine_line(info)} (lscpu: {info['lscpu_model']})\n")
  print(table)
  print(idx)
  paths = common.write_results("morphometry", {
      "voxel_size_zyx_um": vs, "runs": runs, "load_average_start": load0, "load_average_end": load1, "machine": info},
      md, tag=info["tag"])
  print(f"wrote {paths['json']} and {paths['md']}")


if __name__ == "__main__":
  main()
