"""Everything a training run needs before its first step, in the order it is needed.

`setup(config, workdir, ...)` returns a `Run`: checked settings, the mesh, the dataset and its
split, the model's graphs, the compiled init and update steps, the restored (or initial) state
with the host-side bookkeeping, the best-model store, the input feed, the evaluators and the
metric writers. Each stage is a function of its own; read `setup` top to bottom.

What a crash or a bad input leaves:
- every config value is checked before anything is read or written; config.json and split.json
  are written once the config is known to fit the run already in WORKDIR;
- the workdir is refused when it is, or lies inside, one of the run's inputs (the dataset, its
  scans, the bundle to start from), before anything is written there;
- the newest checkpoint that reads is resumed (a damaged one is reported and moved aside);
- WORKDIR/model is exported from the best checkpoint (WORKDIR/best), never from live state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from bonejax import models
from bonejax.core import errors, jsonable, memory_plan, outputs
from bonejax.data import feed as feed_lib
from bonejax.data import patches, splits, store
from bonejax.models import bundle
from bonejax.train import augment as augment_lib
from bonejax.train import best as best_lib
from bonejax.train import configlib, curves, evaluators, input3d, losses, optim, pretrained, rundir
from bonejax.train import step_memory
from bonejax.train import mesh as mesh_lib
from bonejax.train import tensorboard
from bonejax.train.checkpoint import HOST, Checkpoints
from bonejax.train.steps import DTYPES, StepCache, make_init, make_train_step, rng_key


def _user(fn, what: str):
  """Runs fn(), turning ValueError/TypeError (bad config values) into one-line user errors."""
  try:
    return fn()
  except (ValueError, TypeError) as e:
    raise errors.UserError(f"{what}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Settings: every config value checked before anything is read or written.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
  num_steps: int
  batch_size: int
  log_every: int
  checkpoint_every: int
  stop_after: int
  context: int
  in_channels: int
  loss_fn: Callable
  schedule: Any
  tx: Any
  plateau: optim.Plateau
  augment: Any  # 2D: the resolved augment config; 3D: input3d.augment_fn (key, image, label)
  best: tuple[str, str, str]  # (evaluator, metric, "max" | "min")
  profile: tuple[int, int] | None  # trace the steps after the first up to the second
  is3d: bool = False  # a volumetric model (models.spatial_dims == 3): 3D patches and windows


def is_3d(c) -> bool:
  """Whether the configured model is volumetric (input (B, D, H, W, C))."""
  return _user(lambda: models.spatial_dims(str(c.model.name)), "model") == 3


def parse_profile_steps(value: Any) -> tuple[int, int] | None:
  """config.profile_steps 'A:B' -> (A, B): trace the steps after step A up to step B."""
  text = str(value or "").strip()
  if not text:
    return None
  a, sep, b = text.partition(":")
  try:
    span = (int(a), int(b)) if sep else None
  except ValueError:
    span = None
  if span is None or not 0 <= span[0] < span[1]:
    raise errors.UserError(f"config.profile_steps={value!r} must be 'A:B' with 0 <= A < B "
                           "(e.g. '10:13': a trace of steps 11 to 13)")
  return span


def _check_batch_memory(batch_size: int, patch_size: int, in_channels: int) -> None:
  """Refuses a batch the host cannot hold before anything is allocated (absurd values)."""
  if batch_size < 1 or patch_size < 1:
    raise errors.UserError(f"batch_size={batch_size} and patch_size={patch_size} must be >= 1")
  # Per pixel: float32 image channels, the int32 label and the float32 mask, twice (the batch
  # being fed and the next one prepared); the model's activations come on top of this.
  nbytes = 2 * batch_size * patch_size * patch_size * (4 * in_channels + 4 + 4)
  memory_plan.require_fits(f"--config.batch_size={batch_size} with --config.patch_size="
                           f"{patch_size}: one batch", nbytes, None,
                           hint="use a smaller batch_size or patch_size")


def check_settings(c: ml_collections.ConfigDict) -> Settings:
  configlib.check(c)
  if c.dtype not in DTYPES:
    raise errors.UserError(f"dtype={c.dtype!r}; known: {', '.join(DTYPES)}")
  num_steps = int(c.num_steps)
  is3d = is_3d(c)
  if is3d:  # the patch's sides are checked against the model's stride in `setup`
    input3d.check_config_3d(c, 1)
    augment = input3d.augment_fn(c)
  elif int(c.patch_size) % models.STRIDE:
    raise errors.UserError(f"patch_size={c.patch_size} must be a positive multiple of "
                           f"{models.STRIDE}")
  else:
    augment = augment_lib.resolve_config(c.augment)
  best = evaluators.resolve_metric(c)
  schedule = _user(lambda: optim.make_schedule(c.schedule, float(c.optimizer.lr), num_steps),
                   "schedule")
  plateau = _user(lambda: optim.plateau_from_config(c.schedule), "schedule")
  specs = evaluators.specs(c)
  if plateau.enabled and not any("loss" in evaluators.module(s["type"]).METRICS
                                 for s in specs.values()):
    raise errors.UserError("schedule plateau follows a validation loss: configure a planes "
                           "evaluator (config.evaluators)")
  pretrained.check_config(c.model)
  context = int(c.context_slices)
  if is3d and context:
    raise errors.UserError(f"context_slices={context}: a 3D model ({c.model.name}) sees its "
                           "neighbours in Z already; set context_slices=0")
  if not is3d:
    _check_batch_memory(int(c.batch_size), int(c.patch_size),
                        2 * context + 1 if context else int(c.in_channels))
  return Settings(
      num_steps=num_steps, batch_size=int(c.batch_size), log_every=max(1, int(c.log_every)),
      checkpoint_every=int(c.checkpoint_every), stop_after=int(c.stop_after), context=context,
      in_channels=2 * context + 1 if context else int(c.in_channels),
      loss_fn=_user(lambda: losses.make_loss(c.loss), "loss"), schedule=schedule,
      tx=_user(lambda: optim.make_optimizer(c.optimizer, schedule), "optimizer"),
      plateau=plateau, augment=augment, best=best, is3d=is3d,
      profile=parse_profile_steps(c.get("profile_steps", "")))


def _inside(path: Path, root: Path) -> bool:
  return path == root or root in path.parents


def check_workdir(c: ml_collections.ConfigDict, workdir: Path) -> None:
  """Refuses a workdir that is, or lies inside, an input of the run: the dataset (so also a
  scan or its image), or the bundle / weights file to start from. Symlinks resolved."""
  real = Path(os.path.realpath(workdir))
  inputs = [("the dataset", c.dataset), ("model.init_from", c.model.get("init_from", "")),
            ("model.encoder_weights", c.model.get("encoder_weights", ""))]
  for what, path in inputs:
    if not path:
      continue
    root = Path(os.path.realpath(os.path.abspath(os.fspath(path))))
    if _inside(real, root):
      raise errors.UserError(f"--workdir={workdir} is inside {what} {path}: a run never writes "
                             "into its inputs; choose a workdir outside it")


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


def load_split(c, workdir: Path, dataset: store.Dataset) -> splits.Split:
  split = splits.make_split(dataset.scans, configlib.names(c.train_scans),
                            configlib.names(c.val_scans), float(c.val_fraction), int(c.seed))
  split_file = workdir / "split.json"
  if split_file.exists() and rundir.has_checkpoint(workdir):
    old = splits.load_split(split_file)
    if (old.train, old.val) != (split.train, split.val):
      raise errors.UserError(f"{workdir} holds a run with another split ({split_file}); use a "
                             "fresh --workdir")
  return split


# ---------------------------------------------------------------------------------------------
# Model graphs and compiled steps.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Graphs:
  create: Callable  # (rngs=...) -> the model
  abstract: Any  # the model, abstract (shapes only)
  train: Any  # graphdef of the training step (convolutions lowered as configured)
  eval: Any  # graphdef of plane-wise validation (the inference graph, or the eval view)
  fold: Callable | None  # (params, rest) -> the inference graph's state; None: eval view
  view: Any  # graphdef of the eval view (BatchNorm running statistics): the bundle's model


def build_graphs(c, s: Settings, num_classes: int) -> Graphs:
  kwargs = dict(c.model.get("kwargs", {}) or {})
  create = functools.partial(models.create, str(c.model.name), num_classes=num_classes,
                             in_channels=s.in_channels, dtype=DTYPES[c.dtype],
                             param_dtype=jnp.float32, **kwargs)
  key = rng_key(int(c.seed), 0)
  abstract = _user(lambda: nnx.eval_shape(lambda: create(rngs=nnx.Rngs(key))), "model")
  graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)
  lowering = str(c.get("conv_lowering", "xla"))
  # On a GPU (and for 3D models, whose convolutions the lowering does not take) the step keeps
  # the model's own convolutions, exactly: the lowering's choice there would be XLA's anyway.
  if lowering != "xla" and not s.is3d and jax.default_backend() == "cpu":
    # The same variables, the convolutions computed as the policy says (oneDNN's where its
    # extension is built; bf16 dot products on CPUs with native bf16 dots): the state tree,
    # checkpoints and bundles are unchanged.
    from bonejax.models import inference_graph
    lowered = nnx.eval_shape(lambda: inference_graph.lower_convs(
        create(rngs=nnx.Rngs(key)), policy=lowering))
    graphdef, _, _ = nnx.split(lowered, nnx.Param, ...)
  view, _, _ = nnx.split(bundle.eval_view(abstract), nnx.Param, ...)
  # Validation runs the inference graph predict.py will run (BatchNorm folded into the
  # convolutions, folded from the current weights inside the jitted step), or the eval view.
  eval_graph, fold = str(c.get("eval_graph", "auto")), None
  graphdef_eval = view
  # A 3D model validates in its eval view (the inference graph folds 2D convolutions only).
  if eval_graph != "off" and not s.is3d:
    from bonejax.models import inference_graph
    st = models.STRIDE
    graphdef_eval, fold = inference_graph.make_folder(
        bundle.eval_view(abstract), policy=eval_graph, sample_shape=(1, st, st, s.in_channels))
  return Graphs(create, abstract, graphdef, graphdef_eval, fold, view)


def compile_steps(c, s: Settings, graphs: Graphs, mesh, cache: StepCache,
                  num_classes: int) -> tuple[Callable, Callable]:
  """(init, update step), jitted: parameters created directly on the devices, replicated;
  batches sharded over 'data'; the state donated to the update."""
  data, repl = mesh_lib.data_sharding(mesh), mesh_lib.replicated(mesh)
  freeze = int(c.model.get("freeze_encoder_steps", 0) or 0)
  key = json.dumps([num_classes, s.num_steps, [d.id for d in mesh.devices.flat],
                    {k: jsonable.to_jsonable(c.to_dict().get(k)) for k in (
                        "model", "in_channels", "dtype", "seed", "loss", "optimizer",
                        "schedule", "augment", "context_slices", "conv_lowering")}],
                   sort_keys=True)
  return cache.get("train", key, lambda: (
      jax.jit(make_init(graphs.create, s.tx, int(c.seed)), out_shardings=repl),
      jax.jit(make_train_step(graphs.train, s.tx, s.loss_fn,
                              {"enabled": False} if s.is3d else s.augment, int(c.seed),
                              s.schedule, freeze, augment_fn=s.augment if s.is3d else None),
              in_shardings=(repl, data, repl), out_shardings=(repl, repl),
              donate_argnums=(0,))))


# ---------------------------------------------------------------------------------------------
# State: resumed from the newest readable checkpoint, or initial.
# ---------------------------------------------------------------------------------------------


def _same_run_check(workdir: Path, fingerprint: dict[str, Any]) -> Callable:
  def same_run(saved: dict[str, Any]) -> None:
    old = configlib.normalize_fingerprint(saved.get("fingerprint") or {})
    changed = sorted(k for k in fingerprint if json.dumps(old.get(k), sort_keys=True) !=
                     json.dumps(fingerprint[k], sort_keys=True))
    if changed:
      raise errors.UserError(f"{workdir} holds a run whose {', '.join(changed)} differ(s) from "
                             "this config; use a fresh --workdir (num_steps, eval/checkpoint "
                             "intervals and early stopping may change)")
  return same_run


def initial_host(c, s: Settings, fingerprint: dict[str, Any]) -> dict[str, Any]:
  """The host-side state a checkpoint carries beside the arrays."""
  return {"step": 0, "seed": int(c.seed), "data": None, "plateau": s.plateau.get_state(),
          "best": None, "best_step": None, "best_scores": None, "bad_evals": 0,
          "last_eval_step": None, "last_scores": None, "stopped": None,
          "fingerprint": fingerprint}


def lowering_as_trained(c, workdir: Path):
  """`c`, or a copy whose conv_lowering is the one the run in `workdir` was trained with.

  Under "auto" (the default: "let bonejax choose") a resumed run continues on the lowering its
  checkpoints were made with, so that it resumes step for step: runs from before "auto" was the
  default trained on XLA's convolutions (their fingerprint has no conv_lowering: "xla"). A
  lowering named explicitly is compared with the run's as any trajectory field is.
  """
  if str(c.get("conv_lowering", "xla")) != "auto":
    return c
  steps = workdir / "checkpoints"
  names = sorted((p for p in steps.iterdir() if p.name.isdigit()), key=lambda p: -int(p.name)) \
      if steps.is_dir() else []
  for step in names:  # the newest whose record reads (restore_newest reports damage)
    try:
      saved = json.loads((step / HOST / "metadata").read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
      continue
    if not isinstance(saved, dict):
      continue
    trained = str(configlib.normalize_fingerprint(saved).get("conv_lowering", "xla"))
    if trained == "auto":
      return c
    if jax.process_index() == 0:
      print(f"note: {workdir} was trained with conv_lowering={trained}; it resumes so",
            file=sys.stderr, flush=True)
    c = c.copy_and_resolve_references()
    c.conv_lowering = trained
    return c
  return c


def restore_or_init(c, s: Settings, workdir: Path, ckpts: Checkpoints, init_fn: Callable,
                    state_shape: Any, graphs: Graphs, classes, dataset_path: Path, mesh):
  """(resumed_from step or None, state, host)."""
  fingerprint = configlib.fingerprint(c)
  fingerprint["dataset"] = str(dataset_path)
  restored = ckpts.restore_newest(state_shape, check=_same_run_check(workdir, fingerprint))
  if restored is not None:
    step, state, host = restored
    s.plateau.set_state(host["plateau"])
    return step, state, host
  weights = pretrained.initial_weights(
      c.model, abstract=graphs.abstract, model_name=str(c.model.name),
      model_kwargs=dict(c.model.get("kwargs", {}) or {}), classes=classes,
      in_channels=s.in_channels, context_slices=s.context, normalization=str(c.normalization))
  # Every process read the same file: the values are placed replicated, like the state.
  state = init_fn(jax.device_put(weights, mesh_lib.replicated(mesh))) if weights else init_fn()
  return None, state, initial_host(c, s, fingerprint)


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------


def _feed_2d(c, s: Settings, dataset_path: Path, split: splits.Split, mesh, data):
  """The 2D training feed: the patch stream's records, cut by the host or on the devices."""
  stream = patches.PatchStream(
      dataset_path, split.train, patch_size=int(c.patch_size), global_batch_size=s.batch_size,
      axes=tuple(c.axes), patches_per_plane=int(c.patches_per_plane),
      oversample_rare=float(c.oversample_rare), seed=int(c.seed),
      normalization=str(c.normalization), process_index=jax.process_index(),
      process_count=jax.process_count(), context_slices=s.context,
      edge_margin=float(c.get("edge_margin", patches.EDGE_MARGIN)))
  return feed_lib.make_feed(
      str(c.sampler), stream, mesh, lambda b: mesh_lib.put_batch(b, data, s.batch_size),
      budget_mb=int(c.sampler_device_mb))


