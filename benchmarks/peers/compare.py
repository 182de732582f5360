"""bonejax against the PyTorch/MONAI peer on the same phantom scan, same patch and batch sizes.

    python benchmarks/peers/compare.py                                    # defaults by machine
    python benchmarks/peers/compare.py --volume=512,512,512 --patch=256 --batch=16 --repeats=5
    python benchmarks/peers/compare.py --volume=48,96,96 --patch=64 --batch=4 --repeats=2 \
        --steps=5 --results_dir=/tmp/peers                                # a smoke run
    python benchmarks/peers/compare.py --volume=64,384,384 --patch=256 --batch=4 --jobs=predict \
        --bonejax_predict_variants=fp32,bf16_graph --peer_predict_variants=fp32,bf16_cl \
        --repeats=2 --name=peers_64x384x384     # planes larger than a patch; several variants

Needs the `peers` extra (`pip install -e ".[peers]"`: torch, monai). Jobs:
- train: steps of Adam + cross-entropy on batches of `--batch` patches of `--patch` px cut from
  planes of the scan along all three axes (the same in-memory pool on both sides, so data
  loading is not part of either figure); bonejax runs its trainer's step, the peer a plain
  PyTorch loop over MONAI's FlexibleUNet(resnet18).
- predict: the whole scan, 3-plane soft vote, raw intensities in memory to labels in memory.
  bonejax: `bonejax.predict.predict_volume` (whole planes per call); the peer:
  `monai.inferers.sliding_window_inference` (roi = patch, its default overlap 0.25) on the
  slices along each axis, probabilities summed, argmax. Both with untrained weights.

Every measured job runs in its own process (peak RSS read from VmHWM there) and the runs
alternate (bonejax, peer, bonejax, peer, ...) so slow drift in machine load hits both sides
alike. First each side's numerics are chosen by a short training calibration run of each
variant (peer: fp32 / bf16 autocast, each with and without channels_last; bonejax: fp32 / bf16
compute), the faster one is used for both jobs, and the calibration figures are kept. Except
bonejax prediction on a CPU with --bonejax_variant=auto: it runs what `predict.py` runs by
default there, the inference graph in `--dtype=auto` (bf16_graph where the CPU has AMX or
AVX512-BF16, else fp32_graph: `bonejax.core.dtype_auto`), whatever training chose.
With `--bonejax_predict_variants` / `--peer_predict_variants` every listed prediction variant
runs in the alternation (bonejax fp32, peer fp32, bonejax bf16_graph, peer bf16_cl, ...) and
each side's fastest is the headline: the peer's best CPU setting measured on the prediction
itself, bonejax's `*_graph` variants predict through `bonejax.models.inference_graph`.
Cold start (`--cold`, on with the predict job): what a user running one scan per process waits
for. Each repeat runs, in fresh processes, bonejax's prediction from a saved bundle (as
predict.py loads it) twice over one new, empty JAX compilation cache (JAX_COMPILATION_CACHE_DIR,
which `bonejax.core.compile_cache` keeps), the first invocation and the second (what is done
once per machine, the oneDNN extension's build and measured lowering choices, stays in the
user's cache: a first run on a new scan shape, not a first run after installing), then the
peer's once (PyTorch compiles nothing: its first pass is its cold one; with
--peer_predict_runs=1 its predict job is that run). Each reports its one prediction
pass (compile included) and the process's wall time (imports, model, scan read, prediction),
beside each side's warm pass from the predict job.
The predict and train jobs run with the compilation cache off (BONEJAX_COMPILATION_CACHE=0), so
their first pass stays a compiling one.
Reports medians and the ratio bonejax / peer (> 1: bonejax faster, or uses more memory).
Writes benchmarks/results/<--name, default peers>_<machine>.{json,md}.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from absl import flags  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from bonejax.cli import runner  # noqa: E402
from bonejax.core import compile_cache, errors
from bonejax.core.progress import Progress

HERE = Path(__file__).resolve().parent
SIDES = {"bonejax": HERE / "bonejax_job.py", "peer": HERE / "monai_job.py"}
VARIANTS = {"bonejax": ("fp32", "bf16"), "peer": ("fp32", "bf16", "fp32_cl", "bf16_cl")}
PREDICT_VARIANTS = {"bonejax": ("fp32", "bf16", "fp32_graph", "bf16_graph"),
                    "peer": VARIANTS["peer"]}

def _cpu_predict_default() -> str:
  """predict.py's default on this CPU: the inference graph in the dtype `auto` picks."""
  from bonejax.core import dtype_auto
  return "bf16_graph" if dtype_auto.auto_dtype("cpu") == "bfloat16" else "fp32_graph"


