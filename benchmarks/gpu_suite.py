r"""The headline GPU figures in one command (`benchmarks/gpu_suite.sh` runs this).

  benchmarks/gpu_suite.sh                  # a GPU: under 8 minutes on one H100 / H200
  benchmarks/gpu_suite.sh --cpu            # the same jobs on tiny shapes (what the tests run)

Jobs, each its own process, each the project's own benchmark or command:
1. training, step alone: `roofline.py` for the model in bf16 at 256 px, batch 32: patches/s
   and MFU against the bf16 peak measured in the same run (a jitted 8192^2 matmul);
2. training, loader + step: `train_throughput.py` (the trainer's PatchStream feeding the jitted
   step, as trainer.train runs them) in bf16: patches/s, and its MFU from (1)'s FLOP and peak;
3. prediction: `launch/predict.py`, 3-plane soft vote of a 512^3 uint16 scan, zarr in and zarr
   out, bf16: voxels/s of the whole command and of the inference passes, peak device memory;
   run twice, the second with the first's compilation cache (reported as warm);
4. the MONAI peer on the same model, training and prediction jobs, when torch and monai are
   installed (`peers/compare.py`, numerics fixed to bf16 on both sides: no calibration runs).
A job that fails or runs out of its time is recorded as such and the suite goes on; every
job's time limit is cut to what is left of `--budget_s` (under 8 minutes on a GPU), and a job
that would start with less than 20 s left is skipped, so the command ends in time whatever
happens. Writes benchmarks/results/gpu_suite_<machine>.{json,md} (the jobs also write their own
result files there) and prints the table.

CPU mode (`--cpu`, or no accelerator) runs every job the same way on tiny shapes and, unless
`--model` is given, on a stand-in model: a classic U-Net of depth 2 and width 4 (`unet_tiny`,
known only to the jobs' processes), since merely initialising and compiling unet_resnet18 takes
about a minute on 2 CPU cores. Its numbers prove the pipeline, nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402

_CPU = flags.DEFINE_bool("cpu", False, "CPU mode: tiny shapes (default when JAX sees no "
                         "accelerator).")
_MODEL = flags.DEFINE_string("model", "unet_resnet18", "The model of every job (CPU mode: "
                             "a tiny stand-in unless given).")
_PEERS = flags.DEFINE_enum("peers", "auto", ["auto", "yes", "no"], "The MONAI comparison: auto "
                           "runs it when torch and monai import.")
_JOBS = flags.DEFINE_list("jobs", ["step", "loader", "predict", "peers"], "Jobs to run.")
_RESULTS = flags.DEFINE_string("results_dir", str(common.RESULTS), "Where result files go.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Scratch (scan, bundle, caches); default a "
                               "temporary directory, removed afterwards.")
_TAG = flags.DEFINE_string("tag", "", "Machine tag of the result files (default: detected).")
_BUDGET_S = flags.DEFINE_float("budget_s", 0, "Seconds for the whole suite (0: 470 on a GPU, "
                               "900 in CPU mode).")

# Shapes and counts by mode. GPU: the headline jobs sized to finish within ~8 minutes together.
GPU = {"patch": 256, "batch": 32, "dtype": "bfloat16", "matmul_n": 8192, "repeats": 5,
       "warmup": 2, "steps": 20, "windows": 3, "loader_scans": 2, "loader_shape": "64,512,512",
       "volume": (512, 512, 512), "predict_batch": 32, "budget_gb": 32.0, "peer_steps": 20,
       "timeouts": {"step": 150, "loader": 150, "predict": 180, "peers": 240}}
# CPU: the same jobs, shrunk; a tiny stand-in model (see the docstring). Phantom sides >= 32.
CPU = {"patch": 64, "batch": 2, "dtype": "bfloat16", "matmul_n": 256, "repeats": 2,
       "warmup": 1, "steps": 2, "windows": 1, "loader_scans": 1, "loader_shape": "32,64,64",
       "volume": (16, 48, 48), "predict_batch": 4, "budget_gb": 1.0, "peer_steps": 2,
       "timeouts": {"step": 300, "loader": 300, "predict": 300, "peers": 600}}


TINY = "unet_tiny"
TINY_KWARGS = {"depth": 2, "width": 4}
# Runs a benchmark script with the tiny stand-in registered under TINY in its process.
_WITH_TINY = ("import runpy, sys; from bonejax import models; "
              f"models._REGISTRY[{TINY!r}] = ('unet', 'UNet', {TINY_KWARGS!r}); "
              "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def accelerator() -> str | None:
  """The accelerator platform JAX sees, asked in a child process (this one must not take a
  GPU's memory while the jobs need it), or None."""
  probe = "import jax; print(jax.default_backend())"
  r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
  backend = r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else ""
  return None if backend in ("", "cpu") else backend


def peers_available() -> bool:
  r = subprocess.run([sys.executable, "-c", "import torch, monai"], capture_output=True,
                     timeout=300)
  return r.returncode == 0


_DEADLINE = [float("inf")]  # time.perf_counter() by which every job must have ended
_MIN_JOB_S = 20.0


def run_job(name: str, cmd: list[str], timeout: float, env: dict, log_dir: Path) -> dict:
  """Runs a job; its JSON result line (if it prints one: train_throughput.py writes only its
  result files), or why it failed."""
  t0 = time.perf_counter()
  left = _DEADLINE[0] - t0
  if left < _MIN_JOB_S:
    print(f"[gpu_suite] {name}: skipped, out of time", file=sys.stderr, flush=True)
    return {"ok": False, "skipped": True, "error": "out of time (--budget_s)"}
  timeout = min(timeout, left)
  shown = [c for c in cmd if not c.startswith("import runpy")]  # not the stand-in's bootstrap
  print(f"[gpu_suite] {name}: {' '.join(shown[1:])}", file=sys.stderr, flush=True)
  try:
    res = common.run_json(cmd, timeout=timeout, env=env, log=log_dir / f"{name}.log")
    res["ok"] = True
  except common.JobFailed as e:
    no_json = e.returncode == 0 and "no JSON" in str(e)
    res = {"ok": True} if no_json else {"ok": False, "error": str(e),
                                        "stderr_tail": e.stderr_tail[-1500:]}
  res["job_seconds"] = round(time.perf_counter() - t0, 1)
  print(f"[gpu_suite] {name}: {'ok' if res['ok'] else 'FAILED: ' + res['error']} "
        f"({res['job_seconds']} s)", file=sys.stderr, flush=True)
  return res


def read_json(path: Path) -> dict | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def prepare(work: Path, model: str, shape) -> tuple[Path, Path]:
  """A random-weight bundle of `model` and a smooth synthetic uint16 scan of `shape` (seconds
  even at 512^3, unlike a phantom)."""
  from benchmarks.synthetic import make_bundle, synthetic_scan
  from bonejax.data import store
  scan = work / "data" / "scan_000"
  if not store.is_scan(scan) or tuple(store.open_scan(scan).shape) != tuple(shape):
    synthetic_scan(scan, shape)
  bundle = work / "model"
  if not (bundle / "model.json").exists():
    if model == TINY:
      make_bundle(bundle, "unet", **TINY_KWARGS)
    else:
      make_bundle(bundle, model)
  return bundle, scan


def main(argv):
  del argv
  t_start = time.perf_counter()
  load_start = common.load_average()
  backend = None if _CPU.value else accelerator()
  cpu = backend is None
  cfg = CPU if cpu else GPU
  _DEADLINE[0] = t_start + (_BUDGET_S.value or (900.0 if cpu else 470.0))
  results = Path(_RESULTS.value)
  results.mkdir(parents=True, exist_ok=True)
  tmp = None
  if _WORKDIR.value:
    work = Path(_WORKDIR.value)
    work.mkdir(parents=True, exist_ok=True)
  else:
    tmp = tempfile.mkdtemp(prefix="bonejax-gpu-suite-")
    work = Path(tmp)
  p, b, dt = cfg["patch"], cfg["batch"], cfg["dtype"]
  model = TINY if cpu and not flags.FLAGS["model"].present else _MODEL.value
  # The benchmark scripts' interpreter: plain, or one that knows the stand-in.
  py = [sys.executable] + (["-c", _WITH_TINY] if model == TINY else [])
  # A compilation cache shared by the jobs (the second prediction is warm): the one already
  # configured in the environment, else one in the work directory.
  env = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR",
                                                     str(work / "jax-cache"))}
  if cpu:
    env["JAX_PLATFORMS"] = "cpu"
  if _TAG.value:
    env["BONEJAX_MACHINE"] = _TAG.value
  # CPU mode names its results after the CPU even on a machine with a GPU.
  tag = _TAG.value or (common.machine_tag(with_jax=False) if cpu else "")
  jobs: dict = {}
  try:
    if "step" in _JOBS.value:
      jobs["step"] = run_job("step", [
          *py, str(REPO / "benchmarks/roofline.py"), f"--models={model}", f"--patch={p}",
          f"--batch={b}", f"--dtype={dt}", f"--matmul_n={cfg['matmul_n']}",
          f"--repeats={cfg['repeats']}", f"--warmup={cfg['warmup']}", "--predict_model=",
          f"--results_dir={results}"] + ([f"--tag={tag}"] if tag else []),
          cfg["timeouts"]["step"], env, work / "logs")
    if "loader" in _JOBS.value:
      jobs["loader"] = run_job("loader", [
          *py, str(REPO / "benchmarks/train_throughput.py"), f"--model={model}", f"--patch={p}",
          f"--batch_size={b}", f"--dtypes={dt}", f"--steps={cfg['steps']}",
          f"--warmup={cfg['warmup']}", f"--repeats={cfg['windows']}",
          f"--scans={cfg['loader_scans']}", f"--shape={cfg['loader_shape']}",
          f"--out={results}"], cfg["timeouts"]["loader"],
          {**env, **({"BONEJAX_MACHINE": tag} if tag else {})}, work / "logs")
    scan = None
    if "predict" in _JOBS.value or "peers" in _JOBS.value:
      bundle, scan = prepare(work, model, cfg["volume"])
    if "predict" in _JOBS.value:
      cmd = [sys.executable, str(REPO / "launch/predict.py"), f"--model={bundle}",
             f"--input={scan}", f"--output={work / 'pred.zarr'}", "--planes=3", "--vote=soft",
             f"--dtype={dt}", f"--batch_size={cfg['predict_batch']}",
             f"--memory_budget_gb={cfg['budget_gb']}", "--overwrite"]
      cold = run_job("predict_cold", cmd, cfg["timeouts"]["predict"], env, work / "logs")
      warm = run_job("predict", cmd, cfg["timeouts"]["predict"], env, work / "logs")
      warm["cold"] = {k: cold.get(k) for k in ("ok", "error", "seconds", "voxels_per_second",
                                               "wall_seconds", "device_peak_mb")}
      jobs["predict"] = warm
    if "peers" in _JOBS.value:
      wanted = _PEERS.value == "yes" or (_PEERS.value == "auto" and peers_available())
      if not wanted:
        jobs["peers"] = {"ok": False, "skipped": True,
                         "error": "torch/monai not installed (pip install -e '.[peers]')"
                         if _PEERS.value == "auto" else "--peers=no"}
      else:
        vol = ",".join(map(str, cfg["volume"]))
        jobs["peers"] = run_job("peers", [
            # The peer exists for unet_resnetNN only: the real model even in CPU mode.
            sys.executable, str(REPO / "benchmarks/peers/compare.py"),
            f"--model={_MODEL.value}",
            f"--volume={vol}", f"--patch={p}", f"--batch={b}", "--repeats=1",
            f"--steps={cfg['peer_steps']}", f"--warmup={cfg['warmup']}", "--predict_runs=2",
            "--bonejax_variant=bf16", "--peer_variant=bf16", f"--data_dir={scan.parent}",
            f"--results_dir={results}", f"--timeout={cfg['timeouts']['peers']}"]
            + ([f"--tag={tag}"] if tag else []), cfg["timeouts"]["peers"] + 60, env,
            work / "logs")
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)
  return report(jobs, cfg, cpu, backend, model, results, tag, load_start,
                time.perf_counter() - t_start)


