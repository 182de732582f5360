r"""The headline GPU figures in one command (`benchmarks/gpu_suite.sh` runs this).

  benchmarks/gpu_suite.sh                  # a GPU: every job within --budget_s (570 s)
  benchmarks/gpu_suite.sh --cpu            # the same jobs on tiny shapes (what the tests run)

This process never touches an accelerator: JAX is imported only by the jobs, each its own
process, so a job that preallocates a GPU's memory frees it when it ends. Jobs, in order:
0. probe: which accelerator JAX sees (a child with preallocation off);
1. prepare: a random-weight bundle and a smooth synthetic uint16 scan, made by a child on the CPU
   (JAX_PLATFORMS=cpu);
2. loader: `train_throughput.py` in bf16 with both samplers, the trainer's default (device: the
   scans in device memory) and the host patch stream. "step alone" and "loader + step" are one
   jitted step (`common.trainer_train_step`: augmentation on, CE + Dice, Adam); the only
   difference between them is where the batch comes from;
3. predict: `launch/predict.py`, 3-plane soft vote of a 512^3 scan, zarr in, zarr out, twice
   (the second run with the first's compilation cache: "warm");
4. profile: a child of this script: the measured matmul peak (bf16, and fp32 which runs as TF32
   on NVIDIA tensor cores), the forward FLOP per patch (2 x the multiply-adds of every
   convolution and matrix product, counted from the jaxpr, zero-padding taps included), and a
   `jax.profiler` trace of a few steps of that training step and of prediction batches, written
   beside the results (gpu_suite_<machine>_trace/, for TensorBoard / XProf / Perfetto); after
   predict, so that the cold prediction is cold and this job's compilations come from the cache;
5. peers: `peers/compare.py`, the MONAI peer on the same model, bf16 on both sides, when torch
   and monai are installed (a 256 x 512 x 512 scan so that its four processes fit the budget).
MFU is shown against the device's datasheet peak (989.4 TFLOP/s dense bf16 on an H100 SXM; H100
PCIe / NVL and H200 have their own, see common.machine.DATASHEET_PEAKS) and against the peak
measured in the same run, side by side; training FLOP = 3 x forward.

Every job has its own time limit, and the limits add up to `--budget_s` (570 s on a GPU: the
suite ends within 10 minutes whatever happens); a job also never runs past what is left of the
budget, and one that would start with under 10 s left is skipped. A job that fails or times out
is recorded as such and the suite goes on. Writes benchmarks/results/gpu_suite_<machine>.{json,
md} (the jobs write their own result files beside it) and prints the table, every row always
present (a job that did not run shows "-" and says why).

CPU mode (`--cpu`, or no accelerator) runs every job the same way on tiny shapes and, unless
`--model` is given, on a stand-in model: a classic U-Net of depth 2 and width 4 (`unet_tiny`,
known only to the jobs' processes), since merely initialising and compiling unet_resnet18 takes
about a minute on 2 CPU cores. Its numbers prove the pipeline, nothing else; it fails (exit 1,
after writing its results) unless every row has its figure (the datasheet peak, device memory and, without torch + monai,
the peer rows excepted: a CPU has no datasheet peak nor device memory counter).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402

_CPU = flags.DEFINE_bool("cpu", False, "CPU mode: tiny shapes (default when JAX sees no "
                         "accelerator).")
_MODEL = flags.DEFINE_string("model", "unet_resnet18", "The model of every job (CPU mode: "
                             "a tiny stand-in unless given).")
_PEERS = flags.DEFINE_enum("peers", "auto", ["auto", "yes", "no"], "The MONAI comparison: auto "
                           "runs it when torch and monai import.")
_JOBS = flags.DEFINE_list("jobs", ["loader", "profile", "predict", "peers"], "Jobs to run.")
_RESULTS = flags.DEFINE_string("results_dir", str(common.RESULTS), "Where result files go.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Scratch (scan, bundle, caches); default a "
                               "temporary directory, removed afterwards.")
_TAG = flags.DEFINE_string("tag", "", "Machine tag of the result files (default: detected).")
_BUDGET_S = flags.DEFINE_float("budget_s", 0, "Seconds for the whole suite (0: the sum of the "
                               "mode's job limits, 570 on a GPU).")
# Internal: what a child of this script does (probe, prepare, profile).
_CHILD = flags.DEFINE_enum("child", "", ["", "probe", "prepare", "profile"], "Internal: run "
                           "one job of the suite in this process.")
_CONFIG = flags.DEFINE_string("config", "", "Internal: the child's settings (JSON).")

# Shapes and counts by mode. GPU: sized so that the jobs' limits add up to 570 s on one H100;
# the figures in the comments are estimates, not measurements (no GPU run yet: the table's
# "job seconds" rows of the first run are what to size them by).
GPU = {"patch": 256, "batch": 32, "dtype": "bfloat16", "matmul_n": 8192, "repeats": 5,
       "warmup": 2, "steps": 20, "windows": 3, "loader_steps": 10, "loader_scans": 2,
       "loader_shape": "64,512,512", "volume": (512, 512, 512), "predict_batch": 32,
       "budget_gb": 32.0, "peer_volume": (256, 512, 512), "peer_steps": 10, "trace_steps": 3,
       # seconds: jax start ~10; bundle + 512^3 scan ~30; phantom ~25 + compile ~60 + windows;
       # compile ~45 + zarr I/O; cached compile; peak + FLOP + cached compiles; 4 processes.
       "timeouts": {"probe": 30, "prepare": 60, "loader": 150, "predict_cold": 75,
                    "predict": 45, "profile": 90, "peers": 120}}
# CPU: the same jobs, shrunk; a tiny stand-in model (see the docstring). Phantom sides >= 32.
CPU = {"patch": 64, "batch": 2, "dtype": "bfloat16", "matmul_n": 256, "repeats": 2,
       "warmup": 1, "steps": 2, "windows": 1, "loader_steps": 2, "loader_scans": 1,
       "loader_shape": "32,64,64", "volume": (16, 48, 48), "predict_batch": 4,
       "budget_gb": 1.0, "peer_volume": (16, 48, 48), "peer_steps": 2, "trace_steps": 2,
       "timeouts": {"probe": 0, "prepare": 120, "loader": 300, "predict_cold": 150,
                    "predict": 150, "profile": 300, "peers": 600}}
assert sum(GPU["timeouts"].values()) <= 570  # the whole suite within 10 minutes on a GPU

TINY = "unet_tiny"
TINY_KWARGS = {"depth": 2, "width": 4}
# Runs a benchmark script with the tiny stand-in registered under TINY in its process.
_WITH_TINY = ("import runpy, sys; from bonejax import models; "
              f"models._REGISTRY[{TINY!r}] = ('unet', 'UNet', {TINY_KWARGS!r}); "
              "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
_MIN_JOB_S = 10.0
TRAIN_SAMPLERS = ("device", "host")  # the trainer's default (sampler=auto when the scans fit)


# ---------------------------------------------------------------------------------------------
# The rows of the table: fixed names, every one always present.
# ---------------------------------------------------------------------------------------------


def fp32_name(cpu: bool) -> str:
  return "fp32" if cpu else "TF32"  # JAX's default fp32 matmul precision on NVIDIA GPUs


def expected_figures(cfg: dict, cpu: bool) -> list[str]:
  vol = "x".join(map(str, cfg["volume"]))
  pvol = "x".join(map(str, cfg["peer_volume"]))
  return [
      "training loader + step patches/s, device sampler (the trainer's default)",
      "training loader + step patches/s, host sampler",
      "training step alone patches/s (same step, batch already on the device)",
      "loader alone patches/s, device sampler",
      "loader alone patches/s, host sampler",
      f"prediction {vol} voxels/s (zarr in/out, warm)",
      "prediction voxels/s, inference passes",
      "prediction cold seconds (compiles)",
      "prediction peak device MiB",
      "peak TFLOP/s, bf16 (measured matmul)",
      f"peak TFLOP/s, {fp32_name(cpu)} (measured fp32 matmul)",
      "peak TFLOP/s, bf16 dense (datasheet)",
      "peak TFLOP/s, TF32 dense (datasheet)",
      "forward GFLOP per patch (jaxpr count)",
      "profiler trace (training + prediction steps)",
      f"peer train: bonejax patches/s ({pvol})",
      "peer train: MONAI patches/s",
      "peer train: bonejax / MONAI",
      f"peer predict: bonejax voxels/s ({pvol})",
      "peer predict: MONAI voxels/s",
      "peer predict: bonejax / MONAI",
      "peer predict: peak device MiB, bonejax / MONAI",
  ] + [f"job seconds: {name}" for name in cfg["timeouts"] if not (cpu and name == "probe")]


def allowed_missing(cpu: bool, peers_skipped: bool) -> set[str]:
  """Rows CPU mode accepts without a figure: what a CPU cannot have, the peer when not run."""
  out = {"peak TFLOP/s, bf16 dense (datasheet)", "peak TFLOP/s, TF32 dense (datasheet)",
         "prediction peak device MiB", "peer predict: peak device MiB, bonejax / MONAI"}
  if peers_skipped:
    out |= {f for f in expected_figures(CPU if cpu else GPU, cpu)
            if f.startswith("peer ") or f == "job seconds: peers"}
  return out


def mfu(rate: float | None, flop_per_item: float | None, peak_tflops: float | None):
  """rate (items/s) x FLOP per item / peak FLOP/s, or None when a piece is missing."""
  if not rate or not flop_per_item or not peak_tflops:
    return None
  return rate * flop_per_item / (peak_tflops * 1e12)


# ---------------------------------------------------------------------------------------------
# Children (each in its own process).
# ---------------------------------------------------------------------------------------------


def _register_tiny() -> None:
  from bonejax import models
  models._REGISTRY[TINY] = ("unet", "UNet", dict(TINY_KWARGS))  # pylint: disable=protected-access


def child_probe(_cfg: dict) -> dict:
  import jax
  return {"backend": jax.default_backend(), "accelerators": common.accelerators()}


def child_prepare(cfg: dict) -> dict:
  """A random-weight bundle and the synthetic scans (seconds even at 512^3, unlike a phantom)."""
  from benchmarks.synthetic import make_bundle, synthetic_scan
  from bonejax.data import store
  work = Path(cfg["workdir"])
  scans = {}
  for key, sub, shape in (("scan", "data", cfg["volume"]), ("peer_scan", "peer_data",
                                                            cfg["peer_volume"])):
    scan = work / sub / "scan_000"
    if not store.is_scan(scan) or tuple(store.open_scan(scan).shape) != tuple(shape):
      synthetic_scan(scan, tuple(shape))
    scans[key] = str(scan)
  bundle = work / "model"
  if not (bundle / "model.json").exists():
    if cfg["model"] == TINY:
      make_bundle(bundle, "unet", **TINY_KWARGS)
    else:
      make_bundle(bundle, cfg["model"])
  return {"bundle": str(bundle), **scans}


def child_profile(cfg: dict) -> dict:
  """Peak, FLOP per patch, and a profiler trace of training and prediction steps."""
  import jax
  import numpy as np

  from bonejax import models, predict
  from bonejax.data import store
  from bonejax.models import bundle as bundle_lib
  from bonejax.train import mesh as mesh_lib

  if cfg["model"] == TINY:
    _register_tiny()
  dtype = common.dtype_of(cfg["dtype"])
  p, b = cfg["patch"], cfg["batch"]
  peak = common.matmul_peak(cfg["matmul_n"], max(3, cfg["repeats"]))
  abstract = models.abstract_model(models.create, cfg["model"], num_classes=3, in_channels=1,
                                   dtype=dtype)
  gflop = models.forward_gflops(abstract, p, in_channels=1)

  # Training: the very step train_throughput.py times, on random data (speed does not depend on
  # the voxels). Compiled and run before the trace, so the trace shows steady-state steps.
  mesh = mesh_lib.make_mesh()
  create = lambda rngs: models.create(cfg["model"], num_classes=3, rngs=rngs,  # noqa: E731
                                      dtype=dtype)
  step, state, scale = common.trainer_train_step(create, mesh)
  rng = np.random.default_rng(0)
  host = {"image": rng.normal(size=(b, p, p, 1)).astype(np.float32),
          "label": rng.integers(0, 3, (b, p, p)).astype(np.int32)}
  batch = mesh_lib.put_batch(host, mesh_lib.data_sharding(mesh), b)
  state, out = step(state, batch, scale)
  jax.block_until_ready(out)

  # Prediction: the bundle through the predictor, one plane set (axis 0) of a slab of
  # trace_steps x batch planes: trace_steps batches of whole planes.
  model = bundle_lib.load_bundle(cfg["bundle"], dtype=dtype).model
  engine = predict.make_engine(model, in_channels=1, batch_size=cfg["predict_batch"],
                               memory_budget_gb=cfg["budget_gb"])
  scan = store.open_scan(cfg["scan"])
  slab = np.asarray(scan.image[:cfg["trace_steps"] * cfg["predict_batch"]].read().result())

  def predict_slab():
    return predict.predict_volume(engine, slab, stats=scan.stats, planes=1, axis=0,
                                  vote="soft", memory_budget_gb=cfg["budget_gb"])

  predict_slab()  # compiles
  result = {"peak": peak, "gflop_fwd": gflop, "device_kind": jax.devices()[0].device_kind}
  trace = Path(cfg["trace_dir"])
  if trace.exists():
    shutil.rmtree(trace)
  t0 = time.perf_counter()
  try:
    with jax.profiler.trace(str(trace)):
      for _ in range(cfg["trace_steps"]):
        with jax.profiler.TraceAnnotation("train_step"):
          state, out = step(state, batch, scale)
      jax.block_until_ready(out)
      with jax.profiler.TraceAnnotation("predict_batches"):
        predict_slab()
  except Exception as e:  # pylint: disable=broad-except
    # A profiler that cannot start (no CUPTI, say) costs the trace, not the peak and FLOP.
    result["trace_error"] = f"{type(e).__name__}: {common.errors.short_message(e)}"
    print(f"warning: no trace: {result['trace_error']}", file=sys.stderr, flush=True)
    return result
  files = [f for f in trace.rglob("*") if f.is_file()]
  result.update({"trace_dir": str(trace),
                 "trace_files": [str(f.relative_to(trace)) for f in files],
                 "trace_mb": round(sum(f.stat().st_size for f in files) / 2**20, 2),
                 "traced": {"train_steps": cfg["trace_steps"],
                            "predict_batches": cfg["trace_steps"],
                            "seconds": round(time.perf_counter() - t0, 2)},
                 "final_loss": float(out["loss"])})
  return result


def run_child(name: str) -> dict:
  cfg = json.loads(_CONFIG.value or "{}")
  return {"probe": child_probe, "prepare": child_prepare, "profile": child_profile}[name](cfg)


# ---------------------------------------------------------------------------------------------
# The suite (this process imports no jax).
# ---------------------------------------------------------------------------------------------

_DEADLINE = [float("inf")]  # time.perf_counter() by which every job must have ended


def run_job(name: str, cmd: list[str], timeout: float, env: dict, log_dir: Path) -> dict:
  """Runs a job; its JSON result line (if it prints one: train_throughput.py writes only its
  result files), or why it failed."""
  t0 = time.perf_counter()
  left = _DEADLINE[0] - t0
  if left < _MIN_JOB_S:
    print(f"[gpu_suite] {name}: skipped, out of time", file=sys.stderr, flush=True)
    return {"ok": False, "skipped": True, "error": "out of time (--budget_s)", "limit_s": 0}
  timeout = min(timeout, left)
  shown = [c for c in cmd if not c.startswith("import runpy")]  # not the stand-in's bootstrap
  shown = [c if not c.startswith("--config=") else "--config=..." for c in shown]
  print(f"[gpu_suite] {name}: {' '.join(shown[1:])}", file=sys.stderr, flush=True)
  try:
    res = common.run_json(cmd, timeout=timeout, env=env, log=log_dir / f"{name}.log")
    res["ok"] = True
  except common.JobFailed as e:
    no_json = e.returncode == 0 and "no JSON" in str(e)
    res = {"ok": True} if no_json else {"ok": False, "error": str(e),
                                        "stderr_tail": e.stderr_tail[-1500:]}
  res["job_seconds"] = round(time.perf_counter() - t0, 1)
  res["limit_s"] = round(timeout)
  print(f"[gpu_suite] {name}: {'ok' if res['ok'] else 'FAILED: ' + res['error']} "
        f"({res['job_seconds']} s of {res['limit_s']})", file=sys.stderr, flush=True)
  return res


def child_cmd(name: str, cfg: dict) -> list[str]:
  return [sys.executable, str(Path(__file__).resolve()), f"--child={name}",
          f"--config={json.dumps(cfg)}"]


def peers_available() -> bool:
  """torch and monai installed (found, not imported: importing torch takes seconds that no
  job's time limit would count)."""
  import importlib.util
  return all(importlib.util.find_spec(m) is not None for m in ("torch", "monai"))


def read_json(path: Path) -> dict | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def main(argv):
  del argv
  if _CHILD.value:
    return run_child(_CHILD.value)
  t_start = time.perf_counter()
  load_start = common.load_average()
  # Children see the GPU only with preallocation off until the jobs proper start.
  probe_env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  jobs: dict = {}
  probe = {"backend": "cpu", "accelerators": []}
  if not _CPU.value:
    _DEADLINE[0] = t_start + GPU["timeouts"]["probe"] + 5
    jobs["probe"] = run_job("probe", child_cmd("probe", {}), GPU["timeouts"]["probe"],
                            probe_env, Path(tempfile.gettempdir()) / "bonejax-gpu-suite-logs")
    if not jobs["probe"].get("ok"):  # not a reason to measure a GPU machine in CPU mode
      raise common.errors.UserError(f"the accelerator probe failed: {jobs['probe'].get('error')} "
                                 "(--cpu runs the CPU mode)")
    probe = {k: jobs["probe"].get(k) for k in ("backend", "accelerators")}
  cpu = probe["backend"] in (None, "cpu")
  cfg = CPU if cpu else GPU
  if cpu:
    jobs.pop("probe", None)  # none asked for (--cpu), or it found no accelerator
  _DEADLINE[0] = t_start + (_BUDGET_S.value or sum(cfg["timeouts"].values()))
  results = Path(_RESULTS.value)
  results.mkdir(parents=True, exist_ok=True)
  tmp = None
  if _WORKDIR.value:
    work = Path(_WORKDIR.value)
    work.mkdir(parents=True, exist_ok=True)
  else:
    tmp = tempfile.mkdtemp(prefix="bonejax-gpu-suite-")
    work = Path(tmp)
  logs = work / "logs"
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
  # One tag for every job's result files: given, else the probe's accelerator (CPU mode names
  # its results after the CPU even on a machine with a GPU).
  tag = _TAG.value or common.machine_tag(with_jax=False,
                                         accelerator_list=probe["accelerators"])
  env["BONEJAX_MACHINE"] = tag
  trace_dir = results / f"gpu_suite_{tag}_trace"
  timeouts = cfg["timeouts"]
  try:
    prep = run_job("prepare", child_cmd("prepare", {
        "workdir": str(work), "model": model, "volume": cfg["volume"],
        "peer_volume": cfg["peer_volume"]}), timeouts["prepare"],
        {**env, "JAX_PLATFORMS": "cpu"}, logs)
    jobs["prepare"] = prep
    if "loader" in _JOBS.value:
      jobs["loader"] = run_job("loader", [
          *py, str(REPO / "benchmarks/train_throughput.py"), f"--model={model}", f"--patch={p}",
          f"--batch_size={b}", f"--loader_batch_size={b}", f"--dtypes={dt}",
          f"--samplers={','.join(TRAIN_SAMPLERS)}", f"--steps={cfg['steps']}",
          f"--loader_steps={cfg['loader_steps']}", f"--warmup={cfg['warmup']}",
          f"--repeats={cfg['windows']}", f"--scans={cfg['loader_scans']}",
          f"--shape={cfg['loader_shape']}", f"--out={results}"], timeouts["loader"], env, logs)
    if "predict" in _JOBS.value:
      if prep.get("ok"):
        cmd = [sys.executable, str(REPO / "launch/predict.py"), f"--model={prep['bundle']}",
               f"--input={prep['scan']}", f"--output={work / 'pred.zarr'}", "--planes=3",
               "--vote=soft", f"--dtype={dt}", f"--batch_size={cfg['predict_batch']}",
               f"--memory_budget_gb={cfg['budget_gb']}", "--overwrite"]
        jobs["predict_cold"] = run_job("predict_cold", cmd, timeouts["predict_cold"], env, logs)
        jobs["predict"] = run_job("predict", cmd, timeouts["predict"], env, logs)
      else:
        jobs["predict"] = {"ok": False, "error": "prepare failed"}
    if "profile" in _JOBS.value:
      # After predict: its compilations are then cached, and the cold prediction was cold.
      jobs["profile"] = (run_job("profile", child_cmd("profile", {
          **{k: cfg[k] for k in ("patch", "batch", "dtype", "matmul_n", "repeats",
                                 "predict_batch", "budget_gb", "trace_steps")},
          "model": model, "bundle": prep.get("bundle"), "scan": prep.get("scan"),
          "trace_dir": str(trace_dir)}), timeouts["profile"], env, logs)
          if prep.get("ok") else {"ok": False, "error": "prepare failed"})
    if "peers" in _JOBS.value:
      wanted = _PEERS.value == "yes" or (_PEERS.value == "auto" and peers_available())
      if not wanted:
        jobs["peers"] = {"ok": False, "skipped": True,
                         "error": "torch/monai not installed (pip install -e '.[peers]')"
                         if _PEERS.value == "auto" else "--peers=no"}
      elif not prep.get("ok"):
        jobs["peers"] = {"ok": False, "error": "prepare failed"}
      else:
        limit = timeouts["peers"]
        jobs["peers"] = run_job("peers", [
            # The peer exists for unet_resnetNN only: the real model even in CPU mode.
            sys.executable, str(REPO / "benchmarks/peers/compare.py"),
            f"--model={_MODEL.value}", f"--volume={','.join(map(str, cfg['peer_volume']))}",
            f"--patch={p}", f"--batch={b}", "--repeats=1", f"--steps={cfg['peer_steps']}",
            f"--warmup={cfg['warmup']}", "--predict_runs=2", "--peer_predict_runs=1",
            "--bonejax_variant=bf16", "--peer_variant=bf16",
            f"--data_dir={Path(prep['peer_scan']).parent}", f"--results_dir={results}",
            f"--timeout={limit}", f"--tag={tag}"], limit, env, logs)
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)
  return report(jobs, cfg, cpu, probe, model, results, tag, load_start,
                time.perf_counter() - t_start)


