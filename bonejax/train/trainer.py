"""The training loop: config -> mesh -> data -> model -> sharded jitted step -> checkpoints.

`train(config, workdir)` runs `_train`, one flat function cut into sections (big_vision's
train.py shape): read it top to bottom. launch/train.py, launch/demo.py and bonejax/crossval.py
call it. Validation lives in evaluator.py, the best model in best.py.

Performance choices (written for GPUs, checked on CPU):
- The model is split into (graphdef, params, rest) once; the step is a pure function of a plain
  pytree, jitted with the state donated, so params and optimiser state are updated in place.
- Compute runs in `config.dtype` (bf16 on GPUs); parameters, BatchNorm statistics, the loss and
  the optimiser stay float32.
- Batches are sharded over the 'data' mesh axis, state is replicated: XLA makes the gradient and
  BatchNorm reductions global. Augmentation runs inside the step, on the device.
- The patches are cut on the devices from training scans held in their memory when the scans
  fit (config.sampler, bonejax/data/feed.py): a step then sends only 5 integers per patch.
- Nothing is fetched from the device per step: the loss is fetched every `log_every` steps, the
  validation confusion matrix once per evaluation. The host may run at most two steps ahead
  (it waits on the loss of step s-2, without transferring it).
- Exact resume: the step's augmentation key is fold_in(seed, step), the patch stream's state is
  one position, the plateau/best/early-stopping state is saved with the weights.
  Bit-exact on the same backend and jax/jaxlib version only: the keys are "rbg" (XLA's
  RngBitGenerator, `rng_key`), whose bits JAX does not promise across backends or versions.
  Resuming elsewhere (a CPU run resumed on a GPU, after a jax upgrade) is a valid continuation
  with other augmentation draws and initial weights that are the checkpoint's, not a replay.
  Kept deliberately: threefry would make the draws portable but multiplies compile time (below),
  and no result of bonejax depends on replaying a run across machines.
- Pretrained starts (`model.init_from`, `model.encoder_weights`) only shape the state at step 0
  (pretrained.py); `model.freeze_encoder_steps` holds the encoder still inside the step.
- 2.5D (`context_slices` = k): the model takes 2k + 1 planes as channels, stacked by the data
  path (bonejax/data/context.py) and recorded in the bundle for the predictor.
- A clean stop (`stop_on_signal`, launch/train.py): SIGINT / SIGTERM end the loop after the
  current step with a checkpoint there (stop.py).

What a crash or a bad input leaves (see also checkpoint.py, best.py, rundir.py):
- every config value is checked before anything is written; config.json and split.json are
  written once the config is known to fit the run already in WORKDIR;
- the newest checkpoint that reads is resumed (a damaged one is reported and moved aside);
- WORKDIR/model is always exported from the best checkpoint (WORKDIR/best), never from live
  state, and re-exported at resume and finish when it is missing or stale;
- a run that fails before its first checkpoint removes what it created.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from bonejax import models
from bonejax.core import errors, jsonable, outputs
from bonejax.core.progress import Progress
from bonejax.data import store
from bonejax.models import bundle
from bonejax.data import feed as feed_lib
from bonejax.data import patches, splits
from bonejax.train import augment as augment_lib
from bonejax.train import best as best_lib
from bonejax.train import configlib, curves, losses, optim, pretrained, rundir
from bonejax.train import evaluator as evaluator_lib
from bonejax.train import mesh as mesh_lib
from bonejax.train.checkpoint import Checkpoints
from bonejax.train.stop import StopRequest

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
BEST_METRICS = {"miou_fg": "max", "miou_all": "max", "loss": "min"}
_JITTED: dict[str, tuple[Callable, Callable, Callable]] = {}


# ---------------------------------------------------------------------------------------------
# The pure step functions (also used directly by the tests).
# ---------------------------------------------------------------------------------------------


def rng_key(seed: int, stream: int) -> jax.Array:
  # "rbg" keys: XLA's RngBitGenerator compiles in a fraction of threefry's time (a tiny U-Net's
  # initialiser: 3 s instead of 26 s on a CPU), and its values were checked to be the same on
  # 1 and 4 devices (tests/test_distributed.py). Its bits may change with the backend or the
  # jax version: resume is bit-exact on one machine type only (module docstring).
  return jax.random.fold_in(jax.random.key(seed, impl="rbg"), stream)


def make_init(create: Callable, tx: optax.GradientTransformation, seed: int) -> Callable:
  """(weights=None) -> the initial train state; `create(rngs=...)` builds the model, and
  `weights` ({state path: array}, pretrained.initial_weights) replaces some of its values."""

  def init_fn(weights=None):
    model = create(rngs=nnx.Rngs(rng_key(seed, 0)))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    if weights:
      params, rest = pretrained.overlay(params, weights), pretrained.overlay(rest, weights)
    return {"params": params, "rest": rest, "opt": tx.init(params),
            "step": jnp.zeros((), jnp.int32)}

  return init_fn


def make_train_step(graphdef, tx: optax.GradientTransformation, loss_fn: Callable,
                    augment_cfg: Any, seed: int, schedule: optax.Schedule | None = None,
                    freeze_encoder_steps: int = 0) -> Callable:
  """(state, batch, lr_scale) -> (state, metrics); state = dict(params, rest, opt, step).

  For the first `freeze_encoder_steps` steps the encoder's parameters and their optimiser
  state keep their values (pretrained.freeze)."""
  aug = augment_lib.resolve_config(augment_cfg)

  def step_fn(state, batch, lr_scale):
    step = state["step"]
    image, label = augment_lib.augment(jax.random.fold_in(rng_key(seed, 1), step),
                                       batch["image"], batch["label"], aug)

    def loss_of(params):
      model = nnx.merge(graphdef, params, state["rest"], copy=True)
      logits = model(image)
      loss, parts = loss_fn(logits, label)
      _, _, rest = nnx.split(model, nnx.Param, ...)  # BatchNorm statistics, updated in train mode
      return loss, (parts, rest)

    (loss, (parts, rest)), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], optim.scale_updates(updates, lr_scale))
    if freeze_encoder_steps:
      frozen = step < freeze_encoder_steps
      params = pretrained.freeze(params, state["params"], frozen)
      opt = pretrained.freeze(opt, state["opt"], frozen)
    out = {"loss": loss, "grad_norm": optax.tree.norm(grads),
           **{f"loss_{k}": v for k, v in parts.items()}}
    if schedule is not None:
      out["lr"] = schedule(step) * lr_scale
    return {"params": params, "rest": rest, "opt": opt, "step": step + 1}, out

  return step_fn


def _better(value: float | None, best: float | None, mode: str) -> bool:
  if value is None or not math.isfinite(value):
    return False
  if best is None:
    return True
  return value > best if mode == "max" else value < best


def resolve_dataset(config, workdir: Path) -> Path:
  """The configured dataset; or, with none given and `phantom.num_scans`, WORKDIR/data."""
  if config.dataset:
    return errors.require_exists(config.dataset, "dataset")
  ph = config.phantom
  if not ph or int(ph.num_scans) < 1:
    raise errors.UserError("no dataset given: set --config.dataset=DATA (a dataset directory)")
  path = workdir / "data"
  if not (path / store.DATASET_JSON).exists():
    if jax.process_index() == 0:
      from bonejax import phantom
      phantom.make_dataset(path, num_scans=int(ph.num_scans), shape=tuple(ph.shape),
                           seed=int(ph.seed), kind=str(ph.kind), overwrite=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("bonejax_phantom")
  return path


def training_voxel_size(dataset: store.Dataset, scans) -> list[float] | None:
  """The (Z, Y, X) voxel size in um the training scans share, for model.json: the predictor
  resamples inputs of another voxel size to it. None (with a warning) when the scans differ."""
  from bonejax.io import resample
  sizes = []
  for name in scans:
    attrs = store.read_group_attrs(dataset.scan_path(name))
    v = attrs.get("voxel_size_zyx_um", attrs.get("voxel_size_um"))
    try:
      sizes.append(resample.as_zyx(v) if v is not None else None)
    except errors.UserError:
      sizes.append(None)
  if not sizes or any(v is None for v in sizes):
    return None
  if all(resample.same_size(v, sizes[0]) for v in sizes):
    return [float(x) for x in sizes[0]]
  print(f"[train] note: the training scans have different voxel sizes ({sorted(set(sizes))} "
        "um); the bundle records none, so predict.py will not resample inputs", file=sys.stderr)
  return None


def _user(fn, what: str):
  """Runs fn(), turning ValueError/TypeError (bad config values) into one-line user errors."""
  try:
    return fn()
  except (ValueError, TypeError) as e:
    raise errors.UserError(f"{what}: {e}") from None


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, devices=None,
          stop_on_signal: bool = False) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its newest readable checkpoint; the result.

  A run that fails before its first checkpoint removes what it created in `workdir`. With
  `stop_on_signal` (main thread only), SIGINT / SIGTERM stop it cleanly after the current step
  (`"stopped": "signal"`); a second signal raises KeyboardInterrupt.
  """
  workdir = Path(workdir).absolute()
  with StopRequest().installed(stop_on_signal) as stop, \
      rundir.removed_on_failure(workdir, lambda: rundir.has_checkpoint(workdir),
                                enabled=jax.process_index() == 0), \
      contextlib.ExitStack() as closers:  # checkpoint writers, readers: closed first
    return _train(config, workdir, devices, closers, stop)