def report(jobs, cfg, cpu, backend, model, results: Path, tag, load_start, seconds) -> dict:
  """The headline table from the jobs' results."""
  info = common.machine(with_jax=not cpu)
  tag = tag or info["tag"]
  info["tag"] = tag
  p = cfg["patch"]
  rows: list[dict] = []

  def add(figure, value, job, note=""):
    rows.append({"figure": figure, "value": value, "job": job, "note": note})

  roof = read_json(results / f"roofline_{tag}.json") if jobs.get("step", {}).get("ok") else None
  row = next((r for r in (roof or {}).get("rows", []) if r.get("model") == model), None)
  peak = (roof or {}).get("peak", {}).get(cfg["dtype"], {}).get("tflops")
  gflop = row.get("gflop_fwd") if row else None
  if row:
    add("training step patches/s", row.get("train_patches_per_s"), "step")
    add("training step MFU", row.get("train_mfu"), "step",
        f"3 x {gflop:.3g} GFLOP fwd/patch against {peak:.3g} TFLOP/s measured")
  loader = (read_json(results / f"train_throughput_{tag}.json")
            if jobs.get("loader", {}).get("ok") else None)
  both = next((r for r in (loader or {}).get("rows", []) if r.get("part") == "loader+step"),
              None)
  alone = next((r for r in (loader or {}).get("rows", []) if r.get("part") == "loader"), None)
  if both:
    rate = both["patches_per_s"]
    add("training loader + step patches/s", rate, "loader")
    if gflop and peak:
      add("training loader + step MFU", rate * 3 * gflop / 1e3 / peak, "loader")
  if alone:
    add("loader alone patches/s", alone["patches_per_s"], "loader")
  pred = jobs.get("predict")
  if pred and pred.get("ok"):
    vol = "x".join(map(str, cfg["volume"]))
    add(f"prediction {vol} voxels/s (zarr in/out, warm)", pred.get("voxels_per_second"),
        "predict", f"{pred.get('seconds')} s, mode {pred.get('mode')}")
    voxels = cfg["volume"][0] * cfg["volume"][1] * cfg["volume"][2]
    add("prediction voxels/s, inference passes", voxels / max(pred["infer_seconds"], 1e-9),
        "predict")
    add("prediction cold seconds (compiles)", pred["cold"].get("seconds"), "predict")
    add("prediction peak device MiB", pred.get("device_peak_mb"), "predict",
        "" if pred.get("device_peak_mb") is not None else "not reported by this backend")
    if gflop and peak:
      useful = pred["voxels_per_second"] * 3 * gflop * 1e9 / p**2
      add("prediction MFU (useful FLOP)", useful / 1e12 / peak, "predict")
  peers = jobs.get("peers")
  summary = ((read_json(results / f"peers_{tag}.json") or {}).get("summary", {})
             if peers and peers.get("ok") else {})
  for job, metric, unit in (("train", "patches_per_second", "patches/s"),
                            ("predict", "voxels_per_second", "voxels/s")):
    if job in summary:
      side = summary[job]
      note = f"{_MODEL.value} vs MONAI FlexibleUNet, bf16; see peers_{tag}.md"
      add(f"peer {job}: bonejax {unit}", side["bonejax"].get(metric), "peers", note)
      add(f"peer {job}: MONAI {unit}", side["peer"].get(metric), "peers")
      add(f"peer {job}: bonejax / MONAI", side["ratio"].get(metric), "peers")
      if job == "predict":
        add("peer predict: peak device MiB bonejax / MONAI", side["ratio"].get("peak_device_mb"),
            "peers")
  for name, job in jobs.items():
    if not job.get("ok"):
      add(f"{name} job", "skipped" if job.get("skipped") else "failed", name,
          job.get("error", ""))

  mode = "CPU mode (tiny shapes: pipeline check only)" if cpu else f"{backend}"
  if model == TINY:
    mode += f"; {TINY} = unet {TINY_KWARGS}"
  load = (load_start, common.load_average())
  table = common.markdown_table(rows, ["figure", "value", "job", "note"])
  md = "\n".join([
      f"# GPU suite: {model}, {cfg['dtype']}, {p} px, batch {cfg['batch']} ({mode})", "",
      f"{common.machine_line(info)}; load average {load[0]} -> {load[1]}; "
      f"{seconds / 60:.1f} min in all.", "", table, "",
      "Jobs: step = benchmarks/roofline.py, loader = benchmarks/train_throughput.py, predict = "
      "launch/predict.py (3-plane soft vote, zarr in/out, second run warm), peers = "
      "benchmarks/peers/compare.py (bf16 on both sides). Their own result files are beside "
      "this one."])
  print(md)
  payload = {"mode": "cpu" if cpu else backend, "config": {k: v for k, v in cfg.items()},
             "model": model, "rows": rows, "jobs": jobs, "seconds": round(seconds, 1),
             "load_average": {"start": load[0], "end": load[1]}, "machine": info}
  paths = common.write_results("gpu_suite", payload, md, tag=tag, results_dir=results)
  return {"json": str(paths["json"]), "md": str(paths["md"]), "seconds": round(seconds, 1),
          "mode": payload["mode"], "failed": [n for n, j in jobs.items()
                                              if not j.get("ok") and not j.get("skipped")]}


if __name__ == "__main__":
  common.runner.run(main)