def table_rows(jobs: dict, cfg: dict, cpu: bool, probe: dict, model: str, results: Path,
               tag: str) -> list[dict]:
  """Every row of expected_figures(), in that order, each with its figure or None."""
  figures: dict[str, dict] = {f: {"figure": f, "value": None, "job": "", "note": ""}
                              for f in expected_figures(cfg, cpu)}

  def put(figure, value, job, note="", peak_values=None, flop=None):
    row = figures[figure]  # KeyError: a figure not in expected_figures()
    row.update(value=value, job=job, note=note)
    if peak_values is not None:
      row["mfu_datasheet"] = mfu(value, flop, peak_values[0])
      row["mfu_measured"] = mfu(value, flop, peak_values[1])

  prof = jobs.get("profile", {}) if jobs.get("profile", {}).get("ok") else {}
  kinds = [a.get("kind") for a in probe.get("accelerators") or [] if a.get("platform") != "cpu"]
  sheet = common.datasheet_peak(kinds[0] if kinds else None)
  measured = prof.get("peak", {})
  bf16 = measured.get("bfloat16", {}).get("tflops")
  gflop = prof.get("gflop_fwd")
  dtype_peaks = ((sheet or {}).get("bfloat16") if cfg["dtype"] == "bfloat16" else
                 (sheet or {}).get("tf32"),
                 bf16 if cfg["dtype"] == "bfloat16" else measured.get("float32", {}).get("tflops"))
  train_flop = 3 * gflop * 1e9 if gflop else None  # forward + backward ~ 3 x forward
  no_sheet = (f"no datasheet figure for {kinds[0]}" if kinds else "a CPU: no datasheet figure")

  put("peak TFLOP/s, bf16 (measured matmul)", bf16, "profile",
      f"jitted {measured.get('matmul_n')}^2 matmul, median" if measured else "")
  put(f"peak TFLOP/s, {fp32_name(cpu)} (measured fp32 matmul)",
      measured.get("float32", {}).get("tflops"), "profile",
      "" if cpu else "fp32 inputs at JAX's default precision: TF32 tensor cores")
  put("peak TFLOP/s, bf16 dense (datasheet)", (sheet or {}).get("bfloat16"), "-",
      f"{sheet['name']}, no sparsity" if sheet else no_sheet)
  put("peak TFLOP/s, TF32 dense (datasheet)", (sheet or {}).get("tf32"), "-",
      f"{sheet['name']}, no sparsity" if sheet else no_sheet)
  put("forward GFLOP per patch (jaxpr count)", gflop, "profile",
      f"{cfg['patch']} px: 2 x multiply-adds of convolutions and matmuls (padding taps "
      "included); training = 3 x forward")
  if prof.get("trace_error"):
    put("profiler trace (training + prediction steps)", None, "profile",
        f"not written: {prof['trace_error']}")
  elif prof:
    try:
      rel = Path(prof["trace_dir"]).relative_to(results)
    except ValueError:
      rel = Path(prof["trace_dir"])
    put("profiler trace (training + prediction steps)", str(rel), "profile",
        f"{prof['traced']['train_steps']} training steps + {prof['traced']['predict_batches']} "
        f"prediction batches, {prof['trace_mb']} MB; open with TensorBoard's profile plugin / "
        "XProf")

  loader = (read_json(results / f"train_throughput_{tag}.json")
            if jobs.get("loader", {}).get("ok") else None)
  lrows = (loader or {}).get("rows", [])
  kind_of = (loader or {}).get("samplers", {})  # sampler asked for -> the feed's own name

  def rate(sampler, part):
    kind = kind_of.get(sampler, sampler)
    r = next((r for r in lrows if r.get("sampler") == kind and r.get("part") == part), None)
    return r["patches_per_s"] if r else None

  for sampler in TRAIN_SAMPLERS:
    name = ("training loader + step patches/s, device sampler (the trainer's default)"
            if sampler == "device" else f"training loader + step patches/s, {sampler} sampler")
    kind = f"feed: {kind_of[sampler]}" if sampler in kind_of else ""
    put(name, rate(sampler, "loader+step"), "loader", kind, dtype_peaks, train_flop)
    put(f"loader alone patches/s, {sampler} sampler", rate(sampler, "loader"), "loader",
        "batches ready on the devices" if sampler == "device" else
        "batches normalised on the host, before the copy")
  put("training step alone patches/s (same step, batch already on the device)",
      rate("-", "step"), "loader", "augmentation on, CE + Dice, Adam (as loader + step)",
      dtype_peaks, train_flop)

  pred = jobs.get("predict", {})
  if pred.get("ok"):
    vol = cfg["volume"]
    voxels = vol[0] * vol[1] * vol[2]
    put(f"prediction {'x'.join(map(str, vol))} voxels/s (zarr in/out, warm)",
        pred.get("voxels_per_second"), "predict",
        f"{pred.get('seconds')} s, mode {pred.get('mode')}; MFU on useful FLOP (3 planes x "
        "forward FLOP per pixel)", dtype_peaks,
        3 * gflop * 1e9 / cfg["patch"]**2 if gflop else None)
    if pred.get("infer_seconds"):
      put("prediction voxels/s, inference passes", voxels / pred["infer_seconds"], "predict")
    put("prediction peak device MiB", pred.get("device_peak_mb"), "predict",
        "" if pred.get("device_peak_mb") is not None else "not reported by this backend")
  cold = jobs.get("predict_cold", {})
  if cold.get("ok"):
    put("prediction cold seconds (compiles)", cold.get("seconds"), "predict_cold")

  peers = jobs.get("peers", {})
  summary = ((read_json(results / f"peers_{tag}.json") or {}).get("summary", {})
             if peers.get("ok") else {})
  pvol = "x".join(map(str, cfg["peer_volume"]))
  for job, metric, unit in (("train", "patches_per_second", "patches/s"),
                            ("predict", "voxels_per_second", "voxels/s")):
    side = summary.get(job)
    why = peers.get("error", "") if not side else ""
    if side or why:
      note = why or f"{_MODEL.value} vs MONAI FlexibleUNet, bf16 both; peers_{tag}.md"
      put(f"peer {job}: bonejax {unit} ({pvol})", (side or {}).get("bonejax", {}).get(metric),
          "peers", note)
      put(f"peer {job}: MONAI {unit}", (side or {}).get("peer", {}).get(metric), "peers", why)
      put(f"peer {job}: bonejax / MONAI", (side or {}).get("ratio", {}).get(metric), "peers",
          why)
      if job == "predict":
        put("peer predict: peak device MiB, bonejax / MONAI",
            (side or {}).get("ratio", {}).get("peak_device_mb"), "peers", why)

  for name in cfg["timeouts"]:
    figure = f"job seconds: {name}"
    if figure not in figures:
      continue
    job = jobs.get(name)
    if job is None:
      put(figure, None, name, "not run (--jobs)")
    else:
      state = "ok" if job.get("ok") else ("skipped: " if job.get("skipped") else "FAILED: ")
      limit = f" (limit {job['limit_s']} s)" if job.get("limit_s") else ""
      put(figure, job.get("job_seconds"), name,
          f"{state}{'' if job.get('ok') else job.get('error', '')}{limit}")
  return list(figures.values())