def _train(c: ml_collections.ConfigDict, workdir: Path, devices,
           closers: contextlib.ExitStack, stop: StopRequest) -> dict[str, Any]:
  t_start = time.perf_counter()
  primary = jax.process_index() == 0

  # ---- Config: every value checked before anything is read or written ---------------------
  configlib.check(c)
  if c.dtype not in DTYPES:
    raise errors.UserError(f"dtype={c.dtype!r}; known: {', '.join(DTYPES)}")
  if c.best_metric not in BEST_METRICS:
    raise errors.UserError(f"best_metric={c.best_metric!r}; known: {', '.join(BEST_METRICS)}")
  num_steps, batch_size = int(c.num_steps), int(c.batch_size)
  if int(c.patch_size) % models.STRIDE:
    raise errors.UserError(f"patch_size={c.patch_size} must be a positive multiple of "
                        f"{models.STRIDE}")
  loss_fn = _user(lambda: losses.make_loss(c.loss), "loss")
  schedule = _user(lambda: optim.make_schedule(c.schedule, float(c.optimizer.lr), num_steps),
                   "schedule")
  tx = _user(lambda: optim.make_optimizer(c.optimizer, schedule), "optimizer")
  plateau = _user(lambda: optim.plateau_from_config(c.schedule), "schedule")
  augment_cfg = augment_lib.resolve_config(c.augment)
  pretrained.check_config(c.model)
  context = int(c.context_slices)
  in_channels = 2 * context + 1 if context else int(c.in_channels)
  log_every = max(1, int(c.log_every))
  eval_every, ckpt_every = int(c.eval_every), int(c.checkpoint_every)
  stop_after = int(c.stop_after)

  # ---- Mesh ---------------------------------------------------------------------------------
  mesh = mesh_lib.make_mesh(devices)
  data_sharding, repl = mesh_lib.data_sharding(mesh), mesh_lib.replicated(mesh)
  mesh_lib.check_batch_size(batch_size, mesh)
  val_batch = int(c.val_batch_size) or batch_size
  mesh_lib.check_batch_size(val_batch, mesh, "val_batch_size")

  # ---- Data and split -----------------------------------------------------------------------
  dataset_path = resolve_dataset(c, workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  dataset = store.open_dataset(dataset_path)
  classes, num_classes = dataset.classes, dataset.num_classes
  split = splits.make_split(dataset.scans, configlib.names(c.train_scans),
                            configlib.names(c.val_scans), float(c.val_fraction), int(c.seed))
  split_file = workdir / "split.json"
  if split_file.exists() and rundir.has_checkpoint(workdir):
    old = splits.load_split(split_file)
    if (old.train, old.val) != (split.train, split.val):
      raise errors.UserError(f"{workdir} holds a run with another split ({split_file}); use a "
                          "fresh --workdir")

  # ---- Model and optimizer ------------------------------------------------------------------
  model_name, model_kwargs = str(c.model.name), dict(c.model.get("kwargs", {}) or {})
  freeze_steps = int(c.model.get("freeze_encoder_steps", 0) or 0)
  dtype = DTYPES[c.dtype]
  create = functools.partial(models.create, model_name, num_classes=num_classes,
                             in_channels=in_channels, dtype=dtype,
                             param_dtype=jnp.float32, **model_kwargs)
  abstract = _user(lambda: nnx.eval_shape(lambda: create(rngs=nnx.Rngs(rng_key(int(c.seed), 0)))),
                   "model")
  graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)
  lowering = str(c.get("conv_lowering", "xla"))
  if lowering != "xla":
    # The same variables, the convolutions computed as the policy says (bf16 dot products on
    # CPUs with native bf16 dots): the state tree, checkpoints and bundles are unchanged.
    from bonejax.models import inference_graph
    lowered = nnx.eval_shape(lambda: inference_graph.lower_convs(
        create(rngs=nnx.Rngs(rng_key(int(c.seed), 0))), policy=lowering))
    graphdef, _, _ = nnx.split(lowered, nnx.Param, ...)
  # Validation runs the inference graph predict.py will run (BatchNorm folded into the
  # convolutions, folded from the current weights inside the jitted step), or the eval view.
  eval_graph = str(c.get("eval_graph", "auto"))
  fold = None
  if eval_graph != "off":
    from bonejax.models import inference_graph
    s = models.STRIDE
    graphdef_eval, fold = inference_graph.make_folder(
        bundle.eval_view(abstract), policy=eval_graph, sample_shape=(1, s, s, in_channels))
  else:
    graphdef_eval, _, _ = nnx.split(bundle.eval_view(abstract), nnx.Param, ...)

  # ---- Sharding, initial state, update and evaluation steps ---------------------------------
  # The jitted functions depend only on these values: runs in one process that share them
  # (cross-validation folds, tests) share the compiled executables.
  jit_key = json.dumps([num_classes, int(num_steps), [d.id for d in mesh.devices.flat],
                        {k: jsonable.to_jsonable(c.to_dict().get(k)) for k in (
                            "model", "in_channels", "dtype", "seed", "loss", "optimizer",
                            "schedule", "augment", "context_slices", "conv_lowering",
                            "eval_graph")}], sort_keys=True)
  if jit_key not in _JITTED:
    _JITTED.clear()  # keep one set: executables hold device memory
    _JITTED[jit_key] = (
        # Parameters are created directly on the devices, replicated (no host copy).
        jax.jit(make_init(create, tx, int(c.seed)), out_shardings=repl),
        jax.jit(make_train_step(graphdef, tx, loss_fn, augment_cfg, int(c.seed), schedule,
                                freeze_steps),
                in_shardings=(repl, data_sharding, repl), out_shardings=(repl, repl),
                donate_argnums=(0,)),
        jax.jit(evaluator_lib.make_eval_step(graphdef_eval, loss_fn, num_classes, fold),
                in_shardings=(repl, data_sharding, repl), out_shardings=repl,
                donate_argnums=(2,)))
  init_fn, train_step, eval_step = _JITTED[jit_key]
  state_shape = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
                             jax.eval_shape(init_fn))
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state_shape["params"]))

  # ---- Checkpoint: resume from the newest readable one --------------------------------------
  fingerprint = configlib.fingerprint(c)
  fingerprint["dataset"] = str(dataset_path)

  def same_run(saved: dict[str, Any]) -> None:
    old = configlib.normalize_fingerprint(saved.get("fingerprint") or {})
    changed = sorted(k for k in fingerprint if json.dumps(old.get(k), sort_keys=True) !=
                     json.dumps(fingerprint[k], sort_keys=True))
    if changed:
      raise errors.UserError(f"{workdir} holds a run whose {', '.join(changed)} differ(s) from "
                          "this config; use a fresh --workdir (num_steps, eval/checkpoint "
                          "intervals and early stopping may change)")

  host: dict[str, Any] = {"step": 0, "seed": int(c.seed), "data": None,
                          "plateau": plateau.get_state(), "best": None, "best_step": None,
                          "best_scores": None, "bad_evals": 0, "last_eval_step": None,
                          "last_scores": None, "stopped": None, "fingerprint": fingerprint}
  ckpts = Checkpoints(workdir / "checkpoints", keep=int(c.keep_checkpoints))
  closers.callback(ckpts.close)  # waits for the async writes (also when interrupted)
  restored = ckpts.restore_newest(state_shape, check=same_run)
  if restored is None:
    weights = pretrained.initial_weights(
        c.model, abstract=abstract, model_name=model_name, model_kwargs=model_kwargs,
        classes=classes, in_channels=in_channels, context_slices=context,
        normalization=str(c.normalization))
    # Every process read the same file: the values are placed replicated, like the state.
    resumed_from, state = None, (init_fn(jax.device_put(weights, repl)) if weights
                                 else init_fn())
  else:
    resumed_from, state, host = restored
    plateau.set_state(host["plateau"])
  start = int(host["step"])
  lr_scale = jax.device_put(np.float32(plateau.scale), repl)
  # The run's record: written only now that this config is known to fit the run in WORKDIR.
  if primary:
    splits.save_split(split_file, split)
    resolved = c.to_dict()
    resolved["dataset"] = str(dataset_path)
    outputs.atomic_write_json(workdir / "config.json", resolved)
  log_file = curves.MetricsLog(workdir / "metrics.csv", classes, resumed_from, enabled=primary)

  # ---- Best model: its own checkpoint, and WORKDIR/model exported from it -------------------
  meta = bundle.make_meta(
      model_name=model_name, model_kwargs=model_kwargs, classes=classes,
      in_channels=in_channels, context_slices=context, normalization=str(c.normalization),
      patch_size=int(c.patch_size), train_axes=list(c.axes), val_scans=list(split.val),
      train_scans=list(split.train), train_dtype=str(c.dtype),
      voxel_size_um=training_voxel_size(dataset, split.train))
  best = best_lib.BestModel(workdir / "best", workdir / "model", best_lib.weights_of(state_shape),
                            meta, primary)
  closers.callback(best.close)
  best.resume(resumed_from, host, state)

  # ---- Input --------------------------------------------------------------------------------
  # The records (and so the batches) are the patch stream's either way; config.sampler decides
  # who cuts them: the host, or the devices from scans held in their memory (feed.py).
  stream = patches.PatchStream(
      dataset_path, split.train, patch_size=int(c.patch_size), global_batch_size=batch_size,
      axes=tuple(c.axes), patches_per_plane=int(c.patches_per_plane),
      oversample_rare=float(c.oversample_rare), seed=int(c.seed),
      normalization=str(c.normalization), process_index=jax.process_index(),
      process_count=jax.process_count(), context_slices=context)
  train_feed = feed_lib.make_feed(
      str(c.sampler), stream, mesh, lambda b: mesh_lib.put_batch(b, data_sharding, batch_size),
      budget_mb=int(c.sampler_device_mb))
  closers.callback(train_feed.close)
  if host["data"]:
    train_feed.set_state(host["data"])

  # ---- Evaluator ----------------------------------------------------------------------------
  # Each process holds its own rows of every validation batch.
  val_args = dict(crop=int(c.val_crop) or None, axes=tuple(c.val_axes), batch_size=val_batch,
                  stride=int(c.val_stride), context_slices=context)
  evaluate = evaluator_lib.Evaluator(
      eval_step,
      lambda: patches.validation_batches(dataset_path, split.val,
                                         normalization=str(c.normalization), **val_args),
      lambda b: mesh_lib.put_batch(mesh_lib.local_rows(b, val_batch), data_sharding, val_batch),
      nbytes=patches.validation_nbytes(dataset_path, split.val, **val_args),
      max_device_bytes=int(c.val_device_limit_mb) << 20, classes=classes, replicated=repl)

  # ---- Loop ---------------------------------------------------------------------------------
  mode = BEST_METRICS[c.best_metric]
  step = start
  pending_losses: list[jax.Array] = []
  in_flight: collections.deque = collections.deque()
  progress = Progress(total=max(num_steps - start, 0), desc="train", unit="steps")
  if primary:
    print(f"[train] patches cut by: {train_feed.kind}", file=progress.stream, flush=True)
  t_log, t_eval, t_first, evals_time = time.perf_counter(), 0.0, None, 0.0
  timed_steps, steps_at_first = 0, start
  extra = ""
  stopped = host.get("stopped")
  if stopped in ("stop_after", "signal"):
    stopped = None  # a preempted or interrupted run continues ...
  if stop_after and start >= stop_after:
    stopped = "stop_after"  # ... unless this call stops there too
  while step < num_steps and stopped is None:
    batch = next(train_feed)
    with jax.transfer_guard("disallow"):  # the step itself never moves data to or from the host
      state, out = train_step(state, batch, lr_scale)
    step += 1
    pending_losses.append(out["loss"])
    last_lr = out["lr"]
    in_flight.append(out["loss"])
    if len(in_flight) > 2:  # bound how far the host runs ahead, without a transfer
      in_flight.popleft().block_until_ready()
    timed_steps += 1
    if t_first is None:
      jax.block_until_ready(out["loss"])  # compile time is not throughput
      t_first = t_log = time.perf_counter()
      t_eval, timed_steps, steps_at_first = 0.0, 0, step

    row: dict[str, Any] = {}
    if step % log_every == 0 or step == num_steps:
      fetched, lr = jax.device_get((pending_losses, last_lr))
      loss, lr = float(np.mean(fetched)), float(lr)
      now = time.perf_counter()
      dt = now - t_log - t_eval
      rate = timed_steps * batch_size / dt if dt > 0 and timed_steps else float("nan")
      row.update(step=step, loss=loss, lr=lr, patches_per_s=rate)
      extra = f"loss {loss:.4f} lr {lr:.3g} {rate:.1f} patches/s"
      pending_losses, t_log, t_eval, timed_steps = [], now, 0.0, 0
      if not math.isfinite(loss):
        stopped = "nan"

    improved = False
    if (eval_every and step % eval_every == 0) or step == num_steps or stopped == "nan":
      t0 = time.perf_counter()
      ev = evaluate(state)
      host["last_eval_step"], host["last_scores"] = step, ev
      value = ev["loss"] if c.best_metric == "loss" else ev[c.best_metric]
      if _better(value, host["best"], mode):
        host["best"], host["best_step"], host["best_scores"] = value, step, ev
        host["bad_evals"] = 0
        improved = True
      else:
        host["bad_evals"] += 1
      if plateau.update(ev["loss"]):
        lr_scale = jax.device_put(np.float32(plateau.scale), repl)
        logging_line = f"[train] step {step}: validation loss plateaued, lr x{plateau.scale:g}"
        print(logging_line, file=progress.stream, flush=True)
      row.update(step=step, val_loss=ev["loss"], val_miou_all=ev["miou_all"],
                 val_miou_fg=ev["miou_fg"],
                 **{f"val_iou_{k}": v for k, v in zip(classes, ev["iou"])})
      patience = int(c.early_stopping_patience)
      if patience > 0 and host["bad_evals"] >= patience and stopped is None:
        stopped = "early_stopping"
      dt = time.perf_counter() - t0
      t_eval += dt
      evals_time += dt
      print(f"[eval] step {step}: val loss {ev['loss']:.4f} miou_all {ev['miou_all']:.4f} "
            f"miou_fg {ev['miou_fg']:.4f} ({dt:.1f}s)", file=progress.stream, flush=True)

    if stop_after and step >= stop_after and stopped is None:
      stopped = "stop_after"
    if stopped is None and stop.should_stop(step, log_every, jax.process_count()):
      stopped = "signal"  # a checkpoint at this step follows
    host.update(step=step, data=train_feed.get_state(), plateau=plateau.get_state(),
                stopped=stopped)
    log_file.append(row)
    if (ckpt_every and step % ckpt_every == 0) or step == num_steps or stopped or improved:
      t0 = time.perf_counter()
      ckpts.save(step, state, host)  # returns once the arrays are on the host: safe to donate
      if improved:  # the latest checkpoint that names this step best exists before the best
        ckpts.wait()
        best.save(step, state, host["best_scores"])
      t_eval += time.perf_counter() - t0
    progress.update(1, extra)

  # ---- Finish -------------------------------------------------------------------------------
  ckpts.wait()
  if host["best_step"] is None and not best.steps():  # no finite score: the last state stands in
    best.save(step, state, host.get("last_scores"))
  best.sync()

  progress.close()
  if stopped == "signal" and primary:
    print(f"[train] stopped by {stop.name or 'a signal'} after step {step}, checkpoint "
          "written; the same command resumes", file=progress.stream, flush=True)
  if primary and (workdir / "metrics.csv").exists():
    try:
      curves.plot(workdir / "metrics.csv", workdir / "curves.png", f"val_{c.best_metric}")
    except Exception as e:  # pylint: disable=broad-except  (a plot never fails a run)
      print(f"[train] could not draw curves.png: {e}", file=progress.stream)
  trained = step - start
  timed = (step - steps_at_first) if t_first is not None else 0
  loop_s = (time.perf_counter() - t_first - evals_time) if t_first is not None else 0.0
  best_scores = host.get("best_scores") or {}
  return {
      "workdir": workdir,
      "steps": step,
      "best_val_miou": best_scores.get("miou_fg"),
      "best_step": host["best_step"],
      "best_metric": c.best_metric,
      "best_val": best_scores,
      "final_val": host.get("last_scores"),
      "stopped": stopped or "num_steps",
      "resumed_from": resumed_from,
      "steps_this_run": trained,
      "seconds": time.perf_counter() - t_start,
      "patches_per_second": timed * batch_size / loop_s if timed > 0 and loop_s > 0 else None,
      "sampler": train_feed.kind,
      "model_dir": workdir / "model",
      "dataset": dataset_path,
      "split": {"train": split.train, "val": split.val},
      "classes": classes,
      "model": model_name,
      "params": num_params,
      "devices": jax.device_count(),
      "processes": jax.process_count(),
  }
