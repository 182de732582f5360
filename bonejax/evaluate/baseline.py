"""The threshold baseline every report compares against: global multi-level Otsu.

`ThresholdBaseline.fit` pools the normalised training images into one histogram, cuts it into
num_classes grey bands with multi-level Otsu, and gives each band the class most frequent in it
on the training labels: a calibrated, honest lookup (a band may map to the same class as
another). `fit_unsupervised` maps the bands to classes in ascending order instead. Both read
volumes slab by slab along axis 0, so any size works.

Otsu here is exact on the histogram for any number of thresholds: it maximises the
between-class variance sum_k W_k mu_k^2 over all ways of cutting the bins into contiguous groups,
by dynamic programming (O(K B^2) for K classes and B bins).

    base = ThresholdBaseline.fit(train_images, train_labels, num_classes=3)
    pred = base.predict(test_image)            # uint8 labels, same shape
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from bonejax.core import errors

DEFAULT_BINS = 256
DEFAULT_SLAB = 16
# Normalised intensities: "percentile" lies in [0, 1]; "zscore" is clipped to +-5 std.
RANGES = {"percentile": (0.0, 1.0), "zscore": (-5.0, 5.0), "zscore_nonzero": (-5.0, 5.0)}


# ---------------------------------------------------------------------------------------------
# Histograms and Otsu.
# ---------------------------------------------------------------------------------------------


def bin_index(x: np.ndarray, bins: int, value_range: Sequence[float]) -> np.ndarray:
  """Histogram bin of every value; values outside the range fall in the end bins."""
  lo, hi = float(value_range[0]), float(value_range[1])
  idx = np.floor((np.asarray(x, np.float32) - lo) * (bins / (hi - lo)))
  return np.clip(np.nan_to_num(idx, nan=0.0), 0, bins - 1).astype(np.int32)


def _as_list(images: Any) -> list:
  """One array (3D volume or 2D image) or a sequence of them -> list of arrays."""
  if hasattr(images, "shape") and hasattr(images, "dtype"):
    return [images]
  return list(images)


def _slabs(array: Any, slab: int) -> Iterator[tuple[slice, np.ndarray]]:
  n = int(array.shape[0])
  for start in range(0, n, slab):
    sl = slice(start, min(start + slab, n))
    yield sl, np.asarray(array[sl])


def histogram(images: Any, bins: int = DEFAULT_BINS,
              value_range: Sequence[float] = RANGES["percentile"],
              slab: int = DEFAULT_SLAB) -> np.ndarray:
  """int64 counts of the pooled images, accumulated slab by slab."""
  hist = np.zeros(bins, np.int64)
  for image in _as_list(images):
    for _, x in _slabs(image, slab):
      hist += np.bincount(bin_index(x, bins, value_range).ravel(), minlength=bins)
  return hist


def otsu_cuts(hist: np.ndarray, n_thresholds: int) -> np.ndarray:
  """Bin indices c_1 < ... < c_n: class k holds bins [c_k, c_{k+1}) (c_0 = 0, c_{n+1} = B).

  Exact maximum of the between-class variance over all contiguous cuts with non-empty bin
  ranges; ties go to the lowest cut.
  """
  hist = np.asarray(hist, np.float64)
  nbins, k = hist.size, int(n_thresholds) + 1
  if n_thresholds < 1:
    raise ValueError(f"n_thresholds must be >= 1, got {n_thresholds}")
  if nbins < k:
    raise ValueError(f"{nbins} bins cannot be cut into {k} classes")
  centres = np.arange(nbins) + 0.5  # the objective is invariant to an affine map of values
  w = np.concatenate([[0.0], np.cumsum(hist)])
  s = np.concatenate([[0.0], np.cumsum(hist * centres)])
  # score[a, b] = S^2 / W of the group of bins [a, b); -inf where a >= b (empty range).
  dw = w[None, :] - w[:, None]
  ds = s[None, :] - s[:, None]
  with np.errstate(divide="ignore", invalid="ignore"):
    score = np.where(dw > 0, ds * ds / np.where(dw > 0, dw, 1.0), 0.0)
  a_idx = np.arange(nbins + 1)
  score[a_idx[:, None] >= a_idx[None, :]] = -np.inf
  best = score[0].copy()  # best[b]: one group covering bins [0, b)
  back = []
  for _ in range(1, k):
    total = best[:, None] + score  # previous groups end at a, the new one is [a, b)
    arg = np.argmax(total, axis=0)
    best = total[arg, a_idx]
    back.append(arg)
  cuts, b = [], nbins
  for arg in reversed(back):
    b = int(arg[b])
    cuts.append(b)
  return np.array(cuts[::-1], np.int64)


def between_class_score(hist: np.ndarray, cuts: Sequence[int]) -> float:
  """sum_k S_k^2 / W_k for the given cuts (the quantity Otsu maximises; for tests)."""
  hist = np.asarray(hist, np.float64)
  centres = np.arange(hist.size) + 0.5
  edges = [0, *[int(c) for c in cuts], hist.size]
  total = 0.0
  for a, b in zip(edges[:-1], edges[1:]):
    wk = hist[a:b].sum()
    if wk > 0:
      total += (hist[a:b] * centres[a:b]).sum() ** 2 / wk
  return total


def otsu_thresholds(image_normalised: Any, n_thresholds: int, bins: int = DEFAULT_BINS,
                    value_range: Sequence[float] = RANGES["percentile"]) -> np.ndarray:
  """Multi-level Otsu thresholds (ascending float grey values, at bin edges).

  A value v belongs to class k when thresholds[k-1] <= v < thresholds[k].
  """
  hist = histogram(image_normalised, bins, value_range)
  cuts = otsu_cuts(hist, n_thresholds)
  lo, hi = float(value_range[0]), float(value_range[1])
  return lo + cuts * ((hi - lo) / bins)


# ---------------------------------------------------------------------------------------------
# The baseline.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ThresholdBaseline:
  """Grey bands (cut at `cuts` of a `bins`-bin histogram over `value_range`) -> classes."""
  cuts: np.ndarray           # bin indices, ascending, num_classes - 1 of them
  band_classes: np.ndarray   # uint8 class of each of the num_classes bands
  num_classes: int
  bins: int = DEFAULT_BINS
  value_range: tuple[float, float] = RANGES["percentile"]

  @property
  def thresholds(self) -> np.ndarray:
    lo, hi = self.value_range
    return lo + np.asarray(self.cuts) * ((hi - lo) / self.bins)

  @classmethod
  def _cut(cls, images, num_classes, bins, value_range, slab):
    if int(num_classes) < 2:
      raise errors.UserError(f"num_classes must be >= 2, got {num_classes}")
    hist = histogram(images, bins, value_range, slab)
    if hist.sum() == 0:
      raise errors.UserError("no voxels to fit the threshold baseline on")
    return otsu_cuts(hist, int(num_classes) - 1)

  @classmethod
  def fit_unsupervised(cls, images: Any, num_classes: int, *, bins: int = DEFAULT_BINS,
                       value_range: Sequence[float] = RANGES["percentile"],
                       slab: int = DEFAULT_SLAB) -> "ThresholdBaseline":
    """Bands map to classes in ascending order (class 0 darkest)."""
    cuts = cls._cut(images, num_classes, bins, value_range, slab)
    return cls(cuts, np.arange(num_classes, dtype=np.uint8), int(num_classes), int(bins),
               tuple(float(v) for v in value_range))

  @classmethod
  def fit(cls, images: Any, labels: Any, num_classes: int, *, bins: int = DEFAULT_BINS,
          value_range: Sequence[float] = RANGES["percentile"],
          slab: int = DEFAULT_SLAB) -> "ThresholdBaseline":
    """Otsu bands from the pooled images, each mapped to its most frequent training class."""
    images, labels = _as_list(images), _as_list(labels)
    if len(images) != len(labels):
      raise errors.UserError(f"{len(images)} images but {len(labels)} label volumes")
    for i, (x, y) in enumerate(zip(images, labels)):
      if tuple(x.shape) != tuple(y.shape):
        raise errors.UserError(f"image {i}: shape {tuple(x.shape)} != labels {tuple(y.shape)}")
    base = cls.fit_unsupervised(images, num_classes, bins=bins, value_range=value_range,
                                slab=slab)
    k = base.num_classes
    counts = np.zeros((k, k), np.int64)  # rows: band, columns: class
    for x, y in zip(images, labels):
      for sl, xs in _slabs(x, slab):
        ys = np.asarray(y[sl]).astype(np.int64)
        if ys.size and (ys.min() < 0 or ys.max() >= k):
          raise errors.UserError(f"label value {int(ys.max())} outside 0..{k - 1}")
        band = base.bands(xs).astype(np.int64)
        counts += np.bincount((band * k + ys).ravel(), minlength=k * k).reshape(k, k)
    base.band_classes = _majority(counts)
    return base

  def bands(self, image_normalised: np.ndarray) -> np.ndarray:
    """Band (0..num_classes-1) of every voxel, consistent with the fitted histogram's bins."""
    idx = bin_index(image_normalised, self.bins, self.value_range)
    return np.searchsorted(np.asarray(self.cuts), idx, side="right").astype(np.uint8)

  def predict(self, image_normalised: Any, slab: int = DEFAULT_SLAB) -> np.ndarray:
    """uint8 labels of a normalised image (any shape; volumes go slab by slab)."""
    lut = np.asarray(self.band_classes, np.uint8)
    if getattr(image_normalised, "ndim", 0) < 3:
      return lut[self.bands(np.asarray(image_normalised))]
    out = np.empty(tuple(image_normalised.shape), np.uint8)
    for sl, xs in _slabs(image_normalised, slab):
      out[sl] = lut[self.bands(xs)]
    return out

  def to_dict(self) -> dict[str, Any]:
    return {"method": "global multi-level Otsu", "thresholds": self.thresholds.tolist(),
            "cuts": np.asarray(self.cuts).tolist(),
            "band_classes": np.asarray(self.band_classes).tolist(),
            "num_classes": self.num_classes, "bins": self.bins,
            "value_range": list(self.value_range)}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ThresholdBaseline":
    return cls(np.asarray(d["cuts"], np.int64), np.asarray(d["band_classes"], np.uint8),
               int(d["num_classes"]), int(d["bins"]), tuple(d["value_range"]))


