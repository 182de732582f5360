"""Intensity statistics of a scan (computed once at import) and normalisation rules.

Statistics are accumulated slab by slab so any volume size works:
- integer images (uint8/uint16): an exact histogram, so the percentiles are exact;
- float images: exact mean/std (float64 sums) and percentiles from a deterministic sample of
  at most SAMPLE_SIZE voxels (every k-th voxel, k chosen from the volume size), which places
  the 0.5/99.9 percentiles within about 0.1 percentile rank for any volume.

Normalisation rules (`rule` in model bundles and configs):
- "percentile": clip (x - p0.5) / (p99.9 - p0.5) to [0, 1] (Scaling the U-net; the default);
- "zscore": (x - mean) / std over all voxels;
- "zscore_nonzero": (x - mean_nonzero) / std_nonzero, the statistics of the voxels > 0 only, as
  BONe (DLFit) computes them: a reconstructed scan's zero padding (the corners outside the
  reconstruction circle, blank slices) would otherwise pull the mean down and inflate the std by
  an amount that depends on the field of view, not on the sample.
The voxels > 0 statistics (`mean_nonzero`, `std_nonzero`, `voxels_nonzero`) are stored at import
beside the others; scans imported before they existed lack them, and `nonzero_stats` computes
them from the image when a run needs them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bonejax.core import errors

PERCENTILES = (0.5, 99.9)
SAMPLE_SIZE = 1 << 22
RULES = ("percentile", "zscore", "zscore_nonzero")
NONZERO_KEYS = ("mean_nonzero", "std_nonzero")


def validate_image(image: np.ndarray) -> None:
  """Rejects what no model can use: NaN/Inf, empty volumes, unsupported dtypes."""
  if image.size == 0:
    raise errors.UserError(f"image is empty (shape {image.shape})")
  if np.issubdtype(image.dtype, np.floating):
    if not np.isfinite(image).all():
      bad = "NaN" if np.isnan(image).any() else "Inf"
      raise errors.UserError(f"image contains {bad} values")
  elif not np.issubdtype(image.dtype, np.integer) and image.dtype != np.bool_:
    raise errors.UserError(f"image dtype {image.dtype} is not numeric")


class StatsAccumulator:
  """Streams slabs in, gives the stored statistics out."""

  def __init__(self, dtype: np.dtype, total_voxels: int):
    self.dtype = np.dtype(dtype)
    self.integer = np.issubdtype(self.dtype, np.integer)
    self.n = 0
    self.sum = 0.0
    self.sumsq = 0.0
    self.min = np.inf
    self.max = -np.inf
    self.n_pos = 0  # voxels > 0 (floats; integer images read them off the histogram)
    self.sum_pos = 0.0
    self.sumsq_pos = 0.0
    if self.integer:
      if self.dtype.itemsize > 2 or np.issubdtype(self.dtype, np.signedinteger):
        raise errors.UserError(f"integer image dtype {self.dtype} is not supported (uint8/uint16)")
      self.hist = np.zeros(1 << (8 * self.dtype.itemsize), np.int64)
    else:
      self.stride = max(1, -(-int(total_voxels) // SAMPLE_SIZE))
      self.samples: list[np.ndarray] = []
      self._offset = 0  # global voxel index of the next slab, for a stride independent of slabs

  def update(self, slab: np.ndarray) -> None:
    validate_image(slab)
    flat = slab.reshape(-1)
    f64 = flat.astype(np.float64)
    self.n += flat.size
    self.sum += float(f64.sum())
    self.sumsq += float(np.square(f64).sum())
    self.min = min(self.min, float(f64.min()))
    self.max = max(self.max, float(f64.max()))
    if self.integer:
      self.hist += np.bincount(flat, minlength=self.hist.size)[: self.hist.size]
    else:
      pos = f64[f64 > 0]
      self.n_pos += pos.size
      self.sum_pos += float(pos.sum())
      self.sumsq_pos += float(np.square(pos).sum())
      first = (-self._offset) % self.stride
      self.samples.append(flat[first::self.stride].astype(np.float64))
      self._offset += flat.size

  def finalize(self) -> dict[str, Any]:
    if self.n == 0:
      raise errors.UserError("image is empty")
    mean = self.sum / self.n
    var = max(self.sumsq / self.n - mean * mean, 0.0)
    if self.integer:
      cdf = np.cumsum(self.hist)
      # Same convention as np.percentile(..., method="lower") on the full volume.
      lo, hi = (int(np.searchsorted(cdf, (q / 100.0) * (self.n - 1), side="right"))
                for q in PERCENTILES)
      method = "exact histogram"
      values = np.arange(1, self.hist.size, dtype=np.float64)
      counts = self.hist[1:].astype(np.float64)
      n_pos, sum_pos = int(self.hist[1:].sum()), float(counts @ values)
      sumsq_pos = float(counts @ np.square(values))
    else:
      sample = np.concatenate(self.samples)
      lo, hi = (float(v) for v in np.percentile(sample, PERCENTILES, method="lower"))
      method = f"sample of every {self.stride}th voxel ({sample.size} voxels)"
      n_pos, sum_pos, sumsq_pos = self.n_pos, self.sum_pos, self.sumsq_pos
    std = float(np.sqrt(var))
    # No voxel > 0 (an all-zero or all-negative image): the all-voxel figures stand in.
    mean_pos = sum_pos / n_pos if n_pos else mean
    std_pos = float(np.sqrt(max(sumsq_pos / n_pos - mean_pos * mean_pos, 0.0))) if n_pos else std
    return {"p0_5": float(lo), "p99_9": float(hi), "mean": mean, "std": std,
            "mean_nonzero": mean_pos, "std_nonzero": std_pos, "voxels_nonzero": int(n_pos),
            "min": self.min, "max": self.max, "voxels": self.n, "dtype": self.dtype.name,
            "method": method}


def compute_stats(image: np.ndarray, slab: int = 64) -> dict[str, Any]:
  acc = StatsAccumulator(image.dtype, image.size)
  for z in range(0, image.shape[0], slab):
    acc.update(np.asarray(image[z:z + slab]))
  return acc.finalize()


def normalize(x, stats: dict[str, Any], rule: str = "percentile"):
  """float32 normalised intensities; works on numpy and jax arrays alike."""
  offset, scale, clip = normalize_params(stats, rule)
  out = (x.astype("float32") - offset) * scale
  return out.clip(0.0, 1.0) if clip else out


def normalize_params(stats: dict[str, Any], rule: str = "percentile") -> tuple[float, float, bool]:
  """(offset, scale, clip) such that normalize(x) == clip?((x - offset) * scale).

  Lets a jitted function normalise raw uint16 on the device from two scalars.
  """
  if rule == "percentile":
    lo, hi = float(stats["p0_5"]), float(stats["p99_9"])
    return lo, 1.0 / max(hi - lo, 1e-12), True
  if rule == "zscore":
    return float(stats["mean"]), 1.0 / max(float(stats["std"]), 1e-12), False
  if rule == "zscore_nonzero":
    if not has_stats(stats, rule):
      raise errors.UserError("the intensity statistics lack mean_nonzero / std_nonzero (a scan "
                          "imported before bonejax stored them): re-import the scan, or let "
                          "nonzero_stats compute them")
    return (float(stats["mean_nonzero"]), 1.0 / max(float(stats["std_nonzero"]), 1e-12), False)
  raise errors.UserError(f"unknown normalisation rule {rule!r} (known: {', '.join(RULES)})")


def has_stats(stats: dict[str, Any] | None, rule: str) -> bool:
  """Whether `stats` holds what `rule` reads."""
  if stats is None:
    return False
  need = {"percentile": ("p0_5", "p99_9"), "zscore": ("mean", "std"),
          "zscore_nonzero": NONZERO_KEYS}.get(rule, ())
  return all(stats.get(k) is not None for k in need)


def nonzero_stats(stats: dict[str, Any], read_slab, depth: int, slab: int = 16) -> dict[str, Any]:
  """`stats` completed with the voxels > 0 figures, computed from `read_slab(z0, z1)` slabs
  when they are missing (scans imported before they were stored); unchanged otherwise."""
  if has_stats(stats, "zscore_nonzero"):
    return stats
  n, s, ss = 0, 0.0, 0.0
  for z0 in range(0, int(depth), slab):
    v = np.asarray(read_slab(z0, min(z0 + slab, int(depth)))).reshape(-1).astype(np.float64)
    v = v[v > 0]
    n, s, ss = n + v.size, s + float(v.sum()), ss + float(np.square(v).sum())
  mean = s / n if n else float(stats["mean"])
  std = float(np.sqrt(max(ss / n - mean * mean, 0.0))) if n else float(stats["std"])
  return dict(stats, mean_nonzero=mean, std_nonzero=std, voxels_nonzero=n)
