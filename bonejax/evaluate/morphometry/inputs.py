"""Checking what the user passed (labels, classes, voxel size, region of interest) and cutting a
volume into blocks with a halo, so every index can be computed in bounded memory.

A volume may be any array-like with `.shape` and numpy slicing (a numpy array, `np.memmap`, a
zarr or tensorstore array read block by block): only one padded block is in memory at a time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Sequence

import numpy as np

from bonejax.core import errors


@dataclasses.dataclass(frozen=True)
class Box:
  """A box region of interest: voxel index ranges [start, stop) along Z, Y, X."""
  start: tuple[int, int, int]
  stop: tuple[int, int, int]

  @property
  def shape(self) -> tuple[int, int, int]:
    return tuple(b - a for a, b in zip(self.start, self.stop))

  def slices(self) -> tuple[slice, slice, slice]:
    return tuple(slice(a, b) for a, b in zip(self.start, self.stop))


def voxel_size(value: float | Sequence[float]) -> tuple[float, float, float]:
  """One number or (Z, Y, X) in micrometres -> three positive finite floats."""
  v = [value] * 3 if np.isscalar(value) else list(value)
  if len(v) != 3:
    raise errors.UserError(f"voxel size {value!r} must be one number or Z,Y,X (three numbers)")
  try:
    out = tuple(float(x) for x in v)
  except (TypeError, ValueError):
    raise errors.UserError(f"voxel size {value!r} is not a number") from None
  if not all(math.isfinite(x) and x > 0 for x in out):
    raise errors.UserError(f"voxel size {value!r} um must be positive and finite (no zero, NaN)")
  return out


def classes(value: int | Sequence[int] | None, is_mask: bool) -> tuple[int, ...]:
  if is_mask:
    return (1,)
  if value is None:
    raise errors.UserError("a labels volume needs a class index (or indices) to measure")
  vals = (value,) if np.isscalar(value) else tuple(value)
  if not vals:
    raise errors.UserError("no class index given")
  out = []
  for c in vals:
    if isinstance(c, (bool, np.bool_)) or not float(c).is_integer():
      raise errors.UserError(f"class index {c!r} is not an integer")
    out.append(int(c))
  return tuple(out)


def volume(labels: Any, name: str = "labels") -> Any:
  shape = getattr(labels, "shape", None)
  if shape is None:
    labels = np.asarray(labels)
    shape = labels.shape
  if len(shape) != 3:
    raise errors.UserError(f"{name} must be a 3D volume (Z, Y, X), got shape {tuple(shape)}")
  if min(shape) < 2:
    raise errors.UserError(f"{name} shape {tuple(shape)} is too small: at least 2 voxels a side")
  dtype = np.dtype(getattr(labels, "dtype", np.asarray(labels[:1, :1, :1]).dtype))
  if not (dtype == bool or np.issubdtype(dtype, np.integer)):
    raise errors.UserError(f"{name} must hold integers or booleans, got {dtype}")
  return labels


def roi(value: Any, shape: Sequence[int]) -> Box | Any | None:
  """None, a Box (or ((z0,y0,x0),(z1,y1,x1))), or a mask volume of the labels' shape."""
  if value is None:
    return None
  if isinstance(value, Box) or (isinstance(value, (tuple, list)) and len(value) == 2
                                and all(np.ndim(v) == 1 for v in value)):
    box = value if isinstance(value, Box) else Box(tuple(int(v) for v in value[0]),
                                                   tuple(int(v) for v in value[1]))
    if len(box.start) != 3 or len(box.stop) != 3 or any(
        not 0 <= a < b <= n for a, b, n in zip(box.start, box.stop, shape)):
      raise errors.UserError(f"ROI box {box.start}..{box.stop} is empty or outside the volume "
                             f"of shape {tuple(shape)}")
    return box
  mshape = tuple(getattr(value, "shape", np.shape(value)))
  if mshape != tuple(shape):
    raise errors.UserError(f"ROI mask shape {mshape} differs from the labels shape {tuple(shape)}")
  return value


def phase(block: np.ndarray, class_ids: Sequence[int], is_mask: bool) -> np.ndarray:
  block = np.asarray(block)
  if is_mask:
    return block.astype(bool, copy=False) if block.dtype == bool else block != 0
  return np.isin(block, class_ids) if len(class_ids) > 1 else block == class_ids[0]


@dataclasses.dataclass(frozen=True)
class Block:
  """A core region and the padded region around it (both as slices of the whole volume)."""
  core: tuple[slice, slice, slice]
  padded: tuple[slice, slice, slice]

  @property
  def inner(self) -> tuple[slice, slice, slice]:
    """The core as slices of the padded block."""
    return tuple(slice(c.start - p.start, c.stop - p.start) for c, p in zip(self.core, self.padded))


def block_side(shape: Sequence[int], halo: Sequence[int], max_voxels: int) -> int:
  """The largest cubic core whose padded block holds at most `max_voxels` (whole volume if it
  fits), but at least the halo's width: smaller cores would spend most of the work on halos, so
  a block may hold up to (3 x halo)^3 voxels when that is more than `max_voxels`."""
  if math.prod(shape) <= max_voxels:
    return max(shape)
  floor = max(8, 2 * max(halo))
  side = max(floor, int(round(max_voxels ** (1 / 3))))
  while side > floor and math.prod(min(n, side + 2 * h) for n, h in zip(shape, halo)) > max_voxels:
    side -= 8
  return max(side, floor)


def blocks(shape: Sequence[int], side: int, halo: Sequence[int],
           extra_after: int = 0) -> Iterator[Block]:
  """Cores of `side` voxels tiling `shape`, each padded by `halo` voxels per axis (clipped).

  `extra_after` extends every core by that many voxels at its upper end (clipped) without
  changing the tiling: marching cubes and 2x2x2 windows need the next plane of voxels.
  """
  ranges = [range(0, n, side) for n in shape]
  for z in ranges[0]:
    for y in ranges[1]:
      for x in ranges[2]:
        core = tuple(slice(a, min(a + side + extra_after, n)) for a, n in zip((z, y, x), shape))
        padded = tuple(slice(max(0, c.start - h), min(n, c.stop + h))
                       for c, h, n in zip(core, halo, shape))
        yield Block(core, padded)
