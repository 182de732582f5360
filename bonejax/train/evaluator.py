"""Validation during training: the jitted confusion-matrix step and the evaluator that feeds it.

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

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bonejax.evaluate import metrics

_CARRY = 30


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

  eval_step: the jitted make_eval_step function. batches: () -> host batches (a fresh
  iterator each call). put: host batch -> device batch. nbytes: the set's size, which decides
  between keeping it on the device and streaming it.
  """

  def __init__(self, eval_step: Callable, batches: Callable[[], Iterable[dict[str, np.ndarray]]],
               put: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]], *, nbytes: int,
               max_device_bytes: int, classes: list[str], replicated):
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
