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
