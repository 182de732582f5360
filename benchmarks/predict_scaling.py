r"""Prediction on more devices and more processes: voxels/s of one volume, zarr in, zarr out.

  python benchmarks/predict_scaling.py                        # 2 CPU cores: 1, 2, 4 fake
                                                              # devices and 2 processes
  python benchmarks/predict_scaling.py --configs=1x1,1x2,1x4,1x8,2x4 --shape=512,512,512 \
      --model=unet_resnet18 --dtype=bfloat16 --batch_size=16 --budget_gb=32   # 8 GPUs

Each configuration `PxD` runs `launch/predict.py` as P processes (jax.distributed on this host)
with D devices each, on the same synthetic uint16 scan (a zarr v3 scan with stored statistics),
3-plane soft vote into a zarr output. On a CPU the D devices are fake (`JAX_NUM_CPU_DEVICES`):
they share the same cores, so the figures show the cost of sharding and of coordinating
processes, not a speed-up; on GPUs each process gets its own D GPUs (`CUDA_VISIBLE_DEVICES`).
One untimed run per configuration first fills a persistent compilation cache, so the timed runs
compile nothing; runs of the configurations alternate (round robin) so machine-load drift hits
all alike. Reported (medians of --repeats): the command's own voxels/s (whole run: bundle,
input, inference, votes, zarr writes) and the inference passes alone (its infer_seconds).

Prints a table and writes benchmarks/results/predict_scaling_<machine>.{json,md}.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.synthetic import make_bundle, synthetic_scan  # noqa: E402

_CONFIGS = flags.DEFINE_list("configs", ["1x1", "1x2", "1x4", "2x1"],
                             "PxD: P processes with D devices each.")
_SHAPE = flags.DEFINE_string("shape", "48,128,128", "Volume Z,Y,X.")
_MODEL = flags.DEFINE_string("model", "unet", "Model name (unet: classic, --depth/--width).")
_DEPTH = flags.DEFINE_integer("depth", 3, "Classic U-Net depth.")
_WIDTH = flags.DEFINE_integer("width", 8, "Classic U-Net width.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Planes per call and device.")
_BUDGET = flags.DEFINE_float("budget_gb", 4.0, "--memory_budget_gb of each process.")
_PLANES = flags.DEFINE_integer("planes", 3, "Plane sets (soft vote).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per configuration (median).")
_TIMEOUT = flags.DEFINE_integer("timeout", 1800, "Seconds one run may take.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Keep the scan, bundle and cache here "
                               "(default: a temporary directory).")
_TAG = flags.DEFINE_string("tag", "", "Machine tag of the result files (default: detected).")
_RESULTS = flags.DEFINE_string("results_dir", str(common.RESULTS), "Where result files go.")


def parse_config(text: str) -> tuple[int, int]:
  try:
    p, d = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise common.errors.UserError(f"--configs: {text!r} is not PxD (e.g. 2x4)") from None
  if p < 1 or d < 1:
    raise common.errors.UserError(f"--configs: {text!r} needs at least 1 process and 1 device")
  return p, d


def count_gpus() -> int:
  """Accelerators JAX sees, asked in a child process: this one must not hold them (JAX takes
  most of a GPU's memory when it starts) while the runs need them."""
  probe = ("import jax; print(jax.local_device_count() if jax.default_backend() != 'cpu' "
           "else 0)")
  r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
  return int(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else 0


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_config(processes: int, devices: int, work: Path, gpus: int) -> dict:
  """One prediction as `processes` processes of `devices` devices; process 0's result."""
  out = work / f"pred_{processes}x{devices}.zarr"
  cmd = [sys.executable, str(REPO / "launch/predict.py"), f"--model={work / 'model'}",
         f"--input={work / 'scan'}", f"--output={out}", f"--planes={_PLANES.value}",
         "--vote=soft", f"--dtype={_DTYPE.value}", f"--batch_size={_BATCH.value}",
         f"--memory_budget_gb={_BUDGET.value}", f"--devices={devices}", "--overwrite"]
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_COMPILATION_CACHE_DIR=str(work / "cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  if not gpus:
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
  if processes > 1:
    cmd += [f"--coordinator_address=127.0.0.1:{_free_port()}", f"--num_processes={processes}"]
  procs = []
  t0 = time.perf_counter()
  for i in range(processes):
    penv = dict(env)
    if gpus:
      penv["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in range(i * devices,
                                                                    (i + 1) * devices))
    extra = [f"--process_id={i}"] if processes > 1 else []
    procs.append(subprocess.Popen(cmd + extra, cwd=REPO, env=penv, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  try:
    outs = [p.communicate(timeout=_TIMEOUT.value) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  wall = time.perf_counter() - t0
  for p, (_, err) in zip(procs, outs):
    if p.returncode != 0:
      lines = [line for line in err.strip().splitlines() if line.strip()] or ["no output"]
      raise common.JobFailed(lines[-1], p.returncode, err[-2000:])
  res = common.last_json_line(outs[0][0])
  if res is None:
    raise common.JobFailed("no JSON result line", 0, outs[0][1][-2000:])
  res["wall_seconds"] = wall
  return res


def main(argv):
  del argv
  configs = [parse_config(c) for c in _CONFIGS.value]
  shape = common.errors.parse_ints(_SHAPE.value, 3, "shape")
  load_start = common.load_average()
  gpus = count_gpus()
  for p, d in configs:
    if gpus and p * d > gpus:
      raise common.errors.UserError(f"--configs: {p}x{d} needs {p * d} GPUs, this host has {gpus}")
  tmp = None
  if _WORKDIR.value:
    work = Path(_WORKDIR.value)
    work.mkdir(parents=True, exist_ok=True)
  else:
    tmp = tempfile.mkdtemp(prefix="bonejax-scaling-")
    work = Path(tmp)
  try:
    from bonejax.data import store
    if not store.is_scan(work / "scan") or tuple(store.open_scan(work / "scan").shape) != shape:
      synthetic_scan(work / "scan", shape)
    if not (work / "model" / "model.json").exists():
      kwargs = {"depth": _DEPTH.value, "width": _WIDTH.value} if _MODEL.value == "unet" else {}
      make_bundle(work / "model", _MODEL.value, **kwargs)
    runs: dict = {c: [] for c in configs}
    cold: dict = {}
    for c in configs:  # untimed: fills the compilation cache
      cold[c] = run_config(*c, work, gpus)["wall_seconds"]
      print(f"{c[0]}x{c[1]} cold: {cold[c]:.1f} s", file=sys.stderr, flush=True)
    for r in range(_REPEATS.value):
      for c in configs:
        res = run_config(*c, work, gpus)
        runs[c].append(res)
        print(f"run {r + 1}/{_REPEATS.value} {c[0]}x{c[1]}: {res['voxels_per_second']:,.0f} "
              f"voxels/s ({res['infer_seconds']:.2f} s inference)", file=sys.stderr, flush=True)
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)

  voxels = math.prod(shape)
  base = None
  rows = []
  for (p, d), rs in runs.items():
    infer = common.median([voxels / r["infer_seconds"] for r in rs])
    row = {"config": f"{p}x{d}", "processes": p, "devices_per_process": d,
           "devices": rs[0]["devices"], "voxels_per_s": common.median(
               [r["voxels_per_second"] for r in rs]),
           "infer_voxels_per_s": infer, "seconds": common.median([r["seconds"] for r in rs]),
           "wall_s": common.median([r["wall_seconds"] for r in rs]), "cold_wall_s": cold[(p, d)],
           "device_peak_mb": rs[0].get("device_peak_mb"),
           "runs": [{k: r.get(k) for k in ("seconds", "voxels_per_second", "infer_seconds",
                                           "wall_seconds", "mode", "plans")} for r in rs]}
    base = base or row
    row["vs_first"] = row["voxels_per_s"] / base["voxels_per_s"]
    rows.append(row)

  info = common.machine()
  tag = _TAG.value or info["tag"]
  info["tag"] = tag
  load = (load_start, common.load_average())
  cols = ["config", "devices", "voxels_per_s", "infer_voxels_per_s", "seconds", "vs_first",
          "device_peak_mb"]
  heads = ["processes x devices", "devices", "voxels/s (command)", "voxels/s (inference)",
           "seconds", f"vs {rows[0]['config']}", "peak device MiB"]
  table = common.markdown_table(rows, cols, heads)
  md = "\n".join([
      f"# Prediction scaling: {_MODEL.value}, {_PLANES.value}-plane soft vote, "
      f"{'x'.join(map(str, shape))} uint16 scan, zarr in and out", "",
      f"{common.machine_line(info)}; load average {load[0]} -> {load[1]}.", "",
      table, "",
      f"Medians of {_REPEATS.value} runs per configuration (alternating), after one untimed run "
      f"each that filled the compilation cache. {_DTYPE.value}, {_BATCH.value} planes per call "
      f"and device, --memory_budget_gb={_BUDGET.value}. voxels/s (command) = the volume over "
      "predict.py's own seconds (bundle, input, inference, votes, writes; not the interpreter "
      "start); (inference) = over its inference passes alone."
      + ("" if gpus else " CPU devices here are fake (JAX_NUM_CPU_DEVICES): they share the same "
         "cores, so this measures the overhead of sharding and of coordinating processes, not a "
         "speed-up.")])
  print(md)
  payload = {"config": {"shape": list(shape), "model": _MODEL.value, "depth": _DEPTH.value,
                        "width": _WIDTH.value, "dtype": _DTYPE.value, "batch_size": _BATCH.value,
                        "budget_gb": _BUDGET.value, "planes": _PLANES.value,
                        "repeats": _REPEATS.value},
             "rows": rows, "load_average": {"start": load[0], "end": load[1]}, "machine": info}
  paths = common.write_results("predict_scaling", payload, md, tag=tag,
                               results_dir=_RESULTS.value)
  print(f"wrote {paths['json']} and {paths['md']}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