@dataclasses.dataclass
class Run:
  config: ml_collections.ConfigDict
  workdir: Path
  primary: bool
  s: Settings
  mesh: Any
  dataset_path: Path
  classes: list[str]
  split: splits.Split
  train_step: Callable
  num_params: int
  ckpts: Checkpoints
  best: best_lib.BestModel
  state: Any
  host: dict[str, Any]
  resumed_from: int | None
  feed: Any
  evaluators: list
  csv: curves.MetricsLog
  tensorboard: tensorboard.Writer
  plateau_from: str | None  # the evaluator whose loss drives reduce-on-plateau


def setup(c: ml_collections.ConfigDict, workdir: Path, devices, closers: contextlib.ExitStack,
          cache: StepCache) -> Run:
  s = check_settings(c)
  primary = jax.process_index() == 0
  mesh = mesh_lib.make_mesh(devices)
  mesh_lib.check_batch_size(s.batch_size, mesh)

  # ---- Data and split -----------------------------------------------------------------------
  dataset_path = resolve_dataset(c, workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  dataset = store.open_dataset(dataset_path)
  classes = dataset.classes
  split = load_split(c, workdir, dataset)
  c = lowering_as_trained(c, workdir)  # before the graphs: a resumed run keeps its lowering

  # ---- Model, steps, evaluators (their checks run before anything is written) ---------------
  graphs = build_graphs(c, s, dataset.num_classes)
  patch3d = input3d.check_config_3d(c, int(graphs.abstract.stride)) if s.is3d else None
  step_memory.check(c, s, graphs, dataset, split.train, patch3d, mesh)  # before any compile
  init_fn, train_step = compile_steps(c, s, graphs, mesh, cache, dataset.num_classes)
  data = mesh_lib.data_sharding(mesh)
  inp3d, val_batch = None, int(c.val_batch_size) or s.batch_size
  if s.is3d:  # the 3D feed and validation crops (train/input3d.py), made together
    mesh_lib.check_batch_size(val_batch, mesh, "val_batch_size")
    inp3d = input3d.make_input_3d(c, dataset_path, list(split.train), list(split.val), mesh,
                                  lambda b: mesh_lib.put_batch(b, data, s.batch_size),
                                  batch_size=s.batch_size, val_batch=val_batch)
    closers.callback(inp3d.feed.close)
  evals = evaluators.build(evaluators.Context(
      config=c, dataset_path=dataset_path, val_scans=list(split.val), classes=classes,
      mesh=mesh, loss_fn=s.loss_fn, model_graphs=graphs, cache=cache, input3d=inp3d,
      val_batch3d=val_batch if s.is3d else 0))
  repl = mesh_lib.replicated(mesh)
  state_shape = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
                             jax.eval_shape(init_fn))

  # ---- Checkpoint: resume from the newest readable one --------------------------------------
  ckpts = Checkpoints(workdir / "checkpoints", keep=int(c.keep_checkpoints))
  closers.callback(ckpts.close)  # waits for the async writes (also when interrupted)
  resumed_from, state, host = restore_or_init(c, s, workdir, ckpts, init_fn, state_shape,
                                              graphs, classes, dataset_path, mesh)
  # The run's record: written only now that this config is known to fit the run in WORKDIR.
  if primary:
    splits.save_split(workdir / "split.json", split)
    resolved = c.to_dict()
    resolved["dataset"] = str(dataset_path)
    outputs.atomic_write_json(workdir / "config.json", resolved)

  # ---- Best model: its own checkpoint, and WORKDIR/model exported from it -------------------
  meta = bundle.make_meta(
      model_name=str(c.model.name), model_kwargs=dict(c.model.get("kwargs", {}) or {}),
      classes=classes, in_channels=s.in_channels, context_slices=s.context,
      normalization=str(c.normalization),
      patch_size=max(patch3d) if patch3d else int(c.patch_size),
      train_axes=list(c.axes), val_scans=list(split.val), train_scans=list(split.train),
      train_dtype=str(c.dtype), voxel_size_um=training_voxel_size(dataset, split.train),
      # 3D: the training patch (D, H, W), the predictor's default sliding window
      **({"patch_size_zyx": list(patch3d), "predict_window": int(c.get("predict_window", 0)),
          "predict_overlap": float(c.get("predict_overlap", 0.5))} if patch3d else {}))
  best = best_lib.BestModel(workdir / "best", workdir / "model", best_lib.weights_of(state_shape),
                            meta, primary)
  closers.callback(best.close)
  best.resume(resumed_from, host, state)

  # ---- Input: the patch stream's records, cut by the host or on the devices (feed.py) -------
  if inp3d is not None:
    train_feed = inp3d.feed
  else:
    train_feed = _feed_2d(c, s, dataset_path, split, mesh, data)
    closers.callback(train_feed.close)
  if host["data"]:
    train_feed.set_state(host["data"])

  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state_shape["params"]))
  with_loss = [e.name for e in evals if "loss" in e.METRICS]
  plateau_from = evaluators.DEFAULT if evaluators.DEFAULT in with_loss else (
      with_loss[0] if with_loss else None)
  return Run(
      config=c, workdir=workdir, primary=primary, s=s, mesh=mesh, dataset_path=dataset_path,
      classes=classes, split=split, train_step=train_step, num_params=num_params, ckpts=ckpts,
      best=best, state=state, host=host, resumed_from=resumed_from, feed=train_feed,
      evaluators=evals,
      csv=curves.MetricsLog(workdir / "metrics.csv", classes, resumed_from, enabled=primary,
                            columns=curves.columns(classes, evaluators.columns(c, classes))),
      tensorboard=tensorboard.Writer(workdir / "tensorboard", resumed_from, enabled=primary),
      plateau_from=plateau_from)
