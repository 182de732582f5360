r"""All bone indices of a trabecular-like volume (bonejax.evaluate.morphometry), timed by part.

    python benchmarks/morphometry.py                       # 256^3, 8 x 6.24 x 6.24 um voxels
    python benchmarks/morphometry.py --size=128 --block_voxels=262144

The volume: Gaussian-smoothed white noise (sigma 4 voxels) thresholded at its 75th percentile,
BV/TV 0.25: interconnected rods and plates with marrow spaces about twice as thick as the
trabeculae, as in trabecular bone. Goal (issue 27): all indices of 256^3 in < 60 s on 2 cores.
Each configuration runs once (one run is minutes): seconds per part, peak resident memory of
the process (after the volume was made), and the indices, so a change that moves a number
shows. The machine is shared with other agents: the load average is recorded beside the times.

Writes benchmarks/results/morphometry_<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
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
  ap.add_argument("--size", type=int, default=256)
  ap.add_argument("--voxel", default="8,6.24,6.24", help="Z,Y,X in um")
  ap.add_argument("--runs", nargs="*", default=["auto:16777216", "exact:16777216",
                                                  "auto:2097152"],
                  help="configurations MODE:MAX_BLOCK_VOXELS; MODE auto (levels for large "
                       "spheres where cheaper) or exact (every sphere painted, as BoneJ)")
  ap.add_argument("--threads", type=int, default=2)
  args = ap.parse_args()
  vs = tuple(float(v) for v in args.voxel.split(","))
  load0 = common.load_average()
  t = time.perf_counter()
  vol = phantom(args.size)
  made = time.perf_counter() - t
  base_mb = common.peak_rss_mb()
  rows, runs = [], []
  for spec in args.runs:
    mode, bv = spec.split(":")
    bv = int(bv)
    common.reset_peak_rss()
    parts: dict[str, float] = {}
    t = time.perf_counter()
    m = morphometry.measure(vol, voxel_size_um=vs, max_block_voxels=bv, threads=args.threads,
                            exact_radius_um=None if mode == "auto" else float("inf"),
                            timings=parts)
    total = time.perf_counter() - t
    peak = common.peak_rss_mb()
    runs.append({"mode": mode, "max_block_voxels": bv, "seconds": total, "parts_s": parts,
                 "peak_rss_mb": peak, "rss_before_mb": base_mb, "indices": m.table(),
                 "delta_chi": m.delta_chi})
    rows.append({"mode": mode, "block voxels": bv, "total s": total,
                 **{f"{k} s": v for k, v in parts.items()}, "peak RSS MiB": peak})
    print(f"{mode} max_block_voxels={bv}: {total:.1f} s, peak RSS {peak:.0f} MiB", flush=True)
  load1 = common.load_average()
  cols = list(rows[0])
  table = common.markdown_table(rows, cols)
  names = [f"{r['mode']} {r['max_block_voxels']}" for r in runs]
  idx = common.markdown_table(
      [{"index": k, **{n: r["indices"][k] for n, r in zip(names, runs)}}
       for k in runs[0]["indices"]], ["index"] + names)
  info = common.machine(with_jax=False)
  info["lscpu_model"] = lscpu_model()
  md = (f"# Bone morphometry, {args.size}^3, voxel {vs} um\n\n"
        f"`{' '.join(sys.argv)}`; phantom BV/TV {vol.mean():.3f} made in {made:.1f} s; "
        f"RSS before measuring {base_mb:.0f} MiB (the volume and Python).\n"
        f"Load average at start {load0}, at end {load1}: the 2 cores are shared with other "
        "agents, so the times are upper bounds of an idle machine's.\n\n"
        f"{table}\n\n{idx}\n\n{common.machine_line(info)} (lscpu: {info['lscpu_model']})\n")
  print(table)
  print(idx)
  paths = common.write_results("morphometry", {
      "size": args.size, "voxel_size_zyx_um": vs, "bv_tv_phantom": float(vol.mean()),
      "runs": runs, "load_average_start": load0, "load_average_end": load1, "machine": info},
      md, tag=info["tag"])
  print(f"wrote {paths['json']} and {paths['md']}")


if __name__ == "__main__":
  main()
