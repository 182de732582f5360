"""45-degree rotations of a volume about one axis, and back: the extra planes of "9 planes".

Scaling the U-net (Baltruschat et al. 2021) rotates the volume by 45 degrees about each of the
three axes (bilinear interpolation, zero fill, about the image centre, not cropped: the rotated
volume is larger), slices each rotated volume along the two axes the rotation changed (slicing
along the rotation axis would repeat a naive plane turned in-plane) and rotates the
probabilities back onto the original grid. That gives 3 x 2 = 6 new plane sets.

A rotation about `axis` acts on the other two axes (P, Q), in increasing order, identically for
every index along `axis`, so everything here works on chunks (n, P, Q, C) of planes taken
perpendicular to `axis` (`np.moveaxis(vol, axis, 0)`): memory is bounded by the chunk, and the
same functions serve in-memory and out-of-core volumes. The rotated volume keeps the axis order
of the original with (P, Q) replaced by (P2, Q2).

Coordinates are voxel centres. With c, s = cos, sin of the angle and centres ci, cq, ... :
  rotated (i, j) samples original  p = cp + c (i - ci) - s (j - cj),  q = cq + s (i - ci) + c (j - cj)
and the inverse takes the probabilities back. Samples outside the input take the fill value per
corner (scipy.ndimage.map_coordinates(order=1, mode="grid-constant") semantics). The predictor
fills raw intensities with the background's (`engine.background_value`): zero fill of the
paper's normalised images, whatever the normalisation rule.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEGREES = 45.0


@dataclasses.dataclass(frozen=True)
class Rotation:
  """A rotation by `degrees` about `axis` of a volume of `shape` (Z, Y, X)."""
  axis: int
  shape: tuple[int, int, int]
  degrees: float = DEGREES

  def __post_init__(self):
    if self.axis not in (0, 1, 2):
      raise ValueError(f"rotation axis must be 0, 1 or 2, got {self.axis}")
    object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

  @property
  def in_plane(self) -> tuple[int, int]:
    """(P, Q): the two axes the rotation moves, in increasing axis order."""
    p, q = (s for a, s in enumerate(self.shape) if a != self.axis)
    return p, q

  @property
  def out_plane(self) -> tuple[int, int]:
    """(P2, Q2): the smallest grid holding every rotated voxel centre (nothing is cropped)."""
    p, q = self.in_plane
    c, s = abs(math.cos(self.radians)), abs(math.sin(self.radians))
    span_i = c * (p - 1) + s * (q - 1)
    span_j = s * (p - 1) + c * (q - 1)
    return math.ceil(span_i - 1e-6) + 1, math.ceil(span_j - 1e-6) + 1

  @property
  def rotated_shape(self) -> tuple[int, int, int]:
    out = list(self.out_plane)
    out.insert(self.axis, self.shape[self.axis])
    return tuple(out)

  @property
  def radians(self) -> float:
    return math.radians(self.degrees)

  def forward_coords(self, xp=np):
    """For each rotated-grid voxel (P2, Q2): where it samples the original plane (rows, cols)."""
    return _coords(self.out_plane, self.in_plane, self.radians, xp)

  def backward_coords(self, xp=np):
    """For each original voxel (P, Q): where it samples the rotated plane (rows, cols)."""
    return _coords(self.in_plane, self.out_plane, -self.radians, xp)


def _coords(grid: Sequence[int], source: Sequence[int], theta: float, xp):
  """Maps the centred `grid` into the centred `source` by a rotation of theta."""
  dtype = np.float64 if xp is np else jnp.float32
  i = xp.arange(grid[0], dtype=dtype)[:, None] - (grid[0] - 1) / 2.0
  j = xp.arange(grid[1], dtype=dtype)[None, :] - (grid[1] - 1) / 2.0
  c, s = math.cos(theta), math.sin(theta)
  rows = (source[0] - 1) / 2.0 + c * i - s * j
  cols = (source[1] - 1) / 2.0 + s * i + c * j
  return rows, cols


def bilinear(img: jax.Array, rows: jax.Array, cols: jax.Array, fill) -> jax.Array:
  """Samples img (n, P, Q, C) at float (rows, cols) of any 2D shape -> (n, *rows.shape, C).

  Corners outside the image contribute `fill` (scipy's mode="grid-constant").
  """
  p, q = img.shape[1], img.shape[2]
  r0, c0 = jnp.floor(rows), jnp.floor(cols)
  fr, fc = (rows - r0)[None, ..., None], (cols - c0)[None, ..., None]
  r0, c0 = r0.astype(jnp.int32), c0.astype(jnp.int32)
  img = img.astype(jnp.float32)
  fill = jnp.asarray(fill, jnp.float32)
  out = 0.0
  for dr, dc in ((0, 0), (0, 1), (1, 0), (1, 1)):
    r, c = r0 + dr, c0 + dc
    inside = ((r >= 0) & (r < p) & (c >= 0) & (c < q))[None, ..., None]
    v = img[:, jnp.clip(r, 0, p - 1), jnp.clip(c, 0, q - 1)]
    w = (fr if dr else 1.0 - fr) * (fc if dc else 1.0 - fc)
    out = out + w * jnp.where(inside, v, fill)
  return out


def _cast(x: jax.Array, dtype: np.dtype) -> jax.Array:
  dtype = np.dtype(dtype)
  if np.issubdtype(dtype, np.integer):
    info = np.iinfo(dtype)
    return jnp.clip(jnp.round(x), info.min, info.max).astype(dtype)
  return x.astype(dtype)


@functools.partial(jax.jit, static_argnames=("rot", "out_dtype"))
def rotate_chunk(x: jax.Array, fill, *, rot: Rotation, out_dtype=None) -> jax.Array:
  """Planes (n, P, Q, C) perpendicular to rot.axis -> rotated planes (n, P2, Q2, C).

  `fill` is the value of new voxels (a traced scalar: no recompile per scan). Integer images are
  rounded back to their dtype (or to `out_dtype`).
  """
  rows, cols = rot.forward_coords(jnp)
  out = bilinear(x, rows, cols, fill)
  return _cast(out, out_dtype or x.dtype)


@functools.partial(jax.jit, static_argnames=("rot",))
def unrotate_chunk(y: jax.Array, *, rot: Rotation) -> jax.Array:
  """Rotated planes (n, P2, Q2, K) -> float32 planes (n, P, Q, K) on the original grid."""
  rows, cols = rot.backward_coords(jnp)
  return bilinear(y, rows, cols, 0.0)


def _chunked(fn, x: np.ndarray, chunk: int, out_plane, out_dtype) -> np.ndarray:
  """Applies fn to fixed-size chunks along axis 0 (the last one padded: one compile)."""
  n = x.shape[0]
  out = np.empty((n,) + tuple(out_plane) + x.shape[3:], out_dtype)
  chunk = max(1, min(chunk, n))
  for a0 in range(0, n, chunk):
    part = x[a0:a0 + chunk]
    m = part.shape[0]
    if m < chunk:
      part = np.concatenate([part, np.zeros((chunk - m,) + part.shape[1:], part.dtype)])
    out[a0:a0 + m] = np.asarray(fn(part))[:m]
  return out


def rotate_volume(vol: np.ndarray, axis: int, degrees: float = DEGREES, fill: float = 0.0,
                  chunk: int = 16) -> np.ndarray:
  """A whole in-memory volume (Z, Y, X) or (Z, Y, X, C) rotated about `axis` (not cropped)."""
  squeeze = vol.ndim == 3
  v = vol[..., None] if squeeze else vol
  rot = Rotation(axis, v.shape[:3], degrees)
  planes = np.moveaxis(v, axis, 0)
  fn = functools.partial(rotate_chunk, fill=np.float32(fill), rot=rot)
  out = np.moveaxis(_chunked(fn, planes, chunk, rot.out_plane, v.dtype), 0, axis)
  return out[..., 0] if squeeze else out


def unrotate_volume(rvol: np.ndarray, rot: Rotation, chunk: int = 16) -> np.ndarray:
  """Float32 (rotated_shape[, K]) -> the original grid (shape[, K]) of `rot`."""
  squeeze = rvol.ndim == 3
  v = rvol[..., None] if squeeze else rvol
  planes = np.moveaxis(v, rot.axis, 0)
  fn = functools.partial(unrotate_chunk, rot=rot)
  out = np.moveaxis(_chunked(fn, planes, chunk, rot.in_plane, np.float32), 0, rot.axis)
  return out[..., 0] if squeeze else out
