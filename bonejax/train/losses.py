"""Segmentation losses on logits (B, H, W, C) and integer labels (B, H, W), in float32.

Every loss takes an optional `mask` (B, H, W), bool or float: masked-out pixels (padding)
contribute nothing. Sparse labels: a label value outside [0, C) (the dataset's `unlabelled`
value, 255 by convention: data/store.py) is masked out too, so the samplers hand the loss the
labels as stored and a batch of partly painted slices trains on its painted pixels only.
Pixel losses (cross-entropy, focal) are means over the unmasked pixels. Region losses (Dice,
Jaccard, Tversky, focal-Tversky) pool true/false positives per class over the whole batch (all
devices: under a sharded `jit` the sums are global), then average over the classes present in
the batch's truth; a class absent from the truth has no defined overlap and is left out.
Lovasz-softmax (Berman et al. 2018, which BONe offers) is the convex Lovasz extension of the
Jaccard loss, averaged over the classes present. By default per image (the authors'
`per_image=True`), then averaged over the images: each image's sort is local to the device that
holds it, so a batch sharded over devices is never gathered. `per_image=False` sorts the whole
batch as one set (their default), which under a sharded `jit` all-gathers the batch's
probabilities onto every device for the argsort: fine on one device, costly on many.

`make_loss({"ce": 1.0, "dice": 1.0})` builds a weighted sum; a value can also be a dict with
`weight` and the loss's own arguments, e.g. `{"tversky": {"weight": 1.0, "alpha": 0.3}}`.

Validation (bonejax/train/evaluators/planes.py) needs the loss of the whole validation set, not a mean of
per-batch losses (a region loss of a mean of batches is not the region loss of the set). The
function `make_loss` returns therefore also has `stats(logits, labels, mask)`: additive sums
(per-pixel loss sums and pixel counts; per-class soft TP / FP / FN; for Lovasz the per-image
values and the image count) that the evaluator adds up over batches, and `finish(sums)`, the
set's (total, parts) from them: cross-entropy and focal the mean over every pixel of the set,
the region losses computed once from the set's pooled counts (a dataset Dice / Jaccard /
Tversky), Lovasz the mean over the set's images (per image either way: a sort of the whole set
is not computed, so `per_image=False` validates with the per-image value).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

EPS = 1e-7


def _labelled(labels, num_classes):
  """(labels with unlabelled pixels set to 0, bool mask of the labelled pixels).

  A label outside [0, num_classes) is "unlabelled" (the dataset's `unlabelled` value, e.g. 255,
  reaches the loss as it is): it weighs nothing in any loss, whatever `mask` says.
  """
  labels = jnp.asarray(labels, jnp.int32)
  known = (labels >= 0) & (labels < num_classes)
  return jnp.where(known, labels, 0), known


def _prep(logits, labels, mask):
  logits = jnp.asarray(logits, jnp.float32)
  num_classes = logits.shape[-1]
  labels, known = _labelled(labels, num_classes)
  if mask is None:
    w = known.astype(jnp.float32)
  else:
    w = jnp.broadcast_to(jnp.asarray(mask), labels.shape).astype(jnp.float32) * known
  return logits, labels, w, num_classes


def _masked_mean(per_pixel, w):
  return jnp.sum(per_pixel * w) / jnp.maximum(jnp.sum(w), 1.0)


# Up to this many classes the cross-entropy is written class by class (`_xent_planes`).
UNROLL_CLASSES = 8


def _cross_entropy_pixels(logits, labels, mask, label_smoothing):
  logits, labels, w, c = _prep(logits, labels, mask)
  if c <= UNROLL_CLASSES:
    return _xent_planes(logits, labels, float(label_smoothing)), w
  logp = jax.nn.log_softmax(logits, axis=-1)
  target = jax.nn.one_hot(labels, c, dtype=jnp.float32)
  if label_smoothing:
    target = target * (1.0 - label_smoothing) + label_smoothing / c
  return -jnp.sum(target * logp, axis=-1), w


# The per-pixel cross-entropy of a few classes, each class's logits a separate plane. Why: XLA's
# CPU backend reduces over a minor axis of 2-8 classes (log_softmax's max and sum, the target's
# sum, and their gradients) one short row at a time; unrolled over the classes, the same
# arithmetic is elementwise over (B, H, W) and fuses into one loop each way (unet_resnet18's
# bf16 step, 8 x 256^2 x 3, alone: 9.7 -> 4.0 ms forward + backward). Same formula:
# lse - sum_k t_k z_k with lse = m + log(sum_k exp(z_k - m)), m the maximum; gradient
# (softmax - t) * g.


def _targets(labels, c, smoothing):
  off = smoothing / c
  return [jnp.where(labels == k, 1.0 - smoothing + off, off) for k in range(c)]


def _lse(planes):
  m = functools.reduce(jnp.maximum, planes)
  return m + jnp.log(sum(jnp.exp(z - m) for z in planes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _xent_planes(logits, labels, smoothing):
  planes = [logits[..., k] for k in range(logits.shape[-1])]
  targets = _targets(labels, len(planes), smoothing)
  return _lse(planes) - sum(t * z for t, z in zip(targets, planes))


def _xent_planes_fwd(logits, labels, smoothing):
  return _xent_planes(logits, labels, smoothing), (logits, labels)


def _xent_planes_bwd(smoothing, res, g):
  logits, labels = res
  planes = [logits[..., k] for k in range(logits.shape[-1])]
  lse = _lse(planes)
  targets = _targets(labels, len(planes), smoothing)
  return (jnp.stack([(jnp.exp(z - lse) - t) * g for z, t in zip(planes, targets)], axis=-1),
          None)


_xent_planes.defvjp(_xent_planes_fwd, _xent_planes_bwd)


def cross_entropy(logits, labels, mask=None, *, label_smoothing: float = 0.0):
  """Mean softmax cross-entropy over unmasked pixels."""
  return _masked_mean(*_cross_entropy_pixels(logits, labels, mask, label_smoothing))


def _focal_pixels(logits, labels, mask, gamma):
  logits, labels, w, c = _prep(logits, labels, mask)
  logp = jax.nn.log_softmax(logits, axis=-1)
  logp_t = jnp.sum(logp * jax.nn.one_hot(labels, c, dtype=jnp.float32), axis=-1)
  p_t = jnp.exp(logp_t)
  return -((1.0 - p_t) ** gamma) * logp_t, w


def focal(logits, labels, mask=None, *, gamma: float = 2.0):
  """Softmax focal loss (Lin et al. 2017): mean of -(1 - p_t)^gamma log p_t."""
  return _masked_mean(*_focal_pixels(logits, labels, mask, gamma))


def _soft_counts(logits, labels, mask):
  """Per-class soft TP, FP, FN summed over the batch, and which classes the truth contains."""
  logits, labels, w, c = _prep(logits, labels, mask)
  if c <= UNROLL_CLASSES:  # class by class, as `_xent_planes` (why there)
    planes = [logits[..., k] for k in range(c)]
    lse = _lse(planes)
    p = [jnp.exp(z - lse) * w for z in planes]
    y = [jnp.where(labels == k, w, 0.0) for k in range(c)]
    tp = jnp.stack([jnp.sum(pk * yk) for pk, yk in zip(p, y)])
    ysum = jnp.stack([jnp.sum(yk) for yk in y])
    return tp, jnp.stack([jnp.sum(pk) for pk in p]) - tp, ysum - tp, ysum > 0
  p = jax.nn.softmax(logits, axis=-1) * w[..., None]
  y = jax.nn.one_hot(labels, c, dtype=jnp.float32) * w[..., None]
  axes = tuple(range(p.ndim - 1))
  tp = jnp.sum(p * y, axis=axes)
  fp = jnp.sum(p, axis=axes) - tp
  fn = jnp.sum(y, axis=axes) - tp
  present = jnp.sum(y, axis=axes) > 0
  return tp, fp, fn, present


def _mean_present(per_class, present):
  present = present.astype(jnp.float32)
  return jnp.sum(per_class * present) / jnp.maximum(jnp.sum(present), 1.0)


def _tversky_index(tp, fp, fn, alpha, beta, smooth):
  return (tp + smooth) / jnp.maximum(tp + alpha * fp + beta * fn + smooth, EPS)


def _region(index_of_counts):
  """A region loss from a function (tp, fp, fn, **kw) -> per-class loss: batch and set forms."""

  def from_counts(tp, fp, fn, **kw):
    return _mean_present(index_of_counts(tp, fp, fn, **kw), (tp + fn) > 0)

  def loss(logits, labels, mask=None, **kw):
    tp, fp, fn, _ = _soft_counts(logits, labels, mask)
    return from_counts(tp, fp, fn, **kw)

  return loss, from_counts


def _dice(tp, fp, fn, *, smooth: float = 0.0):
  return 1.0 - _tversky_index(tp, fp, fn, 0.5, 0.5, smooth)


def _jaccard(tp, fp, fn, *, smooth: float = 0.0):
  return 1.0 - _tversky_index(tp, fp, fn, 1.0, 1.0, smooth)


def _tversky(tp, fp, fn, *, alpha: float = 0.3, beta: float = 0.7, smooth: float = 0.0):
  return 1.0 - _tversky_index(tp, fp, fn, alpha, beta, smooth)


def _focal_tversky(tp, fp, fn, *, alpha: float = 0.3, beta: float = 0.7, gamma: float = 0.75,
                   smooth: float = 0.0):
  # gamma < 1 has an infinite slope at 0: keep the base off zero.
  return jnp.maximum(1.0 - _tversky_index(tp, fp, fn, alpha, beta, smooth), EPS)**gamma


_REGION = {name: _region(f) for name, f in (("dice", _dice), ("jaccard", _jaccard),
                                             ("tversky", _tversky),
                                             ("focal_tversky", _focal_tversky))}


def dice(logits, labels, mask=None, *, smooth: float = 0.0):
  """1 - soft Dice, per class, averaged over the classes present."""
  return _REGION["dice"][0](logits, labels, mask, smooth=smooth)


def jaccard(logits, labels, mask=None, *, smooth: float = 0.0):
  """1 - soft IoU (Jaccard), per class, averaged over the classes present."""
  return _REGION["jaccard"][0](logits, labels, mask, smooth=smooth)


def tversky(logits, labels, mask=None, *, alpha: float = 0.3, beta: float = 0.7,
            smooth: float = 0.0):
  """1 - Tversky index (Salehi et al. 2017); alpha weighs false positives, beta false negatives."""
  return _REGION["tversky"][0](logits, labels, mask, alpha=alpha, beta=beta, smooth=smooth)


def focal_tversky(logits, labels, mask=None, *, alpha: float = 0.3, beta: float = 0.7,
                  gamma: float = 0.75, smooth: float = 0.0):
  """(1 - Tversky index)^gamma (Abraham & Khan 2019; their 1/gamma = 4/3 is gamma = 0.75 here)."""
  return _REGION["focal_tversky"][0](logits, labels, mask, alpha=alpha, beta=beta, gamma=gamma,
                                     smooth=smooth)


def _lovasz_grad(fg_sorted):
  """The Lovasz extension's gradient of the Jaccard loss at errors sorted in decreasing order:
  g_i = J(first i) - J(first i-1), J the Jaccard loss of predicting the first i pixels wrong."""
  gts = jnp.sum(fg_sorted)
  intersection = gts - jnp.cumsum(fg_sorted)
  union = gts + jnp.cumsum(1.0 - fg_sorted)
  jac = 1.0 - intersection / jnp.maximum(union, EPS)
  return jnp.concatenate([jac[:1], jac[1:] - jac[:-1]])


def _lovasz_set(probs, labels, w):
  """Lovasz-softmax of one set of pixels: probs (N, C), labels (N,), w (N,) bool."""
  c = probs.shape[-1]
  fg = jax.nn.one_hot(labels, c, dtype=jnp.float32) * w[:, None]

  def one_class(p_c, fg_c):
    errors = jnp.abs(fg_c - p_c)
    # Masked-out pixels sort after every real one (errors are in [0, 1]) with error 0 and no
    # foreground: they change neither the sum nor the gradient of the pixels before them.
    key = jnp.where(w, errors, -1.0)
    order = jnp.argsort(-key)
    errors_sorted = jnp.where(w[order], errors[order], 0.0)
    grad = jax.lax.stop_gradient(_lovasz_grad(fg_c[order]))
    return jnp.dot(errors_sorted, grad)

  per_class = jax.vmap(one_class, in_axes=(1, 1))(probs, fg)
  present = jnp.sum(fg, axis=0) > 0
  return _mean_present(per_class, present)


def _lovasz_inputs(probs, labels, mask):
  probs = jnp.asarray(probs, jnp.float32)
  labels, known = _labelled(labels, probs.shape[-1])
  w = known if mask is None else (jnp.broadcast_to(jnp.asarray(mask), labels.shape) > 0) & known
  return probs, labels, w


def _lovasz_per_image(probs, labels, mask):
  """(values (B,), valid (B,)): each image's Lovasz-softmax and whether it has a pixel."""
  probs, labels, w = _lovasz_inputs(probs, labels, mask)
  b, c = probs.shape[0], probs.shape[-1]
  values = jax.vmap(_lovasz_set)(probs.reshape(b, -1, c), labels.reshape(b, -1),
                                 w.reshape(b, -1))
  return values, jnp.any(w.reshape(b, -1), axis=1)


