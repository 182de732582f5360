r"""All bone indices of a trabecular-like volume, timed by part: this tree's against a baseline.

bonejax.evaluate.morphometry of this tree and of a baseline commit, side by side in one run.

    python benchmarks/morphometry.py          # 256^3 whole; 128^3 whole and in 64^3 blocks
    python benchmarks/morphometry.py --runs exact:16777216:256 --baseline none

The volume: Gaussian-smoothed white noise (sigma 4 voxels) thresholded at its 75th percentile,
BV/TV 0.25: interconnected rods and plates with marrow spaces about twice as thick as the
trabeculae, as in trabecular bone. Goal (issue 27): all indices of 256^3 in < 60 s on 2 cores.

Each configuration runs once per code (one run is minutes), each in its own process: the
baseline (`git archive` of --baseline, default the commit before the run-painting speed-up)
then this tree, one after the other, so both see about the same load. Recorded: wall and CPU
seconds per part (CPU: this process's, all its threads; on a machine shared with other agents
the wall time is inflated by waiting for a core, the CPU time much less so), the peak of the
arrays allocated during the run (tracemalloc), the process's peak resident memory, and the
indices, so a change that moves a number shows. The load average is recorded beside the times.

Writes benchmarks/results/morphometry_<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = "ea5812f"  # the exact transform before painting by runs (163 s at 256^3, loaded)


def phantom(size: int, seed: int = 0, mode: str = "reflect"):
  """mode: scipy's boundary rule for the smoothing; "wrap" makes a tile whose faces join."""
  import numpy as np
  from scipy import ndimage
  rng = np.random.default_rng(seed)
  g = ndimage.gaussian_filter(rng.standard_normal((size,) * 3, dtype=np.float32), 4, mode=mode)
  return g > np.quantile(g, 0.75)


def _peak_rss_mb() -> float:
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) / 1024
  return float("nan")


def child(spec: str, vs: tuple, threads: int) -> dict:
  """One configuration in this process, with the bonejax first on sys.path (this tree's or the
  baseline's): wall and CPU seconds per part, memory, indices."""
  from bonejax.evaluate import morphometry
  from bonejax.evaluate.morphometry import indices
  mode, bv, size = spec.split(":")
  bv, size = int(bv), int(size)
  vol = phantom(size)
  cpu_parts: dict[str, float] = {}

  class Clock:  # indices._Clock with CPU time beside the wall time
    def __init__(self, into):
      self.into, self.t, self.c = into, time.perf_counter(), time.process_time()

    def __call__(self, name):
      now, cnow = time.perf_counter(), time.process_time()
      if self.into is not None:
        self.into[name] = self.into.get(name, 0.0) + now - self.t
      cpu_parts[name] = cpu_parts.get(name, 0.0) + cnow - self.c
      self.t, self.c = now, cnow

  indices._Clock = Clock
  base_mb = _peak_rss_mb()
  parts: dict[str, float] = {}
  tracemalloc.start()
  t, c = time.perf_counter(), time.process_time()
  m = morphometry.measure(vol, voxel_size_um=vs, max_block_voxels=bv, threads=threads,
                          exact_radius_um=None if mode == "auto" else float("inf"),
                          timings=parts)
  total, cpu = time.perf_counter() - t, time.process_time() - c
  traced = tracemalloc.get_traced_memory()[1] / 2 ** 20
  tracemalloc.stop()
  return {"mode": mode, "size": size, "max_block_voxels": bv, "seconds": total,
          "cpu_seconds": cpu, "parts_s": parts, "parts_cpu_s": cpu_parts,
          "peak_traced_mb": traced, "peak_rss_mb": _peak_rss_mb(), "rss_before_mb": base_mb,
          "bv_tv_phantom": float(vol.mean()), "indices": m.table(), "delta_chi": m.delta_chi,
          "load_average_after": list(os.getloadavg())}


def _baseline_tree(rev: str, into: str) -> str:
  """The baseline's bonejax package, extracted by git into `into`."""
  archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "bonejax"],
                           capture_output=True, check=True).stdout
  subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
  return into