_VOLUME = flags.DEFINE_string("volume", "", "Z,Y,X of the phantom scan (default: 512^3 on a GPU, "
                              "64,128,128 on a CPU).")
_PATCH = flags.DEFINE_integer("patch", 0, "Patch side (0: 256 on a GPU, 128 on a CPU).")
_BATCH = flags.DEFINE_integer("batch", 0, "Batch size (0: 16 on a GPU, 4 on a CPU).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Measured runs per side and job (alternating).")
_STEPS = flags.DEFINE_integer("steps", 0, "Timed training steps per run (0: 50 GPU, 10 CPU).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed training steps per run.")
_PRED_RUNS = flags.DEFINE_integer("predict_runs", 2, "Prediction passes per run; the first is "
                                  "cold (bonejax compiles), the rest are timed.")
_PEER_PRED_RUNS = flags.DEFINE_integer(
    "peer_predict_runs", 0, "Prediction passes per peer run (0: --predict_runs). PyTorch has "
    "nothing to compile, so 1 pass is a warm figure: halves the peer's time on slow machines.")
_JOBS = flags.DEFINE_list("jobs", ["train", "predict"], "Jobs to compare.")
_COLD = flags.DEFINE_bool("cold", True, "With the predict job: also the cold start (first and "
                          "second invocation in fresh processes, over a new compilation cache).")
_BONEJAX_VARIANT = flags.DEFINE_string("bonejax_variant", "auto", "fp32 | bf16 | auto.")
_PEER_VARIANT = flags.DEFINE_string("peer_variant", "auto", "fp32 | bf16 | fp32_cl | bf16_cl | "
                                    "auto.")
_PRED_BONEJAX = flags.DEFINE_list(
    "bonejax_predict_variants", [], "Prediction: measure each of these bonejax variants (fp32, "
    "bf16, fp32_graph, bf16_graph: the last two through the inference graph) in the "
    "alternation; the fastest is the headline. Default: the one variant chosen as above.")
_PRED_PEER = flags.DEFINE_list(
    "peer_predict_variants", [], "Prediction: the same for the peer (fp32, bf16, fp32_cl, "
    "bf16_cl): its best CPU setting measured on the prediction itself.")
_NAME = flags.DEFINE_string("name", "peers", "Result file stem (results/NAME_<machine>.*).")
_MODEL = flags.DEFINE_string("model", "unet_resnet18", "bonejax model (peer: FlexibleUNet "
                             "with the matching ResNet backbone).")
_DATA = flags.DEFINE_string("data_dir", "", "Where the phantom scan is made (default: "
                            "/tmp/bonejax-peers/Z_Y_X, reused).")
_TIMEOUT = flags.DEFINE_integer("timeout", 3600, "Seconds a single job may take.")
_TAG = flags.DEFINE_string("tag", "", "Machine tag of the result files (default: detected).")
_RESULTS = flags.DEFINE_string("results_dir", str(common.RESULTS), "Where result files go.")

METRIC = {"train": "patches_per_second", "predict": "voxels_per_second"}


def _gpu() -> bool:
  import jax
  return jax.default_backend() != "cpu"


def job_cmd(side: str, job: str, variant: str, scan: Path, patch: int, batch: int,
            steps: int, runs: int | None = None, bundle: Path | None = None) -> list[str]:
  cmd = [sys.executable, str(SIDES[side]), f"--job={job}", f"--scan={scan}", f"--patch={patch}",
         f"--batch={batch}", f"--variant={variant}", f"--steps={steps}",
         f"--warmup={_WARMUP.value}"]
  if runs is None:
    runs = _PRED_RUNS.value
    if side == "peer" and _PEER_PRED_RUNS.value:
      runs = _PEER_PRED_RUNS.value
  cmd.append(f"--runs={runs}")
  if side == "bonejax":
    cmd.append(f"--model={_MODEL.value}")
    if bundle is not None:
      cmd.append(f"--bundle={bundle}")
  else:
    cmd.append(f"--backbone={_MODEL.value.split('_')[-1]}")
  return cmd


