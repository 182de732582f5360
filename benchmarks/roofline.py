"""FLOP per patch, the machine's measured peak, and how much of it each model uses (MFU).

    python benchmarks/roofline.py                        # the defaults for this machine
    python benchmarks/roofline.py --models=unet_resnet18 --patch=256 --batch=32 --dtype=bfloat16

For each model: parameters, forward GFLOP per patch (`models.forward_gflops`: 2 x the
multiply-adds of every convolution and matrix product counted from the jaxpr, kernel taps over
zero padding included, element-wise work not; BatchNorm in eval mode), the jitted forward's and the jitted training step's throughput, and those
throughputs as a fraction of the peak measured in the same run (a large jitted matmul in fp32
and in bf16, median of several calls). Convention: one training step costs 3 x forward FLOP
(forward + backward, the backward being ~2 x forward); XLA's own count (cost analysis) of the
compiled training step is reported next to it. MFU = patches/s x FLOP per patch / peak FLOP/s of the compute
dtype. Prediction: voxels/s of bonejax's predictor with a 3-plane soft vote on a volume, and its
"useful" FLOP/s = voxels/s x 3 x forward FLOP per patch / patch pixels (tile overlap and padding
are counted as waste).

Defaults: on a GPU, bf16, 256 px, batch 32, a 512^3 prediction volume; on a CPU, fp32, 128 px,
batch 4 and a 64 x 128 x 128 volume (a CPU cannot predict 512^3 in benchmark time).
Writes benchmarks/results/roofline_<machine>.{json,md}.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402
from bonejax.cli import runner  # noqa: E402
from bonejax.core import errors
from bonejax.core.progress import Progress

MODELS = ("unet", "unet_resnet18", "unet_resnet34", "unetpp_resnet18", "deeplabv3plus_resnet18",
          "segformer_b0")

_MODELS = flags.DEFINE_list("models", list(MODELS), "Models to measure.")
_PATCH = flags.DEFINE_integer("patch", 0, "Patch side (0 = 256 on GPU, 128 on CPU).")
_BATCH = flags.DEFINE_integer("batch", 0, "Batch size (0 = 32 on GPU, 4 on CPU).")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                           "Compute dtype of the models (auto = bf16 on GPU, fp32 on CPU).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls first (compilation included).")
_MATMUL_N = flags.DEFINE_integer("matmul_n", 0, "Peak matmul side (0 = 8192 GPU, 2048 CPU).")
_TRAIN = flags.DEFINE_bool("train", True, "Measure the training step too.")
_PREDICT_MODEL = flags.DEFINE_string("predict_model", "unet_resnet18",
                                     "Model for the prediction measurement ('' = skip).")
_PREDICT_VOLUME = flags.DEFINE_string("predict_volume", "",
                                      "Z,Y,X of the prediction volume (default by machine).")
_TAG = flags.DEFINE_string("tag", "", "Machine tag of the result files (default: detected).")
_RESULTS = flags.DEFINE_string("results_dir", str(common.RESULTS), "Where result files go.")


def on_gpu() -> bool:
  import jax
  return jax.default_backend() != "cpu"


def measure_peak(n: int, repeats: int) -> dict:
  """TFLOP/s of a jitted (n x n) @ (n x n) matmul in fp32 (TF32 on NVIDIA GPUs) and bf16."""
  return common.matmul_peak(n, repeats)


def measure_model(name: str, patch: int, batch: int, dtype: str, peak: dict) -> dict:
  import jax
  import jax.numpy as jnp
  from bonejax import models

  row = {"model": name, "patch": patch, "batch": batch, "dtype": dtype}
  abstract = models.abstract_model(models.create, name, num_classes=3, in_channels=1,
                                   dtype=common.dtype_of(dtype))
  row["params"] = models.count_params(abstract)
  row["gflop_fwd"] = models.forward_gflops(abstract, patch, in_channels=1)
  row["gflop_train_3x"] = 3 * row["gflop_fwd"]
  peak_tflops = peak[dtype]["tflops"]

  x = jax.random.uniform(jax.random.key(1), (batch, patch, patch, 1), jnp.float32)
  y = jax.random.randint(jax.random.key(2), (batch, patch, patch), 0, 3)

  model = common.bonejax_model(name, dtype)
  forward, fstate = common.bonejax_forward(model)
  t0 = time.perf_counter()
  common.jax_sync(forward(fstate, x))
  row["forward_compile_s"] = time.perf_counter() - t0
  times = common.time_calls(lambda: forward(fstate, x), repeats=_REPEATS.value,
                            warmup=max(0, _WARMUP.value - 1), sync=common.jax_sync)
  row["fwd_patches_per_s"] = batch / common.median(times)
  row["fwd_rel_halfrange"] = common.spread(times)["rel_halfrange"]
  row["fwd_tflops"] = row["fwd_patches_per_s"] * row["gflop_fwd"] / 1e3
  row["fwd_mfu"] = row["fwd_tflops"] / peak_tflops
  del forward, fstate

  if _TRAIN.value:
    model = common.bonejax_model(name, dtype)
    step, state, row["train_step"] = common.bonejax_train_step(model)
    flops = common.xla_flops(step, state, x, y)
    row["gflop_train_xla"] = flops / batch / 1e9 if flops else None
    holder = {"state": state}

    def one_step():
      holder["state"], loss = step(holder["state"], x, y)
      return loss

    t0 = time.perf_counter()
    common.jax_sync(one_step())
    row["train_compile_s"] = time.perf_counter() - t0
    times = common.time_calls(one_step, repeats=_REPEATS.value,
                              warmup=max(0, _WARMUP.value - 1), sync=common.jax_sync)
    row["train_patches_per_s"] = batch / common.median(times)
    row["train_rel_halfrange"] = common.spread(times)["rel_halfrange"]
    row["train_tflops"] = row["train_patches_per_s"] * row["gflop_train_3x"] / 1e3
    row["train_mfu"] = row["train_tflops"] / peak_tflops
    del step, state, holder
  return row


def measure_prediction(name: str, shape: tuple[int, int, int], patch: int, batch: int,
                       dtype: str, gflop_fwd: float, peak: dict, workdir: Path) -> dict:
  """Voxels/s of bonejax's predictor (3-plane soft vote) on a phantom scan."""
  from benchmarks.peers import bonejax_job
  scan = bonejax_job.ensure_scan(workdir / "data", shape)
  res = bonejax_job.predict_scan_timed(scan, name, patch=patch, batch=batch, dtype=dtype,
                                       workdir=workdir, runs=2)
  vps = res["voxels_per_second"]
  useful = vps * 3 * gflop_fwd * 1e9 / patch**2
  return {"model": name, "volume": list(shape), "patch": patch, "batch": batch, "dtype": dtype,
          "voxels_per_second": vps, "seconds": res["seconds"], "cold_seconds": res["cold_seconds"],
          "mode": res.get("mode"), "useful_tflops": useful / 1e12,
          "mfu": useful / 1e12 / peak[dtype]["tflops"], "api": res.get("api")}