def _run(code_dir: str, spec: str, args) -> dict:
  cmd = [sys.executable, str(Path(__file__).resolve()), "--child", spec, "--code", code_dir,
         "--voxel", args.voxel, "--threads", str(args.threads)]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    raise SystemExit(f"error: {' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--voxel", default="8,6.24,6.24", help="Z,Y,X in um")
  ap.add_argument("--runs", nargs="*", default=["exact:16777216:256", "exact:16777216:128",
                                                  "exact:262144:128"],
                  help="configurations MODE:MAX_BLOCK_VOXELS:SIZE; MODE exact (every sphere "
                       "painted, the default of measure()) or auto (radius levels for large "
                       "spheres where cheaper, an approximation)")
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--baseline", default=BASELINE,
                  help="git revision whose bonejax runs first for each configuration; none: "
                       "this tree only")
  ap.add_argument("--name", default="morphometry",
                  help="result file stem: benchmarks/results/NAME_<machine>.{json,md}")
  ap.add_argument("--child", help=argparse.SUPPRESS)
  ap.add_argument("--code", help=argparse.SUPPRESS)
  args = ap.parse_args()
  vs = tuple(float(v) for v in args.voxel.split(","))
  if args.child:
    sys.path.insert(0, args.code)
    print(json.dumps(child(args.child, vs, args.threads)))
    return

  sys.path.insert(0, str(REPO))
  from benchmarks import common
  rev = None if args.baseline == "none" else subprocess.run(
      ["git", "-C", str(REPO), "rev-parse", "--short", args.baseline], capture_output=True,
      text=True, check=True).stdout.strip()
  load0 = common.load_average()
  rows, runs = [], []
  with tempfile.TemporaryDirectory() as tmp:
    codes = ([(f"baseline {rev}", _baseline_tree(rev, tmp))] if rev else []) + \
        [("this tree", str(REPO))]
    for spec in args.runs:
      pair = {}
      for name, code_dir in codes:
        r = _run(code_dir, spec, args)
        r["code"] = name
        runs.append(r)
        pair[name] = r
        rows.append({"size": f"{r['size']}^3", "code": name, "block voxels": r["max_block_voxels"],
                     "wall s": r["seconds"], "CPU s": r["cpu_seconds"],
                     **{f"{k} s": v for k, v in r["parts_s"].items()},
                     **{f"{k} CPU s": v for k, v in r["parts_cpu_s"].items()},
                     "peak traced MiB": r["peak_traced_mb"], "peak RSS MiB": r["peak_rss_mb"]})
        print(f"{r['size']}^3 {spec} {name}: {r['seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s "
              f"CPU, peak RSS {r['peak_rss_mb']:.0f} MiB, load {r['load_average_after']}",
              flush=True)
      if rev:
        old, new = pair[f"baseline {rev}"], pair["this tree"]
        rows.append({"size": f"{new['size']}^3", "code": "baseline / this tree",
                     "block voxels": new["max_block_voxels"],
                     "wall s": old["seconds"] / new["seconds"],
                     "CPU s": old["cpu_seconds"] / new["cpu_seconds"],
                     **{f"{k} s": old["parts_s"][k] / max(v, 1e-9)
                        for k, v in new["parts_s"].items() if k in old["parts_s"]},
                     **{f"{k} CPU s": old["parts_cpu_s"][k] / max(v, 1e-9)
                        for k, v in new["parts_cpu_s"].items() if k in old["parts_cpu_s"]}})
  load1 = common.load_average()
  cols = []
  for row in rows:
    cols += [k for k in row if k not in cols]
  table = common.markdown_table(rows, cols)
  names = [f"{r['size']}^3 {r['max_block_voxels']} {r['code']}" for r in runs]
  idx = common.markdown_table(
      [{"index": k, **{n: r["indices"][k] for n, r in zip(names, runs)}}
       for k in runs[0]["indices"]], ["index"] + names)
  info = common.machine(with_jax=False)
  try:
    info["lscpu_model"] = next(
        (line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()
         if line.lower().startswith("model name")), None)
  except (OSError, subprocess.SubprocessError):
    info["lscpu_model"] = None
  md = (f"# Bone morphometry, voxel {vs} um\n\n"
        f"`{' '.join(sys.argv)}`: each configuration ran in its own process, the baseline "
        f"commit's code ({rev}) first, then this tree's; the ratio rows are baseline / this "
        "tree. CPU s: the process's CPU time (all threads); wall s: elapsed. Peak traced: the "
        "largest total of the arrays allocated during the run (tracemalloc: the working set); "
        "peak RSS: the whole process.\n"
        f"Load average at start {load0}, at end {load1}: the 2 cores are shared with other "
        "agents, so the wall times are upper bounds of an idle machine's (the CPU times are "
        "closer to them).\n\n"
        f"{table}\n\n{idx}\n\n{common.machine_line(info)} (lscpu: {info['lscpu_model']})\n")
  print(table)
  print(idx)
  paths = common.write_results(args.name, {
      "voxel_size_zyx_um": vs, "baseline": rev, "runs": runs, "load_average_start": load0,
      "load_average_end": load1, "machine": info}, md, tag=info["tag"])
  print(f"wrote {paths['json']} and {paths['md']}")


if __name__ == "__main__":
  main()