def report(jobs, cfg, cpu, probe, model, results: Path, tag, load_start, seconds) -> dict:
  """The headline table from the jobs' results; in CPU mode, a check that every row is there."""
  info = common.machine(with_jax=False)  # this process imports no jax: the probe's devices
  info["accelerators"] = probe.get("accelerators") or []
  info["tag"] = tag
  rows = table_rows(jobs, cfg, cpu, probe, model, results, tag)
  peers_skipped = bool(jobs.get("peers", {}).get("skipped")) or "peers" not in jobs
  missing = [r["figure"] for r in rows if r["value"] is None
             and r["figure"] not in allowed_missing(cpu, peers_skipped)]

  mode = "CPU mode (tiny shapes: pipeline check only)" if cpu else probe.get("backend")
  if model == TINY:
    mode += f"; {TINY} = unet {TINY_KWARGS}"
  load = (load_start, common.load_average())
  table = common.markdown_table(
      rows, ["figure", "value", "mfu_datasheet", "mfu_measured", "job", "note"],
      ["figure", "value", "MFU vs datasheet peak", "MFU vs measured peak", "job", "note"])
  md = "\n".join([
      f"# GPU suite: {model}, {cfg['dtype']}, {cfg['patch']} px, batch {cfg['batch']} ({mode})",
      "", f"{common.machine_line(info)}; load average {load[0]} -> {load[1]}; "
      f"{seconds / 60:.1f} min in all.", "", table, "",
      "MFU = throughput x FLOP / peak of the compute dtype (training: 3 x the forward FLOP "
      "per patch; prediction: useful FLOP, 3 planes x forward FLOP per pixel, tile overlap and "
      "padding counted as waste), against the datasheet's dense peak and against the matmul "
      "peak measured in this run. Jobs: loader = benchmarks/train_throughput.py (step alone and "
      "loader + step run one jitted step), profile = this script's --child=profile (peak, FLOP, "
      "trace), predict = launch/predict.py (3-plane soft vote, zarr in/out, second run warm), "
      "peers = benchmarks/peers/compare.py (bf16 on both sides). Their own result files are "
      "beside this one."]
      + (["", f"Rows without a figure: {', '.join(missing)}."] if missing else []))
  print(md)
  payload = {"mode": "cpu" if cpu else probe.get("backend"), "config": dict(cfg),
             "model": model, "rows": rows, "jobs": jobs, "seconds": round(seconds, 1),
             "missing": missing, "load_average": {"start": load[0], "end": load[1]},
             # The point of running every JAX piece in a child: checked by the tests.
             "suite_process_imported_jax": "jax" in sys.modules,
             "machine": info}
  paths = common.write_results("gpu_suite", payload, md, tag=tag, results_dir=results)
  failed = [n for n, j in jobs.items() if not j.get("ok") and not j.get("skipped")]
  if cpu and missing:
    # CPU mode is the suite's own test: a row without its figure is a broken pipeline.
    print(f"error: CPU mode: rows without a figure: {'; '.join(missing)} (failed jobs: "
          f"{', '.join(failed) or 'none'}; see {paths['json']})", file=sys.stderr, flush=True)
    raise SystemExit(1)
  return {"json": str(paths["json"]), "md": str(paths["md"]), "seconds": round(seconds, 1),
          "mode": payload["mode"], "failed": failed, "missing": missing}


if __name__ == "__main__":
  common.runner.run(main)