def lovasz_from_probs(probs, labels, mask=None, *, per_image: bool = True):
  """Lovasz-softmax on probabilities (B, H, W, C) (the loss itself; `lovasz` takes logits).

  per_image: the mean over the images (with any unmasked pixel) of each image's loss; False:
  the whole batch as one set of pixels (see the module docstring for the cost when sharded).
  """
  if per_image:
    values, valid = _lovasz_per_image(probs, labels, mask)
    return _mean_present(values, valid)
  probs, labels, w = _lovasz_inputs(probs, labels, mask)
  return _lovasz_set(probs.reshape(-1, probs.shape[-1]), labels.reshape(-1), w.reshape(-1))


def lovasz(logits, labels, mask=None, *, per_image: bool = True):
  """Lovasz-softmax (Berman et al. 2018) on the softmax of `logits`."""
  logits = jnp.asarray(logits, jnp.float32)  # labels as given: _lovasz_inputs masks them
  return lovasz_from_probs(jax.nn.softmax(logits, axis=-1), labels, mask, per_image=per_image)


# ---------------------------------------------------------------------------------------------
# Additive statistics: the loss of a whole validation set, batch by batch.
# ---------------------------------------------------------------------------------------------


def _pixel_stats(per_pixel_and_w):
  per_pixel, w = per_pixel_and_w
  return {"sum": jnp.sum(per_pixel * w), "n": jnp.sum(w)}


