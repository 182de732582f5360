"""One measured job of bonejax, in its own process (run by compare.py); the peer of monai_job.py.

    python benchmarks/peers/bonejax_job.py --job=train --scan=DATA/scan_000 --patch=256 --batch=16
    python benchmarks/peers/bonejax_job.py --job=predict --scan=DATA/scan_000 --batch=16

Training: `models.create("unet_resnet18")` and the trainer's own jitted step
(`bonejax.train.trainer.make_train_step`: Adam, cross-entropy, augmentation off, constant
learning rate) on batches cycled from the same in-memory patch pool the peer uses
(benchmarks/peers/volume.py). Prediction: `bonejax.predict.predict_volume` with planes=3,
vote=soft on the raw scan (normalisation inside the jitted plane function), whole planes per
call (bonejax's way; the peer tiles patches with sliding_window_inference).

`--variant`: fp32 | bf16 (compute dtype; parameters, loss and optimiser stay fp32), or for
prediction fp32_graph | bf16_graph: the same model through
`bonejax.models.inference_graph.build_inference_model` (BatchNorm folded, convolutions lowered
per layer by the `auto` rule, as `predict.py --inference_graph=auto`, its default: oneDNN where
the extension is present) handed to the predictor with its dtype left alone.

`--bundle=DIR`: the weights come from a saved bundle (`ensure_bundle`), read as `predict.py`
reads them (abstract model, then the stored arrays: no random initialisation to compile), so a
one-pass run in a fresh process (`--runs=1`) is what a user waits for on one scan: compare.py's
cold job. JAX's persistent compilation cache is set up as the commands set it up
(`bonejax.core.compile_cache`: on, unless BONEJAX_COMPILATION_CACHE=0; where BONEJAX_CACHE_DIR
points). The last stdout line is a JSON object (throughput, parameters, peak memory).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from absl import flags  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.peers import volume  # noqa: E402
from bonejax.cli import runner  # noqa: E402
from bonejax.core import compile_cache, errors, heap
from bonejax.data import store

VARIANTS = ("fp32", "bf16", "fp32_graph", "bf16_graph")
DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp32_graph": "float32",
         "bf16_graph": "bfloat16"}

if __name__ == "__main__":
  _JOB = flags.DEFINE_enum("job", "train", ["train", "predict"], "What to measure.")
  _SCAN = flags.DEFINE_string("scan", None, "Scan directory (zarr v3 group).")
  _MODEL = flags.DEFINE_string("model", "unet_resnet18", "bonejax model name.")
  _PATCH = flags.DEFINE_integer("patch", 256, "Training patch side in pixels.")
  _BATCH = flags.DEFINE_integer("batch", 16, "Training batch and prediction planes per call.")
  _STEPS = flags.DEFINE_integer("steps", 20, "Timed training steps.")
  _WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed training steps first (compile included).")
  _RUNS = flags.DEFINE_integer("runs", 2, "Prediction runs; the first (compiling) is 'cold'.")
  _VARIANT = flags.DEFINE_enum("variant", "fp32", VARIANTS, "Compute dtype.")
  _CLASSES = flags.DEFINE_integer("num_classes", 3, "Output classes.")
  _SEED = flags.DEFINE_integer("seed", 0, "Seed for weights and patch sampling.")
  _BUNDLE = flags.DEFINE_string("bundle", "", "Predict with the weights of this bundle "
                                "(`ensure_bundle`), loaded as predict.py loads them.")


def ensure_scan(data_dir: str | Path, shape, seed: int = 0, kind: str = "bone") -> Path:
  """DATA/scan_000 of a one-scan phantom dataset of `shape`, made once and reused."""
  data_dir = Path(data_dir)
  scan = data_dir / "scan_000"
  if store.is_scan(scan):
    found = tuple(store.open_scan(scan).shape)
    if found == tuple(shape):
      return scan
    raise errors.UserError(f"{scan} has shape {found}, not {tuple(shape)}; use another directory")
  try:
    from bonejax import phantom
  except ImportError:
    data_dir.mkdir(parents=True, exist_ok=True)
    return volume.synthetic_scan(scan, tuple(shape), seed)
  phantom.make_dataset(data_dir, num_scans=1, shape=tuple(shape), seed=seed, kind=kind,
                       overwrite=True, progress=False)
  return scan


def ensure_bundle(data_dir: str | Path, name: str, num_classes: int = 3, seed: int = 0) -> Path:
  """DATA/bundle_NAME: untrained `name` weights saved as a model bundle, made once and reused."""
  from bonejax.models import bundle
  path = Path(data_dir) / f"bundle_{name}_{num_classes}c_s{seed}"
  if (path / bundle.MODEL_JSON).exists():
    return path
  from flax import nnx
  from bonejax import models
  # weights drawn by numpy (untrained either way): no RNG kernels to compile
  model = models.fill_from_numpy(nnx.eval_shape(lambda: models.create(
      name, num_classes=num_classes, in_channels=1, rngs=nnx.Rngs(seed))), seed)
  meta = bundle.make_meta(model_name=name, model_kwargs={}, in_channels=1,
                          classes=["background", "bone", "pore", *map(str, range(3, num_classes))
                                   ][:num_classes],
                          normalization="percentile", patch_size=256, train_axes=[0, 1, 2])
  return bundle.save_bundle(path, model, meta)


def train_timed(name: str, image: np.ndarray, labels: np.ndarray | None, *, patch: int,
                batch: int, steps: int, warmup: int, dtype: str, seed: int = 0,
                num_classes: int = 3) -> dict:
  import jax
  import jax.numpy as jnp
  model = common.bonejax_model(name, dtype, num_classes=num_classes, seed=seed)
  step, state, source = common.bonejax_train_step(model, 1e-3)
  del model
  pool = volume.patch_pool(image, labels, patch, batch, num_batches=4, seed=seed,
                           num_classes=num_classes)
  pool = [(x[..., None], y) for x, y in pool]
  holder = {"state": state}

  def one(i: int):
    x, y = pool[i % len(pool)]
    holder["state"], loss = step(holder["state"], jnp.asarray(x), jnp.asarray(y))
    return loss

  t0 = time.perf_counter()
  for i in range(warmup):
    loss = one(i)
  jax.block_until_ready(loss)
  warmup_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for i in range(steps):
    loss = one(i)
  final_loss = float(loss)  # waits for the last step
  seconds = time.perf_counter() - t0
  return {"patches_per_second": steps * batch / seconds, "seconds": seconds, "steps": steps,
          "warmup_seconds": warmup_s, "final_loss": final_loss, "train_step": source}


def predict_timed(name: str, scan: store.Scan, *, batch: int, dtype: str, runs: int = 2,
                  seed: int = 0, num_classes: int = 3, memory_budget_gb: float = 16.0,
                  graph: bool = False, policy: str = "auto", bundle_dir: str = "") -> dict:
  """3-plane soft vote with bonejax.predict on the raw scan; first run cold, the rest warm.

  The memory budget is raised over the predictor's 4 GB default so that a 512^3 volume stays in
  memory, as the peer's does (`mode` in the result says which way it ran).
  """
  from bonejax import predict
  t0 = time.perf_counter()
  if bundle_dir:
    from bonejax.models import bundle
    model = bundle.load_bundle(bundle_dir, dtype=common.dtype_of(dtype)).model
  else:
    model = common.bonejax_model(name, dtype, num_classes=num_classes, seed=seed)
    model.eval()
  model_seconds = time.perf_counter() - t0
  if graph:  # the inference graph carries its own dtypes (float32 edges): none for the engine
    from bonejax.models import inference_graph
    model = inference_graph.build_inference_model(model, dtype=common.dtype_of(dtype),
                                                  policy=policy)
  engine = predict.make_engine(model, in_channels=1, batch_size=batch,
                               memory_budget_gb=memory_budget_gb)
  raw = scan.read_image()
  times, info = [], {}
  for _ in range(max(1, runs)):
    t0 = time.perf_counter()
    labels, info = predict.predict_volume(engine, raw, stats=scan.stats, planes=3, vote="soft",
                                          memory_budget_gb=memory_budget_gb, return_info=True)
    times.append(time.perf_counter() - t0)
  warm = times[1:] or times
  seconds = common.median(warm)
  return {"voxels_per_second": raw.size / seconds, "seconds": seconds, "run_seconds": times,
          "cold_seconds": times[0], "model_seconds": model_seconds, "api": "bonejax.predict.predict_volume(planes=3, soft)"
          + (f" on build_inference_model(policy={policy!r})" if graph else ""),
          "mode": info.get("mode"), "label_counts": np.bincount(labels.ravel()).tolist()}


def predict_scan_timed(scan_path: str | Path, name: str, *, patch: int, batch: int, dtype: str,
                       workdir: Path | None = None, runs: int = 2) -> dict:
  del patch, workdir  # whole planes: the patch only matters for training
  return predict_timed(name, store.open_scan(scan_path), batch=batch, dtype=dtype, runs=runs)


def main(argv):
  del argv
  if not _SCAN.value:
    raise errors.UserError("--scan is required")
  t_start = time.perf_counter()
  heap.setup()  # as the commands do, before JAX starts its threads
  cache_dir = compile_cache.setup()  # before anything compiles, as the commands do
  import jax
  from bonejax import models
  dtype = DTYPE[_VARIANT.value]
  scan = store.open_scan(_SCAN.value)
  params = models.count_params(models.abstract_model(
      models.create, _MODEL.value, num_classes=_CLASSES.value, in_channels=1))
  if _JOB.value == "train":
    if _VARIANT.value.endswith("_graph"):
      raise errors.UserError(f"--variant={_VARIANT.value}: the inference graph is for prediction")
    image, labels = volume.load_scan(_SCAN.value)
    result = train_timed(_MODEL.value, image, labels, patch=_PATCH.value, batch=_BATCH.value,
                         steps=_STEPS.value, warmup=_WARMUP.value, dtype=dtype, seed=_SEED.value,
                         num_classes=_CLASSES.value)
  else:
    result = predict_timed(_MODEL.value, scan, batch=_BATCH.value, dtype=dtype,
                           runs=_RUNS.value, seed=_SEED.value, num_classes=_CLASSES.value,
                           graph=_VARIANT.value.endswith("_graph"), bundle_dir=_BUNDLE.value)
  result.update({
      "framework": "bonejax", "job": _JOB.value, "variant": _VARIANT.value,
      "model": f"bonejax.{_MODEL.value}", "params": int(params), "patch": _PATCH.value,
      "batch": _BATCH.value, "volume": list(scan.shape), "device": jax.default_backend(),
      "jax": jax.__version__, "peak_rss_mb": common.peak_rss_mb(),
      "peak_device_mb": common.jax_peak_device_mb(),
      "compilation_cache": str(cache_dir) if cache_dir else None,
      "process_seconds": time.perf_counter() - t_start,
  })
  return result


if __name__ == "__main__":
  runner.run(main)
