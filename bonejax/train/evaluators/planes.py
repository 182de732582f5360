"""The plane-wise evaluator (type "planes"): the jitted confusion-matrix step and its feeder.

Config fields (each defaults to the top-level config field in brackets): axes [val_axes], crop
[val_crop], stride [val_stride], batch_size [val_batch_size, then batch_size], device_limit_mb
[val_device_limit_mb]. The graph it runs is the run's `eval_graph` (shared by all evaluators).

The validation set is fixed (every k-th plane of the validation scans, whole or centre-cropped),
so while it is small it is read once and kept on the device: an evaluation then costs only the
forward passes. A large one (whole big planes of several scans: gigabytes) would pin that much
device memory for the whole run, so above `max_device_bytes` its batches are read from the host
at every evaluation instead (through the tensorstore chunk cache); the host reads batch i+1
while the device evaluates batch i. Both ways feed the same batches in the same order, so the
metrics are identical.

Counts are exact: the confusion matrix is accumulated as int32 pairs (hi << 30) + lo, so no
validation set overflows it.

The validation loss is the loss of the whole set (the `stats` / `finish` of a loss from
`losses.make_loss`): for a region loss a dataset Dice / Jaccard / Tversky from the set's pooled
soft counts, not a pixel-weighted mean of per-batch values; so the schedule's Plateau and
`best_metric=loss` see the quantity the loss names. A loss function without `stats` falls back
to the pixel-weighted mean of its per-batch values (exact for pixel losses only).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bonejax.core import errors, jsonable
from bonejax.data import patches, validation
from bonejax.evaluate import metrics
from bonejax.train import mesh as mesh_lib

_CARRY = 30
FIELDS = ("axes", "crop", "stride", "batch_size", "device_limit_mb")
METRICS = {"loss": "min", "miou_all": "max", "miou_fg": "max"}


def make_eval_step(graphdef_eval, loss_fn: Callable, num_classes: int,
                   fold: Callable | None = None) -> Callable:
  """(state, batch, acc) -> acc: confusion matrix and masked loss summed over batches.

  `fold` (`inference_graph.make_folder`): `graphdef_eval` is then the inference graph's, and
  its state is folded from the training state inside the step (a few elementwise ops per
  weight, against a forward pass per batch).
  """

  set_loss = hasattr(loss_fn, "stats") and hasattr(loss_fn, "finish")

  def eval_fn(state, batch, acc):
    if fold is None:
      model = nnx.merge(graphdef_eval, state["params"], state["rest"], copy=True)
    else:
      model = nnx.merge(graphdef_eval, fold(state["params"], state["rest"]))
    logits = model(batch["image"])
    mask = batch["mask"]
    cm = metrics.confusion_matrix_jax(jnp.argmax(logits, -1), batch["label"], num_classes,
                                      mask=mask > 0)
    lo = acc["cm_lo"] + cm
    out = {"cm_lo": lo & ((1 << _CARRY) - 1), "cm_hi": acc["cm_hi"] + (lo >> _CARRY)}
    if set_loss:
      sums = loss_fn.stats(logits, batch["label"], mask)
      out["loss_stats"] = jax.tree.map(jnp.add, acc["loss_stats"], sums)
    else:
      loss, _ = loss_fn(logits, batch["label"], mask)
      n = jnp.sum(mask)
      out.update(loss=acc["loss"] + loss * n, n=acc["n"] + n)
    return out

  # What the Evaluator needs to start and finish the sums (jax.jit keeps these attributes).
  if set_loss:
    eval_fn.loss_stats_zeros = lambda: jax.tree.map(
        lambda a: np.zeros(a.shape, a.dtype),
        jax.eval_shape(loss_fn.stats, jax.ShapeDtypeStruct((1, 1, 1, num_classes), jnp.float32),
                       jax.ShapeDtypeStruct((1, 1, 1), jnp.int32),
                       jax.ShapeDtypeStruct((1, 1, 1), jnp.float32)))
    eval_fn.finish_loss = lambda sums: float(loss_fn.finish(sums)[0])
  return eval_fn


class Evaluator:
  """`evaluator(state)` -> {loss, iou, miou_all, miou_fg} on the validation set.

  `from_config` builds it inside a training run (the jitted step through the run's cache).

  eval_step: the jitted make_eval_step function. batches: () -> host batches (a fresh
  iterator each call). put: host batch -> device batch. nbytes: the set's size, which decides
  between keeping it on the device and streaming it.
  """

  def __init__(self, eval_step: Callable, batches: Callable[[], Iterable[dict[str, np.ndarray]]],
               put: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]], *, nbytes: int,
               max_device_bytes: int, classes: list[str], replicated, name: str = "val",
               every_steps: int = 0):
    self.name, self.every_steps, self.METRICS = name, int(every_steps), METRICS
    self.eval_step, self.batches, self.put = eval_step, batches, put
    self.nbytes, self.on_device = int(nbytes), int(nbytes) <= int(max_device_bytes)
    self.classes, self.replicated = list(classes), replicated
    self._cache: list[dict[str, jax.Array]] | None = None

  def _device_batches(self) -> Iterable[dict[str, jax.Array]]:
    if not self.on_device:
      return (self.put(b) for b in self.batches())
    if self._cache is None:
      self._cache = [self.put(b) for b in self.batches()]
    return self._cache

  def _empty(self) -> dict[str, jax.Array]:
    k = len(self.classes)
    zeros = {"cm_lo": np.zeros((k, k), np.int32), "cm_hi": np.zeros((k, k), np.int32)}
    stats_zeros = getattr(self.eval_step, "loss_stats_zeros", None)
    if stats_zeros is not None:
      zeros["loss_stats"] = stats_zeros()
    else:
      zeros.update(loss=np.zeros((), np.float32), n=np.zeros((), np.float32))
    return jax.device_put(zeros, self.replicated)

  def __call__(self, state) -> dict[str, Any]:
    acc = self._empty()
    for b in self._device_batches():
      acc = self.eval_step(state, b, acc)
    acc = jax.device_get(acc)  # the evaluation's one fetch
    cm = (acc["cm_hi"].astype(np.int64) << _CARRY) + acc["cm_lo"].astype(np.int64)
    scores = metrics.scores(cm, self.classes)
    if "loss_stats" in acc:
      loss = self.eval_step.finish_loss(acc["loss_stats"])
    else:
      loss = float(acc["loss"] / max(float(acc["n"]), 1.0))
    return {"loss": loss, "iou": scores["iou"], "miou_all": scores["miou_all"],
            "miou_fg": scores["miou_fg"]}

  @classmethod
  def from_config(cls, name: str, spec: dict[str, Any], ctx) -> "Evaluator":
    c = ctx.config
    if getattr(ctx, "input3d", None) is not None:
      return cls._from_config_3d(name, spec, ctx)
    batch = int(spec.get("batch_size", 0) or c.val_batch_size) or int(c.batch_size)
    mesh_lib.check_batch_size(batch, ctx.mesh, f"evaluators.{name}.batch_size")
    axes = spec.get("axes", c.val_axes)
    args = dict(crop=int(spec.get("crop", c.val_crop)) or None,
                axes=tuple(axes) if isinstance(axes, (tuple, list)) else (int(axes),),
                batch_size=batch, stride=int(spec.get("stride", c.val_stride)),
                context_slices=int(c.context_slices))
    data, repl = mesh_lib.data_sharding(ctx.mesh), mesh_lib.replicated(ctx.mesh)
    graphs, num_classes = ctx.model_graphs, len(ctx.classes)
    # The jitted step depends only on these: runs sharing the cache share the executable.
    key = json.dumps([num_classes, [d.id for d in ctx.mesh.devices.flat], jsonable.to_jsonable(
        {k: c.to_dict().get(k) for k in ("model", "in_channels", "dtype", "seed", "loss",
                                         "context_slices", "eval_graph")})], sort_keys=True)
    step = ctx.cache.get(f"eval/{name}", key, lambda: jax.jit(
        make_eval_step(graphs.eval, ctx.loss_fn, num_classes, graphs.fold),
        in_shardings=(repl, data, repl), out_shardings=repl, donate_argnums=(2,)))
    # Each process holds its own rows of every validation batch.
    return cls(
        step,
        lambda: validation.validation_batches(ctx.dataset_path, ctx.val_scans,
                                           normalization=str(c.normalization), **args),
        lambda b: mesh_lib.put_batch(mesh_lib.local_rows(b, batch), data, batch),
        nbytes=validation.validation_nbytes(ctx.dataset_path, ctx.val_scans, **args),
        max_device_bytes=int(spec.get("device_limit_mb", c.val_device_limit_mb)) << 20,
        classes=ctx.classes, replicated=repl, name=name, every_steps=spec["every_steps"])

  @classmethod
  def _from_config_3d(cls, name: str, spec: dict[str, Any], ctx) -> "Evaluator":
    """A 3D model: the same step on the grid of 3D validation crops (`input3d`)."""
    c = ctx.config
    planar = sorted(k for k in ("axes", "crop", "stride", "batch_size") if k in spec)
    if planar:
      raise errors.UserError(f"config.evaluators.{name}: {', '.join(planar)} are for 2D "
                             f"models; a 3D model ({c.model.name}) validates on 3D crops "
                             "(val_batch_size, val_max_crops)")
    batch = int(ctx.val_batch3d)
    data, repl = mesh_lib.data_sharding(ctx.mesh), mesh_lib.replicated(ctx.mesh)
    graphs, num_classes = ctx.model_graphs, len(ctx.classes)
    key = json.dumps(["3d", num_classes, [d.id for d in ctx.mesh.devices.flat],
                      jsonable.to_jsonable({k: c.to_dict().get(k) for k in (
                          "model", "in_channels", "dtype", "seed", "loss")})], sort_keys=True)
    step = ctx.cache.get(f"eval/{name}", key, lambda: jax.jit(
        make_eval_step(graphs.eval, ctx.loss_fn, num_classes, graphs.fold),
        in_shardings=(repl, data, repl), out_shardings=repl, donate_argnums=(2,)))
    return cls(
        step, ctx.input3d.validation,
        lambda b: mesh_lib.put_batch(mesh_lib.local_rows(b, batch), data, batch),
        nbytes=ctx.input3d.val_nbytes,
        max_device_bytes=int(spec.get("device_limit_mb", c.val_device_limit_mb)) << 20,
        classes=ctx.classes, replicated=repl, name=name, every_steps=spec["every_steps"])