def _pixel_finish(st, **kw):
  del kw
  return st["sum"] / jnp.maximum(st["n"], 1.0)


def _counts_stats(logits, labels, mask, **kw):
  del kw
  tp, fp, fn, _ = _soft_counts(logits, labels, mask)
  return {"tp": tp, "fp": fp, "fn": fn}


def _lovasz_stats(logits, labels, mask, *, per_image: bool = True):
  del per_image  # validation is per image either way (module docstring)
  logits = jnp.asarray(logits, jnp.float32)  # labels as given: _lovasz_inputs masks them
  values, valid = _lovasz_per_image(jax.nn.softmax(logits, axis=-1), labels, mask)
  return {"sum": jnp.sum(jnp.where(valid, values, 0.0)), "n": jnp.sum(valid.astype(jnp.float32))}


# name -> (stats(logits, labels, mask, **kw) -> sums, finish(sums, **kw) -> the set's loss)
STATS: dict[str, tuple[Callable[..., Any], Callable[..., jax.Array]]] = {
    "ce": (lambda lo, la, m, label_smoothing=0.0: _pixel_stats(
        _cross_entropy_pixels(lo, la, m, label_smoothing)), _pixel_finish),
    "focal": (lambda lo, la, m, gamma=2.0: _pixel_stats(_focal_pixels(lo, la, m, gamma)),
              _pixel_finish),
    **{name: (_counts_stats, lambda st, _f=from_counts, **kw: _f(st["tp"], st["fp"], st["fn"],
                                                                  **kw))
       for name, (_, from_counts) in _REGION.items()},
    "lovasz": (_lovasz_stats, _pixel_finish),
}


