"""Border band against interior: are a prediction's voxels near the volume's faces worse?

The band is every voxel within `band` voxels of any of the six faces (distance to the nearest
face < band); the interior is the rest. Each gets its own confusion matrix and scores
(metrics.scores: IoU, Dice, miou_fg), so a report can say "pore IoU 0.87 in the outer 2
voxels, 0.95 inside". Streamed by Z slabs like metrics.streamed_confusion: one slab of each
volume in memory.
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


def border_confusion(pred: Any, truth: Any, num_classes: int, band: int = BAND,
                     ignore: int | None = None, slab: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """(border band, interior) confusion matrices (C, C) int64 of arrays or stores (Z, Y, X).

  `ignore`: the truth's unlabelled value (sparse labels), not counted."""
  shape = metrics.shape_of(truth)
  if metrics.shape_of(pred) != shape or len(shape) != 3:
    raise errors.UserError(f"prediction shape {metrics.shape_of(pred)} != truth shape {shape} "
                           "(or not a volume)")
  if int(band) < 1:
    raise errors.UserError(f"border band {band} must be >= 1 voxel")
  k = int(num_classes)
  border, inner = np.zeros((k, k), np.int64), np.zeros((k, k), np.int64)
  for z0 in range(0, shape[0], slab):
    z1 = min(z0 + slab, shape[0])
    p, t = metrics.read_slabs([pred, truth], z0, z1)
    m = band_mask(shape, band, z0, z1)
    keep = np.ones(m.shape, bool) if ignore is None else t != ignore
    border += metrics.confusion_matrix(p[m & keep], t[m & keep], k)
    inner += metrics.confusion_matrix(p[~m & keep], t[~m & keep], k)
  return border, inner


def border_scores(pred: Any, truth: Any, classes: Sequence[str], band: int = BAND,
                  ignore: int | None = None) -> dict[str, Any]:
  """{"band": band, "border": scores, "interior": scores, "gap_miou_fg": interior - border}."""
  b, i = border_confusion(pred, truth, len(classes), band, ignore)
  sb, si = metrics.scores(b, classes), metrics.scores(i, classes)
  return {"band": int(band), "border": sb, "interior": si,
          "gap_miou_fg": float(si["miou_fg"] - sb["miou_fg"])}
