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


def _lovasz_ref_per_image(logits, labels, mask):
  """Berman's per_image=True: the mean over the images (with a pixel) of each one's loss."""
  keep = [i for i in range(len(labels)) if mask[i].any()]
  value, grad = 0.0, np.zeros(logits.shape)
  for i in keep:
    v, g = _lovasz_ref(logits[i:i + 1], labels[i:i + 1], mask[i:i + 1])
    value += v / len(keep)
    grad[i:i + 1] = g / len(keep)
  return value, grad


@pytest.mark.parametrize("per_image", [True, False])
@pytest.mark.parametrize("absent", [None, 2])
def test_lovasz_matches_berman(absent, per_image):
  import jax
  logits, labels, mask = _data(3, absent)
  ref = _lovasz_ref_per_image if per_image else _lovasz_ref
  want, want_grad = ref(logits, labels, mask)
  got, got_grad = jax.value_and_grad(
      lambda z: losses.lovasz(z, labels, mask, per_image=per_image))(logits)
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got_grad), want_grad, rtol=1e-4, atol=1e-6)
  spec = losses.make_loss({"lovasz": {"weight": 1.0, "per_image": per_image}})
  np.testing.assert_allclose(float(spec(logits, labels, mask)[0]), want, rtol=1e-5, atol=1e-6)


def test_lovasz_default_is_per_image_and_skips_empty_images():
  logits, labels, mask = _data(3)
  mask[1] = False  # an all-padding image counts for nothing
  want, _ = _lovasz_ref(logits[:1], labels[:1], mask[:1])
  np.testing.assert_allclose(float(losses.lovasz(logits, labels, mask)), want, rtol=1e-5)


def test_lovasz_equals_jaccard_loss_at_hard_predictions():
  # The Lovasz extension agrees with the set function it extends at the vertices: one-hot
  # probabilities give 1 - IoU, averaged over the classes present in the truth.
  rng = np.random.default_rng(4)
  labels = rng.integers(0, C, size=(B, H, W))
  pred = np.where(rng.random((B, H, W)) < 0.7, labels, rng.integers(0, C, size=(B, H, W)))
  probs = np.eye(C, dtype=np.float32)[pred]
  iou = [((pred == c) & (labels == c)).sum() / ((pred == c) | (labels == c)).sum()
         for c in range(C)]
  got = float(losses.lovasz_from_probs(probs, labels, per_image=False))
  np.testing.assert_allclose(got, 1.0 - np.mean(iou), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# The loss of a whole set, batch by batch (what validation reports).
# ---------------------------------------------------------------------------------------------


SPECS = [{"ce": 1.0}, {"focal": {"gamma": 1.5}}, {"dice": 1.0}, {"jaccard": {"smooth": 1.0}},
         {"tversky": {"alpha": 0.2, "beta": 0.8}}, {"focal_tversky": 1.0}, {"lovasz": 1.0},
         {"ce": 1.0, "dice": 2.0}]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "+".join(s))
def test_set_loss_from_batches_equals_the_loss_of_the_whole_set(spec):
  """Sums of `stats` over batches of 1 image, then `finish`, equal the loss on the whole set in
  one batch (the set's pooled counts; per-image Lovasz: the mean over images)."""
  import jax
  rng = np.random.default_rng(7)
  n = 4
  logits = rng.normal(size=(n, H, W, C)).astype(np.float32) * 2
  labels = rng.integers(0, C, size=(n, H, W))
  labels[0][labels[0] == 2] = 1  # batches whose classes differ: per-batch means then differ
  mask = rng.random((n, H, W)) > 0.3
  fn = losses.make_loss(spec)
  whole = float(fn(logits, labels, mask)[0])
  sums = None
  for i in range(n):
    st = fn.stats(logits[i:i + 1], labels[i:i + 1], mask[i:i + 1])
    sums = st if sums is None else jax.tree.map(np.add, sums, st)
  np.testing.assert_allclose(float(fn.finish(sums)[0]), whole, rtol=1e-5)
  # The pixel-weighted mean of per-batch values (what validation reported before) is exact
  # for pixel losses only.
  weighted = sum(float(fn(logits[i:i + 1], labels[i:i + 1], mask[i:i + 1])[0]) * mask[i].sum()
                 for i in range(n)) / mask.sum()
  if set(spec) <= {"ce", "focal"}:
    np.testing.assert_allclose(weighted, whole, rtol=1e-5)
  elif "lovasz" not in spec:
    assert abs(weighted - whole) > 1e-3


@pytest.mark.parametrize("classes", [2, 3, 8])
def test_class_by_class_losses_equal_the_general_code(classes, monkeypatch):
  """Up to UNROLL_CLASSES classes the cross-entropy and the soft counts are written class by
  class (XLA's CPU reductions over a short minor axis are slow); values and gradients equal
  the general (log_softmax / one-hot) code's, with label smoothing, masks and unlabelled pixels."""
  import jax
  import jax.numpy as jnp
  rng = np.random.default_rng(classes)
  logits = jnp.asarray(rng.normal(size=(2, 7, 9, classes)) * 3, jnp.float32)
  labels = rng.integers(0, classes, size=(2, 7, 9))
  labels[0, :2] = 255  # unlabelled
  labels[labels == classes - 1] = 0  # one class absent from the truth
  mask = rng.random((2, 7, 9)) > 0.2
  fn = losses.make_loss({"ce": {"weight": 1.0, "label_smoothing": 0.1}, "focal": 0.5,
                         "dice": 1.0, "tversky": 0.5})
  out = {}
  for unroll in (losses.UNROLL_CLASSES, 0):
    monkeypatch.setattr(losses, "UNROLL_CLASSES", unroll)
    out[unroll] = jax.value_and_grad(lambda z: fn(z, labels, mask), has_aux=True)(logits)
  (v1, p1), g1 = out[losses.UNROLL_CLASSES]
  (v0, p0), g0 = out[0]
  for name in p0:
    np.testing.assert_allclose(float(p1[name]), float(p0[name]), rtol=1e-6, err_msg=name)
  np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), rtol=1e-5, atol=1e-7)