LOSSES: dict[str, Callable[..., jax.Array]] = {
    "ce": cross_entropy,
    "focal": focal,
    "dice": dice,
    "jaccard": jaccard,
    "tversky": tversky,
    "focal_tversky": focal_tversky,
    "lovasz": lovasz,
}


def _terms(spec: Mapping[str, Any]) -> list[tuple[str, float, dict[str, Any]]]:
  if not spec:
    raise ValueError("the loss needs at least one term, e.g. {'ce': 1.0}")
  terms = []
  for name, value in dict(spec).items():
    if name not in LOSSES:
      raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(LOSSES)}")
    if isinstance(value, Mapping) or hasattr(value, "to_dict"):
      kwargs = dict(value.to_dict() if hasattr(value, "to_dict") else value)
      weight = float(kwargs.pop("weight", 1.0))
    else:
      weight, kwargs = float(value), {}
    allowed = [p.name for p in inspect.signature(LOSSES[name]).parameters.values()
               if p.kind == inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
      raise ValueError(f"loss {name!r} does not take {', '.join(unknown)}; it takes weight"
                       f"{', ' if allowed else ''}{', '.join(allowed)}")
    if weight:
      terms.append((name, weight, kwargs))
  if not terms:
    raise ValueError("every loss term has weight 0")
  return terms


def make_loss(spec: Mapping[str, Any]) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
  """`fn(logits, labels, mask=None) -> (total, {name: term})`: the weighted sum of `spec`'s terms.

  Raises ValueError for unknown loss names or arguments (at construction, not inside jit).
  """
  terms = _terms(spec)

  def loss_fn(logits, labels, mask=None):
    parts = {name: LOSSES[name](logits, labels, mask, **kw) for name, _, kw in terms}
    total = sum(weight * parts[name] for name, weight, _ in terms)
    return total, parts

  def stats(logits, labels, mask=None):
    return {name: STATS[name][0](logits, labels, mask, **kw) for name, _, kw in terms}

  def finish(sums):
    kws = {name: kw for name, _, kw in terms}
    parts = {name: STATS[name][1](sums[name], **({} if name in ("ce", "focal", "lovasz")
                                                   else kws[name]))
             for name, _, _ in terms}
    return sum(weight * parts[name] for name, weight, _ in terms), parts

  # The set form of the same loss (module docstring): sums to add up over batches, then finish.
  loss_fn.stats, loss_fn.finish = stats, finish
  return loss_fn