# Jobs other than the cold start measure without the persistent compilation cache, so that
# their first prediction pass compiles, as it always did.
NO_CACHE = {"BONEJAX_COMPILATION_CACHE": "0"}


def run_job(side, job, variant, scan, patch, batch, steps, log_dir: Path) -> dict:
  name = f"{side}_{job}_{variant}_{time.strftime('%H%M%S')}"
  try:
    res = common.run_json(job_cmd(side, job, variant, scan, patch, batch, steps),
                          timeout=_TIMEOUT.value, env=NO_CACHE, log=log_dir / f"{name}.log")
    res["ok"] = True
  except common.JobFailed as e:
    res = {"ok": False, "error": str(e), "stderr_tail": e.stderr_tail[-800:]}
    print(f"{side} {job} ({variant}) failed: {e}", file=sys.stderr)
  res.update({"side": side, "job": job, "variant": variant})
  return res


def run_cold(side: str, variant: str, scan, patch, batch, log_dir: Path, bundle: Path,
             cache_root: Path) -> list[dict]:
  """One cold start of `side` (see the module docstring): bonejax's first and second invocation
  over a new cache directory, the peer's one fresh process."""
  out = []
  cache = Path(tempfile.mkdtemp(prefix="cache_", dir=cache_root)) if side == "bonejax" else None
  for invocation in ((1, 2) if side == "bonejax" else (1,)):
    name = f"{side}_cold{invocation}_{variant}_{time.strftime('%H%M%S')}"
    # the directory given to JAX, with the threshold bonejax's own set-up uses
    env = ({"JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS":
            str(compile_cache.MIN_COMPILE_SECONDS)} if cache else {})
    try:
      res = common.run_json(job_cmd(side, "predict", variant, scan, patch, batch, 0, runs=1,
                                    bundle=bundle if side == "bonejax" else None),
                            timeout=_TIMEOUT.value, env=env, log=log_dir / f"{name}.log")
      res["ok"] = True
    except common.JobFailed as e:
      res = {"ok": False, "error": str(e), "stderr_tail": e.stderr_tail[-800:]}
      print(f"{side} cold start {invocation} ({variant}) failed: {e}", file=sys.stderr)
    res.update({"side": side, "job": "cold", "invocation": invocation, "variant": variant})
    out.append(res)
  if cache is not None:
    shutil.rmtree(cache, ignore_errors=True)
  return out


def summarize_cold(cold: list[dict], warm: dict) -> list[dict]:
  """Rows: each side's invocations (pass and process seconds, medians) against its warm pass.

  `warm`: side -> warm pass seconds (the predict job's median, same variant)."""
  rows = []
  for side in SIDES:
    for invocation in (1, 2):
      rs = [r for r in cold if r["side"] == side and r["invocation"] == invocation]
      good = [r for r in rs if r["ok"]]
      if not rs:
        continue
      pass_s = common.median(r["cold_seconds"] for r in good) if good else None
      rows.append({
          "side": side, "invocation": invocation, "variant": rs[0]["variant"],
          "pass_seconds": pass_s, "pass_values": [r["cold_seconds"] for r in good],
          "process_seconds": common.median(r["wall_seconds"] for r in good) if good else None,
          "model_seconds": (common.median(r["model_seconds"] for r in good)
                            if good and "model_seconds" in good[0] else None),
          "warm_seconds": warm.get(side),
          "pass_over_warm": pass_s / warm[side] if pass_s and warm.get(side) else None,
          "runs": len(rs), "failed": len(rs) - len(good)})
  return rows


