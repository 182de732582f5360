"""Voxel sizes and resampling: one scan's grid onto another's, slab by slab.

Scans come at whatever voxel size the scanner gave (a few um on a desktop micro-CT, 0.3-1 um at a
synchrotron), but a model sees pixels: a network trained at 5 um finds trabeculae twice as thick
at 2.5 um. Scaling the U-net resamples every scan to 5 um (bilinear) before training and
prediction; here `import_volume.py --resample_um` does it on import, and `predict.py` resamples an
input to its bundle's voxel size, predicts there and maps each plane set's probabilities back to
the input grid before the vote (`Regrid`), so outputs always match the input voxel for voxel.

The grids share their outer edges: output voxel i of n_out covers input coordinate
(i + 0.5) * n_in / n_out - 0.5, so mapping there and back again returns to the same grid.
Images are interpolated linearly (trilinear, separably along Z, Y, X), labels by nearest
neighbour. `ResampledSource` wraps any `VolumeSource` and reads only the input slices an
output slab needs, so memory stays a slab's whatever the volume size.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from bonejax.core import errors

# Voxel sizes closer than this (relative) count as equal: no resampling for rounding noise.
SAME_SIZE_TOLERANCE = 0.01
# Input slices one read may take (downsampling by a large factor reads many per output slab).
MAX_INPUT_SLICES = 64


def as_zyx(voxel_size_um: Any) -> tuple[float, float, float] | None:
  """A voxel size as (z, y, x) in um: a number (isotropic) or three numbers; None stays None."""
  if voxel_size_um is None:
    return None
  if isinstance(voxel_size_um, (int, float, np.integer, np.floating)):
    v = (float(voxel_size_um),) * 3
  else:
    v = tuple(float(x) for x in voxel_size_um)
  if len(v) != 3 or not all(math.isfinite(x) and x > 0 for x in v):
    raise errors.UserError(f"voxel size {voxel_size_um!r} um must be a positive number or three "
                        f"(Z, Y, X)")
  return v


def isotropic(voxel_size_um: Sequence[float]) -> bool:
  v = as_zyx(voxel_size_um)
  return max(v) - min(v) <= SAME_SIZE_TOLERANCE * max(v)


def same_size(a: Any, b: Any) -> bool:
  a, b = as_zyx(a), as_zyx(b)
  return all(abs(x - y) <= SAME_SIZE_TOLERANCE * max(x, y) for x, y in zip(a, b))


def resampled_shape(shape: Sequence[int], from_um: Any, to_um: Any) -> tuple[int, int, int]:
  """The (Z, Y, X) shape covering the same extent at voxel size `to_um`."""
  f, t = as_zyx(from_um), as_zyx(to_um)
  return tuple(max(1, int(round(n * a / b))) for n, a, b in zip(shape[:3], f, t))


def axis_map(n_in: int, n_out: int, order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """For each output index along one axis: (lower input index, upper input index, weight of the
  upper). `order=0` (nearest) gives weight 0 and the nearest index as the lower."""
  x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
  x = np.clip(x, 0, n_in - 1)
  if order == 0:
    i = np.minimum(np.floor(x + 0.5).astype(np.int64), n_in - 1)
    return i, i, np.zeros(n_out, np.float32)
  i0 = np.floor(x).astype(np.int64)
  i1 = np.minimum(i0 + 1, n_in - 1)
  return i0, i1, (x - i0).astype(np.float32)


def _along(data: np.ndarray, axis: int, i0: np.ndarray, i1: np.ndarray, w: np.ndarray,
           order: int) -> np.ndarray:
  """`data` sampled along `axis` at the mapped positions (float32 for order 1)."""
  lo = np.take(data, i0, axis=axis)
  if order == 0:
    return lo
  hi = np.take(data, i1, axis=axis)
  shape = [1] * data.ndim
  shape[axis] = len(w)
  w = w.reshape(shape)
  return lo.astype(np.float32) * (1 - w) + hi.astype(np.float32) * w


def resample_slab(data: np.ndarray, z_map: tuple, out_yx: Sequence[int], order: int) -> np.ndarray:
  """Input slices (z, Y, X[, C]) -> output slices at `z_map` (indices relative to `data`), with
  Y and X resampled to `out_yx`."""
  out = _along(data, 0, *z_map, order)
  for axis, n_out in ((1, out_yx[0]), (2, out_yx[1])):
    if out.shape[axis] != n_out:
      out = _along(out, axis, *axis_map(out.shape[axis], n_out, order), order)
  return out


def cast_like(data: np.ndarray, dtype: np.dtype) -> np.ndarray:
  """Interpolated values back to `dtype`: integers rounded and clipped to their range."""
  dtype = np.dtype(dtype)
  if data.dtype == dtype:
    return data
  if np.issubdtype(dtype, np.integer):
    info = np.iinfo(dtype)
    return np.clip(np.rint(data), info.min, info.max).astype(dtype)
  return data.astype(dtype)


def working_bytes(in_shape: Sequence[int], out_shape: Sequence[int], in_itemsize: int,
                  out_itemsize: int) -> tuple[int, int]:
  """(fixed, per output slice): host bytes a `Resampler` read of n output slices holds at its
  peak, about fixed + n * per. Fixed: the input slices one read takes (at most
  MAX_INPUT_SLICES; `in_itemsize`: as read plus as converted). Per output slice: float32
  temporaries of the interpolation along Z, Y and X (each step holds its lower, upper,
  weighted and summed arrays) and the result cast back. An upper bound, checked before a
  single slice is read."""
  in_shape, out_shape = tuple(int(s) for s in in_shape), tuple(int(s) for s in out_shape)
  c = math.prod(in_shape[3:])
  in_yx = in_shape[1] * in_shape[2] * c
  fixed = min(MAX_INPUT_SLICES, in_shape[0]) * in_yx * in_itemsize
  steps = in_yx + out_shape[1] * in_shape[2] * c + out_shape[1] * out_shape[2] * c
  per = 4 * 4 * steps + out_shape[1] * out_shape[2] * c * out_itemsize
  return fixed, per


class Resampler:
  """Reads slabs of a (Z, Y, X[, C]) volume on another grid, through `read(z0, z1)` of the
  input; `order` 1 (linear, images and probabilities) or 0 (nearest, labels)."""

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], order: int):
    self.in_shape, self.out_shape = tuple(in_shape[:3]), tuple(out_shape[:3])
    self.order = order
    self.z0s, self.z1s, self.zw = axis_map(self.in_shape[0], self.out_shape[0], order)

  def input_range(self, z0: int, z1: int) -> tuple[int, int]:
    """The input slices output slices z0..z1-1 need."""
    return int(self.z0s[z0]), int(self.z1s[z1 - 1]) + 1

  def read(self, read, z0: int, z1: int, dtype: Any = None) -> np.ndarray:
    """Output slices z0..z1-1, from `read(a, b)` giving input slices a..b-1; at most
    MAX_INPUT_SLICES input slices are held at a time."""
    parts, s = [], z0
    while s < z1:
      e = s + 1
      while e < z1 and self.input_range(s, e + 1)[1] - self.input_range(s, e + 1)[0] \
          <= MAX_INPUT_SLICES:
        e += 1
      a, b = self.input_range(s, e)
      data = np.asarray(read(a, b))
      z_map = (self.z0s[s:e] - a, self.z1s[s:e] - a, self.zw[s:e])
      out = resample_slab(data, z_map, self.out_shape[1:], self.order)
      parts.append(cast_like(out, dtype) if dtype is not None else out)
      s = e
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class ResampledSource:
  """A `VolumeSource` seen on another grid: same interface (`shape`, `dtype`, `read_slab`,
  `voxel_size_um`, ...), slabs read and resampled on demand. Integer images are rounded back
  to their dtype, so an import keeps its bit depth."""

  def __init__(self, src: Any, voxel_size_um: Any, order: int | None = None):
    self.src = src
    self.voxel_size_um = as_zyx(voxel_size_um)
    if src.voxel_size_um is None:
      raise errors.UserError(f"cannot resample {str(src.path)!r}: its voxel size is unknown "
                          f"(give it with --voxel_size_um)")
    shape3 = resampled_shape(src.shape, src.voxel_size_um, self.voxel_size_um)
    self.shape = shape3 + tuple(src.shape[3:])
    self.order = order if order is not None else (0 if src.array == "labels" else 1)
    self._resampler = Resampler(src.shape, self.shape, self.order)
    for name in ("path", "array", "kind", "channels", "dtype", "source_dtype"):
      setattr(self, name, getattr(src, name))
    self.stats = None  # the statistics of the resampled intensities are computed anew
    self.from_voxel_size_um = src.voxel_size_um

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * np.dtype(self.dtype).itemsize

  def working_bytes(self) -> tuple[int, int]:
    """(fixed, per output slice) host bytes of `read_slab` (see `working_bytes`)."""
    return working_bytes(self.src.shape, self.shape, np.dtype(self.src.source_dtype).itemsize
                         + np.dtype(self.src.dtype).itemsize, np.dtype(self.dtype).itemsize)

  @property
  def tensorstore(self):
    return None

  def read_slab(self, z0: int, z1: int) -> np.ndarray:
    z0, z1 = max(0, int(z0)), min(self.shape[0], int(z1))
    if z1 <= z0:
      return np.zeros((0,) + self.shape[1:], self.dtype)
    return self._resampler.read(self.src.read_slab, z0, z1, self.dtype)

  def close(self) -> None:
    self.src.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ---------------------------------------------------------------------------------------------
# Prediction on the model's grid, votes on the input's.
# ---------------------------------------------------------------------------------------------


class Regrid:
  """Predicting on a resampled grid: `sink(fuser, runner)` wraps the run's fuser (on the input
  grid, `out_shape`) so each plane set's probabilities, made on the model grid (`model_shape`),
  are mapped back linearly before they are voted on."""

  def __init__(self, out_shape: Sequence[int], model_shape: Sequence[int]):
    self.out_shape, self.model_shape = tuple(out_shape[:3]), tuple(model_shape[:3])

  def sink(self, fuser: Any, runner: Any) -> "RegridSink":
    return RegridSink(self, fuser, runner)


class RegridSink:
  """Collects one plane set (or, for soft voting, a group summed before rotating back) on the
  model grid, then adds it to the fuser Z slab by Z slab on the input grid."""

  def __init__(self, regrid: Regrid, fuser: Any, runner: Any):
    from bonejax.predict.volumes import Accumulator
    self.fuser, self.runner = fuser, runner
    self.staging = Accumulator(runner.array("regrid", regrid.model_shape, np.float32,
                                            runner.k))
    self.resampler = Resampler(regrid.model_shape, regrid.out_shape, 1)
    self.soft_only = fuser.soft_only
    self.plane_set = None

  def begin(self, ps: Any = None) -> None:
    self.staging.first = True
    self.plane_set = ps  # weighted on the input grid, in the fuser

  def add(self, axis: int, s0: int, probs: np.ndarray) -> None:
    self.staging.add(axis, s0, probs)

  def end(self, n: int = 1) -> None:
    vol = self.staging.vol
    # Several processes: every share of the staging volume must be written before it is read,
    # and each process maps back its own (chunk-aligned) share of the input grid's Z.
    self.runner.sync("regrid staged")
    zs = self.runner.slab_planes(self.fuser.probs.vol, 0, 1)
    self.fuser.begin(self.plane_set)
    lo, depth = self.runner.share(self.resampler.out_shape[0])
    for z0 in range(lo, depth, zs):
      z1 = min(z0 + zs, depth)
      self.fuser.add(0, z0, self.resampler.read(lambda a, b: vol.read(0, a, b), z0, z1,
                                                np.float32))
    self.fuser.end(n)
