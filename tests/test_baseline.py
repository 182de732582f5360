"""Multi-level Otsu against brute force; the calibrated threshold baseline on toy volumes."""

import itertools

import numpy as np
import pytest

from bonejax.core import errors
from bonejax.data import store
from bonejax.evaluate import baseline
from bonejax.io import intensity


@pytest.mark.parametrize("n_thresholds", [1, 2, 3])
def test_otsu_matches_brute_force(n_thresholds):
  rng = np.random.default_rng(n_thresholds)
  for _ in range(8):
    bins = int(rng.integers(n_thresholds + 1, 20))
    hist = rng.integers(0, 100, bins) * (rng.random(bins) < 0.8)
    cuts = baseline.otsu_cuts(hist, n_thresholds)
    assert len(cuts) == n_thresholds and np.all(np.diff(cuts) > 0)
    assert 0 < cuts[0] and cuts[-1] < bins
    best = max(baseline.between_class_score(hist, c)
               for c in itertools.combinations(range(1, bins), n_thresholds))
    assert baseline.between_class_score(hist, cuts) == pytest.approx(best, rel=1e-12)


def test_one_threshold_is_classic_otsu():
  """1 threshold: the cut minimising the within-class variance of the values themselves."""
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.normal(0.3, 0.05, 4000), rng.normal(0.7, 0.1, 1000)]).clip(0, 0.999)
  t = baseline.otsu_thresholds(x, 1, bins=64)[0]
  edges = np.arange(1, 64) / 64
  idx = (x * 64).astype(int)
  centres = (idx + 0.5) / 64
  within = [centres[idx < c].var() * (idx < c).sum() + centres[idx >= c].var() * (idx >= c).sum()
            if 0 < (idx < c).sum() < x.size else np.inf for c in range(1, 64)]
  assert t == pytest.approx(edges[int(np.argmin(within))])
  assert 0.4 < t < 0.6


def _toy(seed=0, shape=(8, 16, 16)):
  """Dark background and pore (same grey value), mid 'layer', bright bone."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 4, shape).astype(np.uint8)
  level = np.array([0.1, 0.8, 0.1, 0.45], np.float32)[labels]
  image = (level + rng.normal(0, 0.03, shape)).astype(np.float32)
  return image, labels


def test_fit_predict_calibrated():
  image, labels = _toy()
  # Background and pore share the dark level: the dark band must go to the larger of the two.
  labels[(labels == 2) & (np.arange(labels.size).reshape(labels.shape) % 3 == 0)] = 0
  base = baseline.ThresholdBaseline.fit(image, labels, num_classes=4)
  assert len(base.thresholds) == 3 and np.all(np.diff(base.thresholds) > 0)
  dark = 0 if (labels == 0).sum() > (labels == 2).sum() else 2
  pred = base.predict(image)
  assert pred.dtype == np.uint8 and pred.shape == image.shape
  assert set(np.unique(pred)) <= {dark, 1, 3}
  np.testing.assert_array_equal(pred[labels == 1], 1)
  np.testing.assert_array_equal(pred[labels == 3], 3)
  np.testing.assert_array_equal(base.predict(image, slab=1), base.predict(image, slab=64))
  np.testing.assert_array_equal(base.predict(image[2]), pred[2])  # 2D images work too
  again = baseline.ThresholdBaseline.from_dict(base.to_dict())
  np.testing.assert_array_equal(again.predict(image), pred)


def test_fit_pools_images_and_slabs():
  a, la = _toy(1)
  b, lb = _toy(2)
  pooled = baseline.ThresholdBaseline.fit([a, b], [la, lb], 4, slab=3)
  whole = baseline.ThresholdBaseline.fit(np.concatenate([a, b]), np.concatenate([la, lb]), 4)
  np.testing.assert_array_equal(pooled.cuts, whole.cuts)
  np.testing.assert_array_equal(pooled.band_classes, whole.band_classes)


def test_fit_unsupervised_ascending():
  image, _ = _toy()
  base = baseline.ThresholdBaseline.fit_unsupervised(image, 3)
  assert base.band_classes.tolist() == [0, 1, 2]
  pred = base.predict(image)
  assert pred[image < base.thresholds[0]].max() == 0
  assert pred[image >= base.thresholds[1]].min() == 2


def test_bad_labels():
  image, labels = _toy()
  with pytest.raises(errors.UserError, match="outside"):
    baseline.ThresholdBaseline.fit(image, labels, num_classes=3)
  with pytest.raises(errors.UserError, match="shape"):
    baseline.ThresholdBaseline.fit(image, labels[:-1], num_classes=4)


def test_scans_on_disk(tmp_path):
  image, labels = _toy()
  raw = (image.clip(0, 1) * 60000).astype(np.uint16)
  scan = store.write_scan(tmp_path / "s", raw, labels, {"voxel_size_um": 1.0}, num_classes=4)
  base = baseline.fit_scans([scan], 4)
  norm = intensity.normalize(raw, scan.stats)
  direct = baseline.ThresholdBaseline.fit(norm, labels, 4)
  np.testing.assert_array_equal(base.cuts, direct.cuts)
  np.testing.assert_array_equal(baseline.predict_scan(base, scan), direct.predict(norm))