def _majority(counts: np.ndarray) -> np.ndarray:
  """Most frequent class per band; a band no training voxel fell in takes its nearest band's."""
  k = counts.shape[0]
  filled = np.flatnonzero(counts.sum(1) > 0)
  out = np.zeros(k, np.uint8)
  for band in range(k):
    src = filled[np.argmin(np.abs(filled - band))] if filled.size else band
    out[band] = np.argmax(counts[src]) if filled.size else min(band, k - 1)
  return out


# ---------------------------------------------------------------------------------------------
# Scans on disk.
# ---------------------------------------------------------------------------------------------


class _Normalised:
  """A scan's image seen through its normalisation, read lazily slab by slab."""

  def __init__(self, scan, rule: str):
    self.scan, self.rule = scan, rule
    self.shape = scan.shape
    self.dtype = np.dtype(np.float32)
    self.ndim = 3

  def __getitem__(self, sl):
    from bonejax.io import intensity
    return intensity.normalize(self.scan.image[sl].read().result(), self.scan.stats, self.rule)


def fit_scans(scans: Iterable, num_classes: int, rule: str = "percentile",
              supervised: bool = True, bins: int = DEFAULT_BINS) -> ThresholdBaseline:
  """Fits on store.Scan objects, normalising each with its stored statistics."""
  if rule not in RANGES:
    raise errors.UserError(f"unknown normalisation rule {rule!r} (known: {', '.join(RANGES)})")
  scans = list(scans)
  images = [_Normalised(s, rule) for s in scans]
  if not supervised:
    return ThresholdBaseline.fit_unsupervised(images, num_classes, bins=bins,
                                              value_range=RANGES[rule])
  for s in scans:
    if s.labels is None:
      raise errors.UserError(f"scan {s.name!r} has no labels to fit the baseline on")
  return ThresholdBaseline.fit(images, [s.labels for s in scans], num_classes, bins=bins,
                               value_range=RANGES[rule])


def predict_scan(base: ThresholdBaseline, scan, rule: str = "percentile") -> np.ndarray:
  return base.predict(_Normalised(scan, rule))