def main(argv):
  del argv
  import jax
  gpu = on_gpu()
  patch = _PATCH.value or (256 if gpu else 128)
  batch = _BATCH.value or (32 if gpu else 4)
  dtype = _DTYPE.value if _DTYPE.value != "auto" else ("bfloat16" if gpu else "float32")
  n = _MATMUL_N.value or (8192 if gpu else 2048)
  for m in _MODELS.value:
    if m not in MODELS and not m.startswith(("unet", "deeplab", "segformer")):
      raise errors.UserError(f"unknown model {m!r}")
  load_start = common.load_average()
  print(f"roofline on {jax.default_backend()}: patch {patch}, batch {batch}, {dtype}",
        file=sys.stderr)
  peak = measure_peak(n, max(3, _REPEATS.value))
  print(f"peak: fp32 {peak['float32']['tflops']:.3g} TFLOP/s, "
        f"bf16 {peak['bfloat16']['tflops']:.3g} TFLOP/s (matmul {n}^2)", file=sys.stderr)

  rows, failures = [], {}
  bar = Progress(total=len(_MODELS.value), desc="roofline", unit="models", every_s=0)
  for name in _MODELS.value:
    try:
      rows.append(measure_model(name, patch, batch, dtype, peak))
    except Exception as e:  # pylint: disable=broad-except
      failures[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      print(f"{name} failed: {failures[name]}", file=sys.stderr)
      if os.environ.get("BONEJAX_DEBUG"):
        traceback.print_exc()
    bar.update(1)
  bar.close()

  prediction = None
  if _PREDICT_MODEL.value:
    vol = (errors.parse_ints(_PREDICT_VOLUME.value, 3, "predict_volume") if _PREDICT_VOLUME.value
           else ((512, 512, 512) if gpu else (64, 128, 128)))
    gflop = next((r["gflop_fwd"] for r in rows if r["model"] == _PREDICT_MODEL.value), None)
    if gflop is None:
      from bonejax import models
      gflop = models.forward_gflops(models.abstract_model(
          models.create, _PREDICT_MODEL.value, num_classes=3, in_channels=1), patch, 1)
    import tempfile
    with tempfile.TemporaryDirectory(prefix="bonejax-roofline-") as tmp:
      try:
        prediction = measure_prediction(_PREDICT_MODEL.value, vol, patch, batch, dtype, gflop,
                                        peak, Path(tmp))
      except Exception as e:  # pylint: disable=broad-except
        failures["predict"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(f"prediction failed: {failures['predict']}", file=sys.stderr)

  info = common.machine()
  tag = _TAG.value or info["tag"]
  cols = ["model", "params", "gflop_fwd", "gflop_train_xla", "fwd_patches_per_s", "fwd_mfu",
          "train_patches_per_s", "train_tflops", "train_mfu"]
  heads = ["model", "params", "GFLOP fwd/patch", "GFLOP train/patch (XLA)", "fwd patches/s",
           "fwd MFU", "train patches/s", "train TFLOP/s (3x fwd)", "train MFU"]
  table = common.markdown_table(rows, cols, heads)
  lines = [f"# Roofline: {tag}", "", common.machine_line(info), "",
           f"Load average at start / end: {load_start} / {common.load_average()}.", "",
           f"Peak (jitted {n}x{n} matmul, median): fp32 {peak['float32']['tflops']:.3g} TFLOP/s,"
           f" bf16 {peak['bfloat16']['tflops']:.3g} TFLOP/s.", "",
           f"Models in {dtype}, patch {patch} px, batch {batch}; MFU against the {dtype} peak. "
           "Training FLOP = 3 x forward (convention); XLA's count of the compiled step shown "
           "for comparison.", "", table]
  if prediction:
    lines += ["", f"Prediction ({prediction['model']}, 3-plane soft vote, volume "
              f"{'x'.join(map(str, prediction['volume']))}, {prediction['api']}): "
              f"{prediction['voxels_per_second']:,.0f} voxels/s, useful "
              f"{prediction['useful_tflops']:.3g} TFLOP/s = MFU {prediction['mfu']:.3g}."]
  if any((r.get("fwd_mfu") or 0) > 1 or (r.get("train_mfu") or 0) > 1 for r in rows):
    lines += ["", "MFU > 1: the peak matmul was slowed (machine load, or a matmul too small for "
              "this machine); rerun on an idle machine or with a larger --matmul_n."]
  if failures:
    lines += ["", "Failed: " + "; ".join(f"{k}: {v}" for k, v in failures.items())]
  md = "\n".join(lines)
  print(md)
  payload = {"peak": peak, "patch": patch, "batch": batch, "dtype": dtype, "rows": rows,
             "prediction": prediction, "failures": failures,
             "flop_convention": "forward counted from the jaxpr (2 FLOP per multiply-add of "
                                "every conv and matmul, padding taps included, eval-mode BN); "
                                "training = 3 x forward; gflop_train_xla = XLA cost analysis",
             "load_average": {"start": load_start, "end": common.load_average()},
             "machine": info}
  paths = common.write_results("roofline", payload, md, tag=tag, results_dir=_RESULTS.value)
  return {"json": paths["json"], "md": paths["md"], "models": len(rows),
          "failed": sorted(failures)}


if __name__ == "__main__":
  runner.run(main)
