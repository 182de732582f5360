"""Segmentation scores: confusion matrices (numpy, jax, streamed) and IoU / Dice from them.

Everything goes through a (C, C) confusion matrix, rows = truth, columns = prediction: it is a
plain sum, so slabs, batches, devices and scans pool by adding matrices, and every score is a
function of the pooled matrix (never a mean of per-slab scores).

Undefined scores: a class that is absent from both truth and prediction has 0 / 0 for IoU and
Dice. It is NaN here, left out of every mean (`miou_all`, `miou_fg`, ...) and written as `null`
in JSON. Precision is NaN when a class is never predicted, recall when it never occurs in the
truth; a class that occurs but is never predicted (or the reverse) has IoU = Dice = 0, not NaN.
A mean over no defined class is NaN too.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from bonejax.core import errors
from bonejax.core.progress import Progress

_PIECE = 1 << 24  # voxels per bincount


def _check_pair(pred: np.ndarray, truth: np.ndarray) -> None:
  if tuple(pred.shape) != tuple(truth.shape):
    raise errors.UserError(f"prediction shape {tuple(pred.shape)} != truth shape "
                        f"{tuple(truth.shape)}")
  for name, a in (("prediction", pred), ("truth", truth)):
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
      raise errors.UserError(f"{name} labels must be integers, got {a.dtype}")


def check_range(a: np.ndarray, num_classes: int, name: str) -> None:
  if a.size == 0:
    return
  lo, hi = int(a.min()), int(a.max())
  if lo < 0:
    raise errors.UserError(f"{name} label value {lo} is negative")
  if hi >= num_classes:
    raise errors.UserError(f"{name} label value {hi} >= number of classes {num_classes}")


def confusion_matrix(pred: np.ndarray, truth: np.ndarray, num_classes: int,
                     ignore: int | None = None) -> np.ndarray:
  """(C, C) int64 counts, rows = truth, cols = prediction. Labels outside [0, C) are an error,
  except truth voxels equal to `ignore` (sparse labels' unlabelled value), which are not counted."""
  if num_classes < 1:
    raise errors.UserError(f"number of classes must be >= 1, got {num_classes}")
  pred, truth = np.asarray(pred), np.asarray(truth)
  _check_pair(pred, truth)
  if ignore is not None:
    keep = truth != ignore
    pred, truth = pred[keep], truth[keep]
  check_range(pred, num_classes, "prediction")
  check_range(truth, num_classes, "truth")
  # One bincount over a combined index is several times faster than C*C boolean reductions;
  # in pieces, so the int64 index costs 128 MB however large the slab.
  pred, truth = pred.ravel(), truth.ravel()
  counts = np.zeros(num_classes * num_classes, np.int64)
  for i in range(0, truth.size, _PIECE):
    index = truth[i:i + _PIECE].astype(np.int64) * num_classes + pred[i:i + _PIECE]
    counts += np.bincount(index, minlength=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes)


def confusion_matrix_jax(pred, truth, num_classes: int, mask=None):
  """The same matrix in jnp, for use inside jitted (and sharded) validation steps.

  `num_classes` is static. `mask` (optional, broadcastable to the labels) selects voxels: a bool
  mask gives int32 counts, a float mask gives float32 weighted counts. Values outside
  [0, C) cannot raise under jit, so they are dropped (not counted); check ranges outside jit.
  int32 counts overflow past 2^31 voxels: sum per-batch matrices on the host in int64.
  """
  import jax.numpy as jnp  # local: the numpy paths must not pay for importing jax

  c = int(num_classes)
  pred, truth = jnp.asarray(pred), jnp.asarray(truth)
  if mask is not None:
    mask = jnp.broadcast_to(jnp.asarray(mask), pred.shape)
  pred = pred.astype(jnp.int32).ravel()
  truth = truth.astype(jnp.int32).ravel()
  valid = (pred >= 0) & (pred < c) & (truth >= 0) & (truth < c)
  # Compare-and-sum over a (voxels, C*C) one-hot that XLA fuses and never materialises: a plain
  # reduction, so it runs on sharded batches, where jnp.bincount (a scatter) fails under jit.
  if mask is not None and not jnp.issubdtype(mask.dtype, jnp.floating):
    valid = valid & mask.astype(bool).ravel()
  index = jnp.where(valid, truth * c + pred, c * c)  # c*c matches no bin: dropped
  hits = index[:, None] == jnp.arange(c * c, dtype=jnp.int32)[None, :]
  if mask is not None and jnp.issubdtype(mask.dtype, jnp.floating):
    weights = mask.astype(jnp.float32).ravel()[:, None]
    return jnp.sum(jnp.where(hits, weights, 0.0), axis=0).reshape(c, c)
  return jnp.sum(hits, axis=0, dtype=jnp.int32).reshape(c, c)


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Voxels per class (int64), in pieces so bincount's int64 copy stays small."""
  flat = np.asarray(labels).ravel()
  counts = np.zeros(num_classes, np.int64)
  for i in range(0, flat.size, _PIECE):
    counts += np.bincount(flat[i:i + _PIECE], minlength=num_classes)[:num_classes]
  return counts


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  out = np.full(num.shape, np.nan, dtype=np.float64)
  np.divide(num, den, out=out, where=den > 0)
  return out


def _nanmean(values: np.ndarray) -> float:
  values = values[~np.isnan(values)]
  return float(values.mean()) if values.size else float("nan")


def class_names_for(num_classes: int, class_names: Sequence[str] | None = None) -> list[str]:
  if class_names is None:
    return [f"class_{i}" for i in range(num_classes)]
  if len(class_names) != num_classes:
    raise errors.UserError(f"{len(class_names)} class names for {num_classes} classes")
  return [str(n) for n in class_names]


def scores(cm: np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, Any]:
  """Per-class IoU, Dice, precision, recall (lists, NaN = undefined) and their means.

  `miou_all` averages the defined IoUs of all classes, `miou_fg` those of classes > 0
  (class 0 is background); `mdice_*` likewise.
  """
  cm = np.asarray(cm, dtype=np.float64)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise errors.UserError(f"confusion matrix must be square, got shape {cm.shape}")
  c = cm.shape[0]
  names = class_names_for(c, class_names)
  tp = np.diag(cm)
  truth_count = cm.sum(axis=1)  # tp + fn
  pred_count = cm.sum(axis=0)   # tp + fp
  union = truth_count + pred_count - tp
  iou = _ratio(tp, union)
  dice = _ratio(2 * tp, truth_count + pred_count)
  total = cm.sum()
  return {
      "classes": names,
      "iou": iou.tolist(),
      "dice": dice.tolist(),
      "precision": _ratio(tp, pred_count).tolist(),
      "recall": _ratio(tp, truth_count).tolist(),
      "miou_all": _nanmean(iou),
      "miou_fg": _nanmean(iou[1:]),
      "mdice_all": _nanmean(dice),
      "mdice_fg": _nanmean(dice[1:]),
      "accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
      "confusion": np.asarray(cm, dtype=np.int64).tolist(),
      "voxels": int(total),
      "truth_voxels": truth_count.astype(np.int64).tolist(),
      "pred_voxels": pred_count.astype(np.int64).tolist(),
  }


def by_class(values: Sequence[float], names: Sequence[str]) -> dict[str, float]:
  """A per-class list as {class name: value}, the friendlier form for JSON results."""
  return {n: v for n, v in zip(names, values)}


# ---------------------------------------------------------------------------------------------
# Streaming over volumes too large for memory.
# ---------------------------------------------------------------------------------------------


def read_slab(arr: Any, start: int, stop: int) -> np.ndarray:
  """Z slab [start, stop) of a tensorstore array, a numpy-like array or a `.read_slab` volume."""
  if hasattr(arr, "read_slab"):
    return np.asarray(arr.read_slab(start, stop))
  part = arr[start:stop]
  if hasattr(part, "read"):  # tensorstore: lazy view -> future
    return part.read().result()
  return np.asarray(part)


def _start_read(arr: Any, start: int, stop: int):
  """Starts a tensorstore read without waiting (so two arrays load together); else reads."""
  if not hasattr(arr, "read_slab"):
    part = arr[start:stop]
    if hasattr(part, "read"):
      return part.read()
  return read_slab(arr, start, stop)


def _finish(x) -> np.ndarray:
  return x.result() if hasattr(x, "result") else x


def read_slabs(arrays: Sequence[Any], start: int, stop: int) -> list[np.ndarray]:
  futures = [_start_read(a, start, stop) for a in arrays]
  return [_finish(f) for f in futures]


def shape_of(arr: Any) -> tuple[int, ...]:
  return tuple(int(s) for s in arr.shape)


def streamed_confusion(pred_arr: Any, truth_arr: Any, num_classes: int, slab: int = 64,
                       progress: bool | Progress | None = None,
                       on_slab: Callable[..., None] | None = None,
                       ignore: int | None = None) -> np.ndarray:
  """Confusion matrix over Z slabs, never holding more than one slab of each volume.

  Several scans pool by summing their matrices. `progress`: True for a stderr progress line,
  or a Progress to update (by slices). `on_slab(z0, pred, truth, slab_cm)` sees every slab
  once, so other statistics (per-slice profiles) share the same read. `ignore`: the truth's
  unlabelled value (sparse labels): those voxels are not counted (so the matrix sums to the
  labelled voxels; the volume's size minus that sum is the unlabelled count).
  """
  shape = shape_of(truth_arr)
  if shape_of(pred_arr) != shape:
    raise errors.UserError(f"prediction shape {shape_of(pred_arr)} != truth shape {shape}")
  if slab < 1:
    raise errors.UserError(f"slab must be >= 1, got {slab}")
  bar = Progress(total=shape[0], desc="confusion", unit="slices") if progress is True \
      else (progress or None)
  cm = np.zeros((num_classes, num_classes), dtype=np.int64)
  for z0 in range(0, shape[0], slab):
    z1 = min(z0 + slab, shape[0])
    pred, truth = read_slabs([pred_arr, truth_arr], z0, z1)
    part = confusion_matrix(pred, truth, num_classes, ignore=ignore)
    cm += part
    if on_slab is not None:
      on_slab(z0, pred, truth, part)
    if bar is not None:
      bar.update(z1 - z0)
  if progress is True:
    bar.close()
  return cm