def cold_markdown(rows: list[dict]) -> str:
  peer = next((r for r in rows if r["side"] == "peer"), None)
  table = []
  for r in rows:
    what = (f"{r['side']} {r['variant']}, "
            + ("first invocation (empty cache)" if r["side"] == "bonejax" and r["invocation"] == 1
               else "second invocation" if r["side"] == "bonejax" else "fresh process"))
    vs_peer = (peer["process_seconds"] / r["process_seconds"]
               if peer and peer["process_seconds"] and r["process_seconds"] else None)
    table.append({"what": what, "pass": r["pass_seconds"], "warm": r["warm_seconds"],
                  "ratio": r["pass_over_warm"], "process": r["process_seconds"],
                  "vs": vs_peer, "n": f"{r['runs'] - r['failed']}/{r['runs']}"})
  return common.markdown_table(
      table, ["what", "pass", "warm", "ratio", "process", "vs", "n"],
      ["cold start", "prediction pass (s)", "warm pass (s)", "pass / warm",
       "process wall (s)", "peer's process / this (> 1: faster)", "ok/runs"])


def calibrate(side: str, requested: str, scan, patch, batch, steps, log_dir) -> tuple[str, list]:
  if requested != "auto":
    if requested not in VARIANTS[side]:
      raise errors.UserError(f"--{side if side == 'bonejax' else 'peer'}_variant={requested!r}: "
                          f"one of {', '.join(VARIANTS[side])} or auto")
    return requested, []
  trials = [run_job(side, "train", v, scan, patch, batch, max(2, steps // 2), log_dir)
            for v in VARIANTS[side]]
  ok = [t for t in trials if t["ok"]]
  if not ok:
    raise RuntimeError(f"every {side} variant failed: {trials[0].get('error')}")
  best = max(ok, key=lambda t: t["patches_per_second"])
  print(f"{side}: " + ", ".join(f"{t['variant']} {t.get('patches_per_second', 0):.3g}"
                                for t in trials) + f" patches/s -> {best['variant']}",
        file=sys.stderr)
  return best["variant"], [{k: t.get(k) for k in ("variant", "ok", "patches_per_second",
                                                   "error")} for t in trials]


def summarize(runs: list[dict]) -> dict:
  out: dict = {}
  for job in _JOBS.value:
    per = {}
    for side in SIDES:
      rs = [r for r in runs if r["side"] == side and r["job"] == job]
      good = [r for r in rs if r["ok"]]
      vals = [r[METRIC[job]] for r in good]
      per[side] = {
          "runs": len(rs), "failed": len(rs) - len(good), "values": vals,
          METRIC[job]: common.median(vals) if vals else None,
          "spread": common.spread(vals) if vals else None,
          "peak_rss_mb": common.median(r["peak_rss_mb"] for r in good) if good else None,
          "peak_device_mb": (common.median(r["peak_device_mb"] for r in good)
                             if good and good[0].get("peak_device_mb") is not None else None),
          "params": good[0]["params"] if good else None,
          "cold_seconds": (common.median(r["cold_seconds"] for r in good)
                           if good and "cold_seconds" in good[0] else None),
      }
    ratio = {}
    for key in (METRIC[job], "peak_rss_mb", "peak_device_mb"):
      a, b = per["bonejax"][key], per["peer"][key]
      ratio[key] = a / b if a and b else None
    out[job] = {"bonejax": per["bonejax"], "peer": per["peer"], "ratio": ratio}
  return out


def per_variant(runs: list[dict], job: str) -> list[dict]:
  """One row per (side, variant) of `job`: median, spread, peak RSS, runs."""
  rows = []
  for side in SIDES:
    for v in dict.fromkeys(r["variant"] for r in runs if r["side"] == side and r["job"] == job):
      rs = [r for r in runs if r["side"] == side and r["job"] == job and r["variant"] == v]
      good = [r for r in rs if r["ok"]]
      vals = [r[METRIC[job]] for r in good]
      rows.append({"side": side, "variant": v, METRIC[job]: common.median(vals) if vals else None,
                   "spread": common.spread(vals) if vals else None, "values": vals,
                   "peak_rss_mb": common.median(r["peak_rss_mb"] for r in good) if good else None,
                   "cold_seconds": (common.median(r["cold_seconds"] for r in good)
                                    if good and "cold_seconds" in good[0] else None),
                   "runs": len(rs), "failed": len(rs) - len(good)})
  return rows


def best_variants(rows: list[dict], job: str) -> dict[str, str]:
  best = {}
  for side in SIDES:
    ok = [r for r in rows if r["side"] == side and r[METRIC[job]]]
    if ok:
      best[side] = max(ok, key=lambda r: r[METRIC[job]])["variant"]
  return best


def variants_markdown(rows: list[dict], job: str) -> str:
  m = METRIC[job]
  peer_best = max((r[m] for r in rows if r["side"] == "peer" and r[m]), default=None)
  peer_rss = next((r["peak_rss_mb"] for r in rows if r["side"] == "peer" and r[m] == peer_best),
                  None)
  table = [{"what": f"{r['side']} {r['variant']}", "rate": r[m], "rss": r["peak_rss_mb"],
            "ratio": r[m] / peer_best if r[m] and peer_best else None,
            "rss_ratio": r["peak_rss_mb"] / peer_rss if r["peak_rss_mb"] and peer_rss else None,
            "halfrange": (r["spread"] or {}).get("rel_halfrange"),
            "n": f"{len(r['values'])}/{r['runs']}"} for r in rows]
  return common.markdown_table(
      table, ["what", "rate", "ratio", "rss", "rss_ratio", "halfrange", "n"],
      ["variant", "voxels/s" if job == "predict" else "patches/s", "/ best peer",
       "peak RSS (MiB)", "RSS / best peer's", "rel. half-range", "ok/runs"])


def markdown(summary, variants, calib, params, cfg, info, load, pred_variants=None) -> str:
  rows = []
  labels = {"train": "training patches/s", "predict": "prediction voxels/s"}
  for job, s in summary.items():
    m = METRIC[job]
    rows.append({"what": labels[job], "bonejax": s["bonejax"][m], "peer": s["peer"][m],
                 "ratio": s["ratio"][m],
                 "n": f"{len(s['bonejax']['values'])}/{len(s['peer']['values'])}"})
    rows.append({"what": f"{job}: peak RSS (MiB)", "bonejax": s["bonejax"]["peak_rss_mb"],
                 "peer": s["peer"]["peak_rss_mb"], "ratio": s["ratio"]["peak_rss_mb"]})
    if s["ratio"].get("peak_device_mb"):
      rows.append({"what": f"{job}: peak device memory (MiB)",
                   "bonejax": s["bonejax"]["peak_device_mb"], "peer": s["peer"]["peak_device_mb"],
                   "ratio": s["ratio"]["peak_device_mb"]})
  table = common.markdown_table(rows, ["what", "bonejax", "peer", "ratio", "n"],
                                ["", "bonejax", "PyTorch + MONAI", "bonejax / peer",
                                 "runs (bonejax/peer)"])
  lines = [f"# bonejax vs PyTorch + MONAI: {info['tag']}", "", common.machine_line(info), "",
           f"Load average at start / end: {load[0]} / {load[1]}.", "",
           f"Phantom scan {'x'.join(map(str, cfg['volume']))}, patch {cfg['patch']} px, batch "
           f"{cfg['batch']}, {cfg['steps']} timed training steps per run, {cfg['repeats']} "
           "alternating runs per side; medians.", "",
           f"Models: bonejax `{_MODEL.value}` {common.fmt(params.get('bonejax'))} parameters "
           f"(smp's decoder); MONAI `FlexibleUNet({_MODEL.value.split('_')[-1]})` "
           f"{common.fmt(params.get('peer'))} parameters (its own decoder; pretrained=False).",
           "", f"Numerics: bonejax `{variants['bonejax']}`, peer `{variants['peer']}`"
           + (" (fastest in a short training calibration run)." if calib else ".")
           + ("" if not pred_variants or pred_variants == variants else
              f" Prediction: bonejax `{pred_variants['bonejax']}`, peer `{pred_variants['peer']}`"
              + (" (each side's fastest of the variants below)." if _PRED_BONEJAX.value
                 or _PRED_PEER.value else
                 " (bonejax on CPU predicts in fp32: XLA CPU emulates bf16 convolutions).")),
           "", table]
  if calib:
    lines += ["", "Calibration (training patches/s): " + "; ".join(
        f"{side}: " + ", ".join(f"{t['variant']} {common.fmt(t['patches_per_second'])}"
                                for t in trials) for side, trials in calib.items())]
  if "predict" in summary:
    lines += ["", "Prediction: bonejax runs whole planes per call "
              "(`bonejax.predict.predict_volume`, planes=3, soft); the peer "
              "`sliding_window_inference` with roi = patch and overlap 0.25 on the slices of each "
              "axis. Cold first pass (bonejax compiles; not in the medians): bonejax "
              f"{common.fmt(summary['predict']['bonejax']['cold_seconds'])} s, peer "
              f"{common.fmt(summary['predict']['peer']['cold_seconds'])} s."]
  return "\n".join(lines)


def main(argv):
  del argv
  if not _MODEL.value.startswith("unet_resnet"):
    raise errors.UserError(f"--model={_MODEL.value!r}: the peer exists for unet_resnetNN only")
  for j in _JOBS.value:
    if j not in METRIC:
      raise errors.UserError(f"--jobs: unknown job {j!r} (train, predict)")
  try:
    import torch  # noqa: F401  (only to fail early with a clear message)
    import monai  # noqa: F401
  except ImportError as e:
    raise errors.UserError(f"the peer side needs torch and monai: pip install -e '.[peers]' ({e})")
  gpu = _gpu()
  shape = (errors.parse_ints(_VOLUME.value, 3, "volume") if _VOLUME.value
           else ((512, 512, 512) if gpu else (64, 128, 128)))
  patch = _PATCH.value or (256 if gpu else 128)
  batch = _BATCH.value or (16 if gpu else 4)
  steps = _STEPS.value or (50 if gpu else 10)
  cfg = {"volume": list(shape), "patch": patch, "batch": batch, "steps": steps,
         "repeats": _REPEATS.value, "warmup": _WARMUP.value, "predict_runs": _PRED_RUNS.value,
         "peer_predict_runs": _PEER_PRED_RUNS.value or _PRED_RUNS.value,
         "model": _MODEL.value, "jobs": list(_JOBS.value)}
  load_start = common.load_average()

  from benchmarks.peers import bonejax_job
  data = Path(_DATA.value or f"/tmp/bonejax-peers/{'_'.join(map(str, shape))}")
  scan = bonejax_job.ensure_scan(data, shape)
  log_dir = data / "logs"

  variants, calib = {}, {}
  cpu_predict_only = not _gpu() and _BONEJAX_VARIANT.value == "auto" and "train" not in _JOBS.value
  peer_predict_only = bool(_PRED_PEER.value) and "train" not in _JOBS.value
  for side, req in (("bonejax", _BONEJAX_VARIANT.value), ("peer", _PEER_VARIANT.value)):
    if side == "bonejax" and cpu_predict_only:
      variants[side] = _cpu_predict_default()  # predict.py's default (below); no calibration
      continue
    if side == "peer" and peer_predict_only:
      variants[side] = _PRED_PEER.value[0]  # measured on the prediction itself, below
      continue
    variants[side], trials = calibrate(side, req, scan, patch, batch, steps, log_dir)
    if trials:
      calib[side] = trials
  # Prediction numerics: as training, except bonejax on CPU in auto mode runs predict.py's
  # default (the inference graph, dtype auto): a training tie does not carry over to inference.
  pred_variants = dict(variants)
  if not _gpu() and _BONEJAX_VARIANT.value == "auto":
    pred_variants["bonejax"] = _cpu_predict_default()

  # Prediction variants per side (several: all measured in the alternation, the best counts).
  pred_lists = {}
  for side, given in (("bonejax", _PRED_BONEJAX.value), ("peer", _PRED_PEER.value)):
    for v in given:
      if v not in PREDICT_VARIANTS[side]:
        raise errors.UserError(f"--{side}_predict_variants: {v!r} is not one of "
                            f"{', '.join(PREDICT_VARIANTS[side])}")
    pred_lists[side] = list(given) or [pred_variants[side]]
  pairs = {job: ([(side, v) for i in range(max(map(len, pred_lists.values())))
                  for side in SIDES for v in pred_lists[side][i:i + 1]]
                 if job == "predict" else [(side, variants[side]) for side in SIDES])
           for job in _JOBS.value}

  cold_on = _COLD.value and "predict" in _JOBS.value
  if cold_on:
    bundle = bonejax_job.ensure_bundle(data, _MODEL.value)
    cache_root = data / "cold_caches"
    cache_root.mkdir(parents=True, exist_ok=True)
  cold: list[dict] = []
  runs: list[dict] = []
  # A peer predict job of one pass is already a cold start (a fresh process, nothing to
  # compile): it is counted as one instead of being run again.
  peer_one_pass = (_PEER_PRED_RUNS.value or _PRED_RUNS.value) == 1
  cold_sides = [s for s in SIDES if not (s == "peer" and peer_one_pass)]
  total = _REPEATS.value * (sum(len(p) for p in pairs.values())
                            + (2 + len(cold_sides) - 1 if cold_on else 0))
  bar = Progress(total=total, desc="peers", unit="runs", every_s=0)
  for _ in range(_REPEATS.value):
    for job in _JOBS.value:
      for side, v in pairs[job]:  # bonejax, peer, bonejax, peer, ...: alternating
        r = run_job(side, job, v, scan, patch, batch, steps, log_dir)
        runs.append(r)
        bar.update(1, extra=f"{side} {job} {v} " + (common.fmt(r.get(METRIC[job])) if r["ok"]
                                                     else "failed"))
    if cold_on:  # each side's first listed prediction variant, alternating with the rest
      if peer_one_pass:
        cold += [dict(r, job="cold", invocation=1) for r in runs[-len(pairs["predict"]):]
                 if r["side"] == "peer" and r["variant"] == pred_lists["peer"][0]]
      for side in cold_sides:
        rs = run_cold(side, pred_lists[side][0], scan, patch, batch, log_dir, bundle, cache_root)
        cold += rs
        bar.update(len(rs), extra=f"{side} cold " + ", ".join(
            common.fmt(r.get("cold_seconds")) if r["ok"] else "failed" for r in rs) + " s")
  bar.close()

  variant_rows = {job: per_variant(runs, job) for job in _JOBS.value}
  if "predict" in _JOBS.value:  # the variants measured, even one named that is not the default
    pred_variants.update(best_variants(variant_rows["predict"], "predict"))
  headline = [r for r in runs if r["job"] != "predict"
              or r["variant"] == pred_variants[r["side"]]]
  summary = summarize(headline)
  params = {}
  for s in summary.values():
    for side in SIDES:
      params[side] = params.get(side) or s[side]["params"]
  info = common.machine()
  tag = _TAG.value or info["tag"]
  info["tag"] = tag
  load = (load_start, common.load_average())
  md = markdown(summary, variants, calib, params, cfg, info, load, pred_variants)
  if "predict" in _JOBS.value and max(map(len, pred_lists.values())) > 1:
    md += ("\n\nEvery prediction variant, alternating in the same run (the headline above takes "
           "each side's fastest):\n\n" + variants_markdown(variant_rows["predict"], "predict"))
  cold_rows = []
  if cold_on:
    warm = {}
    for row in variant_rows["predict"]:
      if row["variant"] == pred_lists[row["side"]][0] and row["voxels_per_second"]:
        warm[row["side"]] = float(np.prod(shape)) / row["voxels_per_second"]
    cold_rows = summarize_cold(cold, warm)
    md += ("\n\nCold start: one prediction in a fresh process, from a saved bundle (bonejax: "
           "first invocation over an empty compilation cache, then a second over the cache the "
           "first filled), beside the same variant's warm pass above; medians over the "
           "repeats.\n\n" + cold_markdown(cold_rows))
  print(md)
  payload = {"cold": cold_rows, "cold_runs": cold, "config": cfg, "variants": variants, "predict_variants": pred_variants,
             "predict_variant_lists": pred_lists, "per_variant": variant_rows,
             "calibration": calib, "params": params,
             "summary": summary, "runs": runs, "scan": str(scan),
             "load_average": {"start": load[0], "end": load[1]}, "machine": info}
  paths = common.write_results(_NAME.value, payload, md, tag=tag, results_dir=_RESULTS.value)
  out = {"json": paths["json"], "md": paths["md"], "variants": variants}
  for job, s in summary.items():
    out[f"{job}_ratio"] = s["ratio"][METRIC[job]]
  for r in cold_rows:
    out[f"{r['side']}_cold{r['invocation']}_over_warm"] = r["pass_over_warm"]
  return out


if __name__ == "__main__":
  runner.run(main)
