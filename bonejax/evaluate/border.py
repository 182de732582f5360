"""Border band against interior: are a prediction's voxels near the volume's faces worse?

The band is every voxel within `band` voxels of any of the six faces (distance to the nearest
face < band); the interior is the rest. Each gets its own confusion matrix and scores
(metrics.scores: IoU, Dice, miou_fg), so a report can say "pore IoU 0.87 in the outer 2
voxels, 0.95 inside". Streamed by Z slabs like metrics.streamed_confusion: one slab of each
volume in memory. evaluate.py reports it (`--border_band`, default 2 voxels: `section`), fed
by its confusion pass (`BandCounter`); the trainer's volume evaluator scores it on the voted
validation volumes (`slab_confusion` over the whole volume, already in memory).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from bonejax.core import errors
from bonejax.evaluate import metrics

BAND = 2  # voxels: the outer 2 voxels, as issue 28 measured them


def band_mask(shape: Sequence[int], band: int, z0: int = 0, z1: int | None = None) -> np.ndarray:
  """bool (z1 - z0, Y, X): True for voxels of slices z0..z1-1 of a `shape` volume within
  `band` voxels of a face."""
  z, y, x = (int(s) for s in shape)
  z1 = z if z1 is None else int(z1)
  zz = np.arange(z0, z1)
  dz = np.minimum(zz, z - 1 - zz)[:, None, None]
  dy = np.minimum(np.arange(y), y - 1 - np.arange(y))[None, :, None]
  dx = np.minimum(np.arange(x), x - 1 - np.arange(x))[None, None, :]
  return np.minimum(np.minimum(dz, dy), dx) < band


def slab_confusion(pred: np.ndarray, truth: np.ndarray, shape: Sequence[int], num_classes: int,
                   band: int, z0: int = 0,
                   ignore: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(border band, interior) confusion matrices (C, C) int64 of the Z slab z0.. of a `shape`
  volume (the whole volume with z0 = 0).

  One bincount, not two masked copies: the truth is shifted by C in the band, so a (2C, 2C)
  matrix holds the interior in its first C rows and the band in the next C. Truth voxels equal
  to `ignore` (sparse labels' unlabelled value) are not counted."""
  k = int(num_classes)
  pred, truth = np.asarray(pred), np.asarray(truth)
  m = band_mask(shape, band, z0, z0 + truth.shape[0])
  wide = np.int16 if truth.dtype.itemsize == 1 and k <= 256 else np.int32  # uint8 labels: 2 B
  both = truth.astype(wide) + wide(k) * m
  if ignore is not None:
    both[truth == ignore] = -1
  cm = metrics.confusion_matrix(pred, both, 2 * k, ignore=-1 if ignore is not None else None)
  if cm[:, k:].any():
    raise errors.UserError(f"prediction label value >= number of classes {k}")
  return cm[k:, :k], cm[:k, :k]


class BandCounter:
  """The band and interior matrices, fed the Z slabs another pass reads (report.evaluate's
  confusion pass: `update(z0, pred, truth)`), so the volumes are read once."""

  def __init__(self, shape: Sequence[int], num_classes: int, band: int = BAND,
               ignore: int | None = None):
    self.shape, self.band, self.ignore = tuple(int(s) for s in shape), check_band(band), ignore
    k = int(num_classes)
    self.border, self.inner = np.zeros((k, k), np.int64), np.zeros((k, k), np.int64)

  def update(self, z0: int, pred: np.ndarray, truth: np.ndarray) -> None:
    b, i = slab_confusion(pred, truth, self.shape, self.border.shape[0], self.band, z0,
                          self.ignore)
    self.border += b
    self.inner += i


def check_band(band: Any) -> int:
  if isinstance(band, bool) or int(band) != band or int(band) < 1:
    raise errors.UserError(f"border band {band!r} must be an integer >= 1 voxel")
  return int(band)


def border_confusion(pred: Any, truth: Any, num_classes: int, band: int = BAND,
                     ignore: int | None = None, slab: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """(border band, interior) confusion matrices (C, C) int64 of arrays or stores (Z, Y, X).

  `ignore`: the truth's unlabelled value (sparse labels), not counted."""
  shape = metrics.shape_of(truth)
  if metrics.shape_of(pred) != shape or len(shape) != 3:
    raise errors.UserError(f"prediction shape {metrics.shape_of(pred)} != truth shape {shape} "
                           "(or not a volume)")
  counter = BandCounter(shape, num_classes, band, ignore)
  for z0 in range(0, shape[0], slab):
    z1 = min(z0 + slab, shape[0])
    p, t = metrics.read_slabs([pred, truth], z0, z1)
    counter.update(z0, p, t)
  return counter.border, counter.inner


def border_scores(pred: Any, truth: Any, classes: Sequence[str], band: int = BAND,
                  ignore: int | None = None) -> dict[str, Any]:
  """{"band": band, "border": scores, "interior": scores, "gap_miou_fg": interior - border}."""
  b, i = border_confusion(pred, truth, len(classes), band, ignore)
  sb, si = metrics.scores(b, classes), metrics.scores(i, classes)
  return {"band": int(band), "border": sb, "interior": si,
          "gap_miou_fg": float(si["miou_fg"] - sb["miou_fg"])}


# ---------------------------------------------------------------------------------------------
# The report's section (evaluate.py: JSON, Markdown; html_report draws the same table).
# ---------------------------------------------------------------------------------------------


def _diff(inner: float, border: float) -> float:
  return float(inner - border)  # NaN when either is undefined (written as null)


def section(border_cm: np.ndarray, inner_cm: np.ndarray, classes: Sequence[str],
            band: int) -> dict[str, Any]:
  """The report's `border_band`: per class IoU in the band and inside, and the difference
  (interior - border: positive when the border is worse); the same for the means."""
  names = list(classes)
  k = len(names)
  sb = metrics.scores(np.asarray(border_cm)[:k, :k], names)
  si = metrics.scores(np.asarray(inner_cm)[:k, :k], names)
  per_class = {n: {"border": b, "interior": i, "difference": _diff(i, b)}
               for n, b, i in zip(names, sb["iou"], si["iou"])}
  means = {m: {"border": sb[m], "interior": si[m], "difference": _diff(si[m], sb[m])}
           for m in ("miou_all", "miou_fg")}
  return {"band_voxels": int(band), "voxels": {"border": sb["voxels"], "interior": si["voxels"]},
          "iou": per_class, **means}


def markdown_lines(sec: dict[str, Any], fmt) -> list[str]:
  """The section as a Markdown table; `fmt(value)` writes a number (n/a when undefined)."""
  band = sec["band_voxels"]
  v = sec["voxels"]
  lines = ["## Border band vs interior", "",
           f"IoU in the outer {band} voxel{'s' if band != 1 else ''} of the volume (within "
           f"{band} of a face; {v['border']:,} voxels) against the interior ({v['interior']:,} "
           "voxels); difference = interior - border (positive: the border is worse).", "",
           "| class | border IoU | interior IoU | difference |", "|---|---:|---:|---:|"]
  for i, (n, r) in enumerate(sec["iou"].items()):
    lines.append(f"| {i} {n} | {fmt(r['border'])} | {fmt(r['interior'])} | "
                 f"{fmt(r['difference'])} |")
  for m, label in (("miou_all", "mean, all classes"), ("miou_fg", "mean, foreground")):
    r = sec[m]
    lines.append(f"| {label} | {fmt(r['border'])} | {fmt(r['interior'])} | "
                 f"{fmt(r['difference'])} |")
  return lines + [""]
