"""Segmentation losses on logits (B, H, W, C) and integer labels (B, H, W), in float32.

Every loss takes an optional `mask` (B, H, W), bool or float: masked-out pixels (padding, unlabelled
voxels) contribute nothing. Pixel losses (cross-entropy, focal) are means over the unmasked pixels.
Region losses (Dice, Jaccard, Tversky, focal-Tversky) pool true/false positives per class over the
whole batch (all devices: under a sharded `jit` the sums are global), then average over the classes
present in the batch's truth; a class absent from the truth has no defined overlap and is left out.
Lovasz-softmax (Berman et al. 2018, which BONe offers) is the convex Lovasz extension of the
Jaccard loss, per class over the whole batch, averaged over the classes present, as in the
authors' reference code (`classes='present'`, `per_image=False`).

`make_loss({"ce": 1.0, "dice": 1.0})` builds a weighted sum; a value can also be a dict with
`weight` and the loss's own arguments, e.g. `{"tversky": {"weight": 1.0, "alpha": 0.3}}`.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

EPS = 1e-7


def _prep(logits, labels, mask):
  logits = jnp.asarray(logits, jnp.float32)
  num_classes = logits.shape[-1]
  labels = jnp.asarray(labels, jnp.int32)
  if mask is None:
    w = jnp.ones(labels.shape, jnp.float32)
  else:
    w = jnp.broadcast_to(jnp.asarray(mask), labels.shape).astype(jnp.float32)
  return logits, labels, w, num_classes


def _masked_mean(per_pixel, w):
  return jnp.sum(per_pixel * w) / jnp.maximum(jnp.sum(w), 1.0)


def cross_entropy(logits, labels, mask=None, *, label_smoothing: float = 0.0):
  """Mean softmax cross-entropy over unmasked pixels."""
  logits, labels, w, c = _prep(logits, labels, mask)
  logp = jax.nn.log_softmax(logits, axis=-1)
  target = jax.nn.one_hot(labels, c, dtype=jnp.float32)
  if label_smoothing:
    target = target * (1.0 - label_smoothing) + label_smoothing / c
  return _masked_mean(-jnp.sum(target * logp, axis=-1), w)


def focal(logits, labels, mask=None, *, gamma: float = 2.0):
  """Softmax focal loss (Lin et al. 2017): mean of -(1 - p_t)^gamma log p_t."""
  logits, labels, w, c = _prep(logits, labels, mask)
  logp = jax.nn.log_softmax(logits, axis=-1)
  logp_t = jnp.sum(logp * jax.nn.one_hot(labels, c, dtype=jnp.float32), axis=-1)
  p_t = jnp.exp(logp_t)
  return _masked_mean(-((1.0 - p_t) ** gamma) * logp_t, w)


def _soft_counts(logits, labels, mask):
  """Per-class soft TP, FP, FN summed over the batch, and which classes the truth contains."""
  logits, labels, w, c = _prep(logits, labels, mask)
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


def dice(logits, labels, mask=None, *, smooth: float = 0.0):
  """1 - soft Dice, per class, averaged over the classes present."""
  tp, fp, fn, present = _soft_counts(logits, labels, mask)
  return _mean_present(1.0 - _tversky_index(tp, fp, fn, 0.5, 0.5, smooth), present)


def jaccard(logits, labels, mask=None, *, smooth: float = 0.0):
  """1 - soft IoU (Jaccard), per class, averaged over the classes present."""
  tp, fp, fn, present = _soft_counts(logits, labels, mask)
  return _mean_present(1.0 - _tversky_index(tp, fp, fn, 1.0, 1.0, smooth), present)


def tversky(logits, labels, mask=None, *, alpha: float = 0.3, beta: float = 0.7,
            smooth: float = 0.0):
  """1 - Tversky index (Salehi et al. 2017); alpha weighs false positives, beta false negatives."""
  tp, fp, fn, present = _soft_counts(logits, labels, mask)
  return _mean_present(1.0 - _tversky_index(tp, fp, fn, alpha, beta, smooth), present)


def focal_tversky(logits, labels, mask=None, *, alpha: float = 0.3, beta: float = 0.7,
                  gamma: float = 0.75, smooth: float = 0.0):
  """(1 - Tversky index)^gamma (Abraham & Khan 2019; their 1/gamma = 4/3 is gamma = 0.75 here)."""
  tp, fp, fn, present = _soft_counts(logits, labels, mask)
  # gamma < 1 has an infinite slope at 0: keep the base off zero.
  base = jnp.maximum(1.0 - _tversky_index(tp, fp, fn, alpha, beta, smooth), EPS)
  return _mean_present(base**gamma, present)


def _lovasz_grad(fg_sorted):
  """The Lovasz extension's gradient of the Jaccard loss at errors sorted in decreasing order:
  g_i = J(first i) - J(first i-1), J the Jaccard loss of predicting the first i pixels wrong."""
  gts = jnp.sum(fg_sorted)
  intersection = gts - jnp.cumsum(fg_sorted)
  union = gts + jnp.cumsum(1.0 - fg_sorted)
  jac = 1.0 - intersection / jnp.maximum(union, EPS)
  return jnp.concatenate([jac[:1], jac[1:] - jac[:-1]])


def lovasz_from_probs(probs, labels, mask=None):
  """Lovasz-softmax on probabilities (B, H, W, C) (the loss itself; `lovasz` takes logits)."""
  probs = jnp.asarray(probs, jnp.float32)
  c = probs.shape[-1]
  labels = jnp.asarray(labels, jnp.int32).reshape(-1)
  w = (jnp.ones(labels.shape, bool) if mask is None else
       jnp.broadcast_to(jnp.asarray(mask), probs.shape[:-1]).reshape(-1) > 0)
  p = probs.reshape(-1, c)
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

  per_class = jax.vmap(one_class, in_axes=(1, 1))(p, fg)
  present = jnp.sum(fg, axis=0) > 0
  return _mean_present(per_class, present)


def lovasz(logits, labels, mask=None):
  """Lovasz-softmax (Berman et al. 2018) on the softmax of `logits`."""
  logits, labels, _, _ = _prep(logits, labels, mask)
  return lovasz_from_probs(jax.nn.softmax(logits, axis=-1), labels, mask)


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

  return loss_fn
