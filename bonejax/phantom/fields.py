"""Building blocks of the phantoms: random fields, polar coordinates and tubes along curves.

Everything is generated at the final voxel grid (no upsampling) and vectorised: a band-passed
noise is one real FFT, a set of tubes is one Euclidean distance transform.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import fft, ndimage


def _freq_sq(shape: Sequence[int], sigmas: Sequence[float]) -> np.ndarray:
  """(2 pi f sigma)^2 summed over axes on the rfftn grid: the exponent of a Gaussian filter."""
  axes = []
  for i, (n, s) in enumerate(zip(shape, sigmas)):
    f = fft.rfftfreq(n) if i == len(shape) - 1 else fft.fftfreq(n)
    view = [1] * len(shape)
    view[i] = f.size
    axes.append(((2 * np.pi * f * s) ** 2).astype(np.float32).reshape(view))
  return sum(axes)


def noise_field(rng: np.random.Generator, shape: Sequence[int], sigma: Sequence[float],
                ratio: float | None = 2.0) -> np.ndarray:
  """Zero-mean, unit-std Gaussian random field, float32.

  Low-passed white noise (Gaussian of `sigma` voxels per axis), or band-passed (the difference
  of Gaussians sigma and ratio*sigma) when `ratio` is given. Periodic: one FFT, any sigma.
  """
  shape = tuple(int(s) for s in shape)
  white = rng.standard_normal(shape, dtype=np.float32)
  spec = fft.rfftn(white, workers=1)
  q = _freq_sq(shape, sigma)
  gain = np.exp(-0.5 * q)
  if ratio is not None:
    gain -= np.exp(-0.5 * q * ratio**2)
  out = fft.irfftn(spec * gain, s=shape, workers=1).astype(np.float32)
  out -= out.mean()
  std = float(out.std())
  return out / std if std > 0 else out


def smooth_curve(rng: np.random.Generator, n: int, scale: float, amplitude: float) -> np.ndarray:
  """A smooth random 1D function of length n (unit-std noise low-passed at `scale`) * amplitude."""
  x = ndimage.gaussian_filter1d(rng.standard_normal(n + 64), scale, mode="wrap")[32:32 + n]
  std = float(x.std())
  return (x / std if std > 0 else x) * amplitude


def polar(shape: Sequence[int], cy: np.ndarray, cx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Radius and angle of every voxel about a per-slice centre (cy[z], cx[z]), float32 (Z, Y, X)."""
  _, ny, nx = shape
  y = np.arange(ny, dtype=np.float32)[None, :, None] - np.asarray(cy, np.float32)[:, None, None]
  x = np.arange(nx, dtype=np.float32)[None, None, :] - np.asarray(cx, np.float32)[:, None, None]
  return np.hypot(y, x), np.arctan2(y, x)


def tubes(shape: Sequence[int], points: np.ndarray, radii: np.ndarray) -> np.ndarray:
  """Boolean mask of the union of balls (point i, radius i): tubes when points are dense curves.

  One distance transform with nearest-seed indices: a voxel is inside when its distance to the
  nearest centre-line voxel is within that centre's radius. Points must be spaced <= 1 voxel.
  """
  shape = tuple(int(s) for s in shape)
  mask = np.zeros(shape, bool)
  if len(points) == 0:
    return mask
  idx = np.rint(points).astype(np.int64)
  keep = np.all((idx >= 0) & (idx < np.array(shape)), axis=1)
  idx, radii = idx[keep], np.asarray(radii, np.float32)[keep]
  if len(idx) == 0:
    return mask
  # Work in the bounding box of the centre lines (plus the largest radius) only.
  pad = int(np.ceil(radii.max())) + 1
  lo = np.maximum(idx.min(0) - pad, 0)
  hi = np.minimum(idx.max(0) + pad + 1, shape)
  box = tuple(slice(a, b) for a, b in zip(lo, hi))
  local = idx - lo
  rad = np.zeros(tuple(hi - lo), np.float32)
  np.maximum.at(rad, tuple(local.T), radii)
  dist, near = ndimage.distance_transform_edt(rad == 0, return_indices=True)
  mask[box] = dist <= rad[tuple(near)]
  return mask


def remove_small(mask: np.ndarray, min_voxels: int) -> np.ndarray:
  """`mask` without its connected components (26-connected) smaller than min_voxels."""
  lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
  if n == 0:
    return mask
  sizes = np.bincount(lab.ravel())
  small = sizes < min_voxels
  small[0] = False
  return mask & ~small[lab]
