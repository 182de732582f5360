"""The data both frameworks see: one scan, normalised the same way, and a pool of patches.

Pure numpy (no jax, no torch), so both workers cut identical batches from identical arrays.
Training throughput is measured on batches cycled from an in-memory pool: data loading is left
out on both sides (benchmarks/train_throughput.py measures bonejax's full input pipeline).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bonejax.data import store
from bonejax.io import intensity


def load_scan(path: str | Path, rule: str = "percentile") -> tuple[np.ndarray, np.ndarray | None]:
  """(normalised float32 image, uint8 labels or None) of a scan directory."""
  scan = store.open_scan(path)
  image = intensity.normalize(scan.read_image(), scan.stats, rule).astype(np.float32)
  labels = scan.read_labels() if scan.labels is not None else None
  return image, labels


def _plane(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
  return np.take(vol, index, axis=axis)


def _fit(plane: np.ndarray, patch: int) -> np.ndarray:
  """Mirror-pads a plane smaller than the patch (as bonejax's patch stream does)."""
  ph, pw = max(0, patch - plane.shape[0]), max(0, patch - plane.shape[1])
  if ph or pw:
    plane = np.pad(plane, ((0, ph), (0, pw)), mode="symmetric")
  return plane


def patch_pool(image: np.ndarray, labels: np.ndarray | None, patch: int, batch: int,
               num_batches: int, seed: int = 0, num_classes: int = 3
               ) -> list[tuple[np.ndarray, np.ndarray]]:
  """`num_batches` batches of random planes (any axis) cropped at random origins.

  Images are (B, patch, patch) float32, labels (B, patch, patch) int32 (random labels when the
  scan has none). Callers add the channel axis where their layout puts it.
  """
  rng = np.random.default_rng(seed)
  pool = []
  for _ in range(num_batches):
    xs, ys = [], []
    for _ in range(batch):
      axis = int(rng.integers(3))
      index = int(rng.integers(image.shape[axis]))
      x = _fit(_plane(image, axis, index), patch)
      y = _fit(_plane(labels, axis, index), patch) if labels is not None else \
          rng.integers(num_classes, size=x.shape).astype(np.uint8)
      i = int(rng.integers(x.shape[0] - patch + 1))
      j = int(rng.integers(x.shape[1] - patch + 1))
      xs.append(x[i:i + patch, j:j + patch])
      ys.append(y[i:i + patch, j:j + patch])
    pool.append((np.stack(xs).astype(np.float32), np.stack(ys).astype(np.int32)))
  return pool


def synthetic_scan(path: str | Path, shape: tuple[int, int, int], seed: int = 0,
                   num_classes: int = 3) -> Path:
  """A stand-in scan (smooth random blobs) for when bonejax.phantom is unavailable."""
  from scipy import ndimage
  rng = np.random.default_rng(seed)
  field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 3)
  field /= field.std() + 1e-6
  labels = np.digitize(field, [-0.3, 0.8]).astype(np.uint8) % num_classes
  image = (labels.astype(np.float32) * 60 + 40 + rng.normal(0, 12, shape)).clip(0, 255)
  store.write_scan(path, image.astype(np.uint8), labels, {"source": "synthetic blobs"},
                   num_classes=num_classes)
  return Path(path)
