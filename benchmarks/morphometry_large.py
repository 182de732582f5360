r"""All bone indices of a 1024^3 volume in bounded memory (issue 27's large-volume goal).

    python benchmarks/morphometry_large.py                 # 1024^3 = a 256^3 tile repeated 4x4x4
    python benchmarks/morphometry_large.py --tile=64 --reps=2   # a smoke run (seconds)

The volume is never held whole: it is a read-only view that repeats one periodic tile (the
benchmarks/morphometry.py phantom, Gaussian-smoothed noise thresholded at its 75th percentile,
smoothed with wrap-around so the tile's faces join seamlessly) and hands out the blocks that
`bonejax.evaluate.morphometry.measure` asks for, as a zarr or HDF5 dataset would. So the
process's peak resident memory is the working set of the block-wise algorithms plus one tile
(16 MiB as bool at 256^3), whatever the volume's size: the figure this benchmark records,
beside the same indices measured on the tile alone (in the same process, first), which the
large volume must reproduce up to the tile's boundary effects (BV/TV exactly; the rest close).

Writes benchmarks/results/morphometry_large_<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXTENSIVE = ("TV", "BV", "BS")  # amounts that grow with the volume (the rest are ratios)


class TiledVolume:
  """A (Z, Y, X) read-only volume that repeats `tile` reps times along each axis, computed per
  block on request (basic slices only, as the morphometry block readers ask)."""

  def __init__(self, tile, reps: int):
    self.tile, self.reps = tile, reps
    self.shape = tuple(n * reps for n in tile.shape)
    self.dtype = tile.dtype
    self.ndim = 3

  def __getitem__(self, key):
    import numpy as np
    if not isinstance(key, tuple):
      key = (key,)
    key = key + (slice(None),) * (3 - len(key))
    index = []
    for k, n, t in zip(key, self.shape, self.tile.shape):
      if not isinstance(k, slice):
        raise TypeError(f"TiledVolume takes slices, got {k!r}")
      index.append(np.arange(*k.indices(n)) % t)
    return self.tile[np.ix_(*index)]


def child(tile_side: int, reps: int, vs: tuple, max_block_voxels: int, threads: int) -> dict:
  sys.path.insert(0, str(REPO))
  from benchmarks.morphometry import _peak_rss_mb, phantom
  from bonejax.evaluate import morphometry
  tile = phantom(tile_side, mode="wrap")
  out = {"tile": tile_side, "reps": reps, "max_block_voxels": max_block_voxels}
  for name, vol in (("tile", tile), ("large", TiledVolume(tile, reps))):
    parts: dict[str, float] = {}
    t, c = time.perf_counter(), time.process_time()
    m = morphometry.measure(vol, voxel_size_um=vs, max_block_voxels=max_block_voxels,
                            threads=threads, timings=parts)
    out[name] = {"shape": list(vol.shape), "seconds": time.perf_counter() - t,
                 "cpu_seconds": time.process_time() - c, "parts_s": parts,
                 "peak_rss_mb_after": _peak_rss_mb(), "indices": m.table(),
                 "load_average_after": list(os.getloadavg())}
    print(f"{name} {vol.shape}: {out[name]['seconds']:.1f} s wall, peak RSS "
          f"{out[name]['peak_rss_mb_after']:.0f} MiB", file=sys.stderr, flush=True)
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tile", type=int, default=256, help="side of the repeated tile, voxels")
  ap.add_argument("--reps", type=int, default=4, help="repeats per axis (volume side = tile x reps)")
  ap.add_argument("--voxel", default="8,6.24,6.24", help="Z,Y,X in um")
  ap.add_argument("--max_block_voxels", type=int, default=2 ** 24)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--results_dir", default=None)
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args()
  vs = tuple(float(v) for v in args.voxel.split(","))
  if args.child:
    print(json.dumps(child(args.tile, args.reps, vs, args.max_block_voxels, args.threads)))
    return

  sys.path.insert(0, str(REPO))
  from benchmarks import common
  load0 = common.load_average()
  cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--tile", str(args.tile),
         "--reps", str(args.reps), "--voxel", args.voxel, "--max_block_voxels",
         str(args.max_block_voxels), "--threads", str(args.threads)]
  t = time.perf_counter()
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
  if proc.returncode != 0:
    raise SystemExit(f"error: the measuring process failed (exit {proc.returncode})")
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  wall = time.perf_counter() - t
  load1 = common.load_average()
  tile, large = r["tile"], r["large"]
  side = args.tile * args.reps
  rows = [{"volume": f"{'x'.join(map(str, x['shape']))}", "voxels": float(
      x["shape"][0] * x["shape"][1] * x["shape"][2]), "wall s": x["seconds"],
      "CPU s": x["cpu_seconds"], "peak RSS MiB (process, so far)": x["peak_rss_mb_after"],
      **{f"{k} s": v for k, v in x["parts_s"].items()}} for x in (tile, large)]
  cols = []
  for row in rows:
    cols += [k for k in row if k not in cols]
  idx_rows = []
  for k, a in tile["indices"].items():
    b = large["indices"].get(k)
    # Extensive amounts (TV, BV, BS) compared per tile: the large volume holds reps^3 tiles.
    per_tile = b / args.reps ** 3 if k in EXTENSIVE and b is not None else b
    rel = (per_tile - a) / abs(a) if a not in (None, 0) and b is not None else None
    idx_rows.append({"index": k, f"{args.tile}^3 tile": a, f"{side}^3 (tile x {args.reps}^3)": b,
                     "large (TV, BV, BS per tile)": per_tile,
                     "relative difference": rel})
  info = common.machine(with_jax=False)
  md = (f"# Bone morphometry of a {side}^3 volume in bounded memory, voxel {vs} um\n\n"
        f"`python benchmarks/morphometry_large.py {' '.join(sys.argv[1:])}`: one process measures "
        f"the {args.tile}^3 periodic tile, then the {side}^3 volume that repeats it "
        f"{args.reps}x{args.reps}x{args.reps} (read block by block, never held whole; blocks of "
        f"at most {args.max_block_voxels:,} voxels, {args.threads} threads). Peak RSS is the "
        "process's high-water mark after each measurement (the tile's run comes first, so the "
        "large run's figure bounds both). Load average at start "
        f"{load0}, at end {load1}.\n\n"
        f"{common.markdown_table(rows, cols)}\n\n"
        "Indices of the tile and of the repeated volume (equal up to the tile's own boundary "
        "effects: the tile is measured as a volume with faces, the large volume has 1/"
        f"{args.reps} as much face per voxel):\n\n"
        f"{common.markdown_table(idx_rows, list(idx_rows[0]))}\n\n"
        f"{common.machine_line(info)}\n")
  print(md)
  paths = common.write_results("morphometry_large", {
      "voxel_size_zyx_um": vs, "wall_seconds_total": wall, "load_average_start": load0,
      "load_average_end": load1, "machine": info, **r}, md, tag=info["tag"],
      **({"results_dir": args.results_dir} if args.results_dir else {}))
  print(f"wrote {paths['json']} and {paths['md']}")


if __name__ == "__main__":
  main()
