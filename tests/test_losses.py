"""Losses against plain float64 numpy references."""

import numpy as np
import pytest

from bonejax.train import losses

B, H, W, C = 2, 5, 6, 3


def _data(seed=0, absent_class=None):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(B, H, W, C)).astype(np.float32) * 2
  labels = rng.integers(0, C, size=(B, H, W))
  if absent_class is not None:
    labels[labels == absent_class] = 0
  mask = rng.random((B, H, W)) > 0.3
  return logits, labels, mask


def _softmax64(logits):
  z = logits.astype(np.float64)
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _ref_pixel(logits, labels, mask, kind, gamma=2.0):
  p = _softmax64(logits)
  total, n = 0.0, 0
  for idx in np.ndindex(labels.shape):
    if not mask[idx]:
      continue
    pt = p[idx][labels[idx]]
    total += -np.log(pt) * ((1 - pt)**gamma if kind == "focal" else 1.0)
    n += 1
  return total / n


def _ref_region(logits, labels, mask, alpha, beta, gamma=1.0):
  p = _softmax64(logits)
  per_class = []
  for c in range(C):
    tp = fp = fn = 0.0
    for idx in np.ndindex(labels.shape):
      if not mask[idx]:
        continue
      y = float(labels[idx] == c)
      tp += p[idx][c] * y
      fp += p[idx][c] * (1 - y)
      fn += (1 - p[idx][c]) * y
    if ((labels == c) & mask).any():
      per_class.append((1 - tp / (tp + alpha * fp + beta * fn))**gamma)
  return np.mean(per_class)


@pytest.mark.parametrize("absent", [None, 2])
def test_losses_match_numpy(absent):
  logits, labels, mask = _data(absent_class=absent)
  expected = {
      "ce": _ref_pixel(logits, labels, mask, "ce"),
      "focal": _ref_pixel(logits, labels, mask, "focal"),
      "dice": _ref_region(logits, labels, mask, 0.5, 0.5),
      "jaccard": _ref_region(logits, labels, mask, 1.0, 1.0),
      "tversky": _ref_region(logits, labels, mask, 0.3, 0.7),
      "focal_tversky": _ref_region(logits, labels, mask, 0.3, 0.7, 0.75),
  }
  for name, want in expected.items():
    got = float(losses.LOSSES[name](logits, labels, mask))
    np.testing.assert_allclose(got, want, rtol=2e-5, err_msg=name)


def test_no_mask_equals_all_ones_mask_and_weighted_sum():
  logits, labels, _ = _data(1)
  ones = np.ones(labels.shape, bool)
  fn = losses.make_loss({"ce": 1.0, "dice": {"weight": 0.5, "smooth": 0.0}, "focal": 0.0})
  total, parts = fn(logits, labels)
  assert set(parts) == {"ce", "dice"}
  np.testing.assert_allclose(float(parts["ce"]), _ref_pixel(logits, labels, ones, "ce"), rtol=2e-5)
  np.testing.assert_allclose(float(total), float(parts["ce"]) + 0.5 * float(parts["dice"]),
                             rtol=1e-6)


def test_perfect_prediction_has_zero_region_loss():
  _, labels, mask = _data(2)
  logits = np.eye(C, dtype=np.float32)[labels] * 40.0
  for name in ("dice", "jaccard", "tversky", "focal_tversky"):
    assert float(losses.LOSSES[name](logits, labels, mask)) < 1e-4, name


def test_bad_specs_are_refused():
  with pytest.raises(ValueError, match="unknown loss"):
    losses.make_loss({"hinge": 1.0})
  with pytest.raises(ValueError, match="does not take"):
    losses.make_loss({"dice": {"weight": 1.0, "gamma": 2.0}})
  with pytest.raises(ValueError):
    losses.make_loss({})


# ---------------------------------------------------------------------------------------------
# Lovasz-softmax against Berman et al.'s algorithm, written out in float64 numpy.
# ---------------------------------------------------------------------------------------------


def _lovasz_ref(logits, labels, mask):
  """The loss and its gradient w.r.t. the logits, as the reference code computes them: for
  each class present, errors |fg - p| sorted in decreasing order, dotted with the Lovasz
  extension's gradient of the Jaccard loss at that order; the mean over the present classes."""
  p = _softmax64(logits)[mask]                       # masked-out pixels are dropped
  y = labels[mask]
  losses, dp = [], np.zeros_like(p)
  present = [c for c in range(C) if (y == c).any()]
  for c in present:
    fg = (y == c).astype(np.float64)
    errors = np.abs(fg - p[:, c])
    order = np.argsort(-errors, kind="stable")
    gts = fg.sum()
    grad = np.empty(len(order))
    prev = 0.0
    for i in range(len(order)):
      first = order[:i + 1]  # the i + 1 largest errors predicted wrong
      inter = gts - fg[first].sum()
      union = gts + (1 - fg[first]).sum()
      jac = 1.0 - inter / union
      grad[i], prev = jac - prev, jac
    losses.append(errors[order] @ grad)
    # d error / d p_c = -1 on the foreground, +1 elsewhere
    dp[order, c] += grad * np.where(fg[order] > 0, -1.0, 1.0) / len(present)
  dz = p * (dp - (dp * p).sum(-1, keepdims=True))    # through the softmax
  full = np.zeros(logits.shape)
  full[mask] = dz
  return float(np.mean(losses)), full


@pytest.mark.parametrize("absent", [None, 2])
def test_lovasz_matches_berman(absent):
  import jax
  logits, labels, mask = _data(3, absent)
  want, want_grad = _lovasz_ref(logits, labels, mask)
  got, got_grad = jax.value_and_grad(losses.lovasz)(logits, labels, mask)
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got_grad), want_grad, rtol=1e-4, atol=1e-6)
  spec = losses.make_loss({"lovasz": 1.0})(logits, labels, mask)[0]
  np.testing.assert_allclose(float(spec), want, rtol=1e-5, atol=1e-6)


def test_lovasz_equals_jaccard_loss_at_hard_predictions():
  # The Lovasz extension agrees with the set function it extends at the vertices: one-hot
  # probabilities give 1 - IoU, averaged over the classes present in the truth.
  rng = np.random.default_rng(4)
  labels = rng.integers(0, C, size=(B, H, W))
  pred = np.where(rng.random((B, H, W)) < 0.7, labels, rng.integers(0, C, size=(B, H, W)))
  probs = np.eye(C, dtype=np.float32)[pred]
  iou = [((pred == c) & (labels == c)).sum() / ((pred == c) | (labels == c)).sum()
         for c in range(C)]
  got = float(losses.lovasz_from_probs(probs, labels))
  np.testing.assert_allclose(got, 1.0 - np.mean(iou), rtol=1e-6)
