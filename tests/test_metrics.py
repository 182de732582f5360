"""Confusion matrix and scores against hand-worked cases and a plain loop in float64."""

import json

import numpy as np
import pytest

from bonejax import cli, metrics, store

# (truth, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,2) (2,0)
TRUTH = np.array([0, 0, 1, 1, 2, 2], np.uint8)
PRED = np.array([0, 1, 1, 1, 2, 0], np.uint8)


def test_hand_worked_confusion_and_scores():
  cm = metrics.confusion_matrix(PRED, TRUTH, 3)
  np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
  assert cm.dtype == np.int64
  s = metrics.scores(cm, ["background", "bone", "pore"])
  # class 0: tp 1, |T| 2, |P| 2 -> IoU 1/3, Dice 2/4; class 1: tp 2, |T| 2, |P| 3 -> 2/3, 4/5;
  # class 2: tp 1, |T| 2, |P| 1 -> 1/2, 2/3.
  np.testing.assert_allclose(s["iou"], [1 / 3, 2 / 3, 1 / 2])
  np.testing.assert_allclose(s["dice"], [1 / 2, 4 / 5, 2 / 3])
  np.testing.assert_allclose(s["precision"], [1 / 2, 2 / 3, 1])
  np.testing.assert_allclose(s["recall"], [1 / 2, 1, 1 / 2])
  assert s["miou_all"] == pytest.approx(1 / 2)
  assert s["miou_fg"] == pytest.approx(7 / 12)
  assert s["accuracy"] == pytest.approx(4 / 6)
  assert s["voxels"] == 6


def test_absent_class_is_null_and_excluded_from_means():
  s = metrics.scores(metrics.confusion_matrix(PRED, TRUTH, 4))
  assert np.isnan(s["iou"][3]) and np.isnan(s["dice"][3])
  assert s["miou_all"] == pytest.approx(1 / 2)
  assert s["miou_fg"] == pytest.approx(7 / 12)
  assert json.loads(json.dumps(cli.to_jsonable(s)))["iou"][3] is None
  # Present in the truth but never predicted: IoU 0 (a miss), not undefined.
  s = metrics.scores(metrics.confusion_matrix(np.zeros(6, np.uint8), TRUTH, 3))
  assert s["iou"][1] == 0 and s["iou"][2] == 0 and np.isnan(s["precision"][1])


def _loop_reference(pred, truth, c):
  cm = np.zeros((c, c), np.int64)
  for t, p in zip(truth.ravel().tolist(), pred.ravel().tolist()):
    cm[t, p] += 1
  iou, dice = [], []
  for k in range(c):
    t, p = truth == k, pred == k
    inter, union = float(np.sum(t & p)), float(np.sum(t | p))
    iou.append(inter / union if union else np.nan)
    dice.append(2 * inter / (t.sum() + p.sum()) if union else np.nan)
  return cm, np.array(iou, np.float64), np.array(dice, np.float64)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_volume_matches_loop(seed):
  rng = np.random.default_rng(seed)
  c = 4
  truth = rng.integers(0, c, (5, 6, 7)).astype(np.uint8)
  pred = np.where(rng.random(truth.shape) < 0.6, truth, rng.integers(0, c, truth.shape))
  pred = pred.astype(np.uint8)
  ref_cm, ref_iou, ref_dice = _loop_reference(pred, truth, c)
  cm = metrics.confusion_matrix(pred, truth, c)
  np.testing.assert_array_equal(cm, ref_cm)
  s = metrics.scores(cm)
  np.testing.assert_allclose(s["iou"], ref_iou, rtol=1e-12)
  np.testing.assert_allclose(s["dice"], ref_dice, rtol=1e-12)
  assert s["miou_fg"] == pytest.approx(np.nanmean(ref_iou[1:]), rel=1e-12)


def test_jax_matches_numpy():
  import jax
  rng = np.random.default_rng(2)
  truth = rng.integers(0, 3, (2, 8, 8)).astype(np.uint8)
  pred = rng.integers(0, 3, (2, 8, 8)).astype(np.uint8)
  f = jax.jit(metrics.confusion_matrix_jax, static_argnums=2)
  np.testing.assert_array_equal(np.asarray(f(pred, truth, 3)),
                                metrics.confusion_matrix(pred, truth, 3))
  mask = rng.random(truth.shape) < 0.5
  got = metrics.confusion_matrix_jax(pred, truth, 3, mask=mask)
  np.testing.assert_array_equal(np.asarray(got),
                                metrics.confusion_matrix(pred[mask], truth[mask], 3))
  got = metrics.confusion_matrix_jax(pred, truth, 3, mask=mask.astype(np.float32) * 0.5)
  np.testing.assert_allclose(np.asarray(got),
                             0.5 * metrics.confusion_matrix(pred[mask], truth[mask], 3))


@pytest.mark.parametrize("slab", [1, 3, 64])
def test_streamed_equals_in_memory(tmp_path, slab):
  rng = np.random.default_rng(3)
  truth = rng.integers(0, 3, (7, 5, 6)).astype(np.uint8)
  pred = rng.integers(0, 3, (7, 5, 6)).astype(np.uint8)
  expected = metrics.confusion_matrix(pred, truth, 3)
  np.testing.assert_array_equal(metrics.streamed_confusion(pred, truth, 3, slab=slab), expected)
  a = store.create_array(tmp_path / "p", pred.shape, "uint8", chunks=(2, 5, 6))
  b = store.create_array(tmp_path / "t", truth.shape, "uint8", chunks=(4, 5, 6))
  a.write(pred).result()
  b.write(truth).result()
  np.testing.assert_array_equal(metrics.streamed_confusion(a, b, 3, slab=slab), expected)


def test_bad_inputs():
  with pytest.raises(cli.UserError, match="label value 3 >= number of classes 3"):
    metrics.confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
  with pytest.raises(cli.UserError, match="shape"):
    metrics.confusion_matrix(np.zeros(3, np.uint8), np.zeros(4, np.uint8), 3)
  with pytest.raises(cli.UserError, match="negative"):
    metrics.confusion_matrix(np.array([0, -1]), np.array([0, 1]), 3)
