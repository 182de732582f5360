"""`VolumeSource`: a lazily read (Z, Y, X) volume, or (Z, Y, X, C), whatever file it comes from.

Every reader (`tiff`, `slices`, `npy`, `zarr`, `ome_zarr`, `hdf5`, `mrc`, `isq`) is a subclass
that declares what it reads (`suffixes`, `magic`, or `claims_folder` for folder formats) and how
to open it (`open`); `registry.open_volume` picks the class. Readers of array-likes with
singleton axes to index away (numpy memmaps, tensorstore, h5py datasets) build on
`IndexedSource`.

Nothing reads a whole volume: `read_slab(z0, z1)` reads only those slices. Every source says
its voxel size, `voxel_size_um` = (Z, Y, X) in um, when the file records one, else None.

Channels: volumes are (Z, Y, X) by default. `channels=C` asks for a (Z, Y, X, C) array
(multi-channel models); `channels=None` takes what the file has (a last axis of size > 1 after
three others is the channel axis), and the source's `channels` says which.

Image dtypes: uint8, uint16 and float32 are kept; bool becomes uint8; every other integer type
(int8, int16 -- common in CT --, int32, int64, uint32, uint64) and float16/float64 become float32
(integers above 2**24 lose precision). Labels keep their integer type.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tensorstore as ts

from bonejax.core import errors

KEPT_DTYPES = ("uint8", "uint16", "float32")


def image_dtype_for(dtype: np.dtype) -> np.dtype:
  """The dtype an image of `dtype` is stored as (see the module docstring)."""
  dtype = np.dtype(dtype)
  if dtype.name in KEPT_DTYPES:
    return dtype.newbyteorder("=")
  if dtype == np.bool_:
    return np.dtype(np.uint8)
  if np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating):
    return np.dtype(np.float32)
  raise errors.UserError(f"unsupported dtype {dtype} (need an integer, float or bool volume)")


def label_dtype_for(dtype: np.dtype) -> np.dtype:
  dtype = np.dtype(dtype)
  if dtype == np.bool_:
    return np.dtype(np.uint8)
  if np.issubdtype(dtype, np.integer):
    return dtype.newbyteorder("=")
  raise errors.UserError(f"labels must be integers, got dtype {dtype}")


def squeeze_to_3d(shape: Sequence[int], what: str) -> list[int]:
  """The axes kept when dropping singleton axes (leading first) until three remain."""
  shape = tuple(int(s) for s in shape)
  if len(shape) < 3:
    raise errors.UserError(f"{what} is {len(shape)}D with shape {shape}; a volume is 3D (Z, Y, X)")
  keep = list(range(len(shape)))
  for axis in range(len(shape)):
    if len(keep) == 3:
      break
    if shape[axis] == 1:
      keep.remove(axis)
  if len(keep) != 3:
    raise errors.UserError(f"{what} has shape {shape}: more than 3 non-singleton axes; a volume "
                           f"is 3D (Z, Y, X) with one channel")
  return keep


def channels_of(shape: Sequence[int]) -> int:
  """The channels of an array shape: its last axis when, singleton axes dropped, at least four
  remain and the last is not 1 ((Z, Y, X, C), possibly with leading singletons); else 1."""
  shape = tuple(int(s) for s in shape)
  kept = [s for s in shape if s != 1]
  return shape[-1] if len(kept) >= 4 and shape[-1] != 1 else 1


def keep_axes(shape: Sequence[int], what: str, channels: int) -> list[int]:
  """The axes of a (Z, Y, X) volume, or of a (Z, Y, X, C) one with C = `channels` > 1."""
  shape = tuple(int(s) for s in shape)
  if channels == 1:
    return squeeze_to_3d(shape, what)
  if len(shape) < 4 or shape[-1] != channels or len([s for s in shape if s != 1]) > 4:
    raise errors.UserError(f"{what} has shape {shape}: not a (Z, Y, X, {channels}) volume "
                           f"({channels} channels on the last axis)")
  return squeeze_to_3d(shape[:-1], what) + [len(shape) - 1]


def one_channel(p: Path, channels: int | None, what: str) -> None:
  """Refuses a multi-channel request for a format that holds one channel."""
  if channels not in (1, None):
    raise errors.UserError(f"{str(p)!r} is {what}, which has one channel; a {channels}-channel "
                           f"volume must be a (Z, Y, X, {channels}) .npy or zarr")


class VolumeSource:
  """A lazily read (Z, Y, X) volume, or (Z, Y, X, C) with `channels` C > 1. `dtype` is the dtype
  `read_slab` returns; `stats`, the intensity statistics stored with it (a scan's), or None.

  A reader subclass declares how the registry recognises its inputs: `suffixes` (lower-case
  file name endings), `magic` (byte strings a file starts with), or, for a folder format,
  `claims_folder(path)`. `takes_key` says it accepts a dataset key (HDF5). `open(...)` makes
  the source from the registry's arguments.
  """

  kind = "volume"
  described = "a volume"  # in messages: "... is a TIFF, which has one channel"
  suffixes: tuple[str, ...] = ()
  magic: tuple[bytes, ...] = ()
  takes_key = False
  stats: dict[str, Any] | None = None
  voxel_size_um: tuple[float, float, float] | None = None

  def __init__(self, path: Path, shape: Sequence[int], source_dtype: np.dtype, array: str):
    self.path = path
    self.shape = tuple(int(s) for s in shape)
    self.channels = self.shape[3] if len(self.shape) == 4 else 1
    self.source_dtype = np.dtype(source_dtype)
    self.array = array
    self.dtype = (label_dtype_for(self.source_dtype) if array == "labels"
                  else image_dtype_for(self.source_dtype))
    if 0 in self.shape:
      raise errors.UserError(f"{str(path)!r} is empty (shape {self.shape})")

  @classmethod
  def claims_folder(cls, path: Path) -> bool:
    """Whether this reader reads the folder `path` (folder formats override)."""
    return False

  @classmethod
  def open(cls, path: Path, *, array: str, channels: int | None, context: ts.Context | None,
           key: str | None) -> "VolumeSource":
    """The source for `path` (the registry's call; readers with more options override)."""
    one_channel(path, channels, cls.described)
    return cls(path, array)

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize

  @property
  def tensorstore(self) -> ts.TensorStore | None:
    """The opened array itself when it is exactly this volume (a scan's image), else None."""
    return None

  def read_slab(self, z0: int, z1: int) -> np.ndarray:
    """Slices z0..z1-1 as a new (z1 - z0, Y, X[, C]) array of `self.dtype`."""
    z0, z1 = max(0, int(z0)), min(self.shape[0], int(z1))
    if z1 <= z0:
      return np.zeros((0,) + self.shape[1:], self.dtype)
    data = np.asarray(self._read(z0, z1)).reshape((z1 - z0,) + self.shape[1:])
    return data.astype(self.dtype, copy=True)

  def _read(self, z0: int, z1: int) -> np.ndarray:
    raise NotImplementedError

  def close(self) -> None:
    pass

  def __enter__(self) -> "VolumeSource":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __repr__(self) -> str:
    return (f"{type(self).__name__}({str(self.path)!r}, shape={self.shape}, "
            f"dtype={self.dtype}, source_dtype={self.source_dtype})")


class IndexedSource(VolumeSource):
  """An array-like (numpy memmap, tensorstore, h5py dataset) with singleton axes to index away."""

  def __init__(self, path, arr, array, what, channels: int | None = 1):
    self._arr = arr
    if channels is None:
      channels = channels_of(arr.shape)
    self._keep = keep_axes(arr.shape, what, channels)
    super().__init__(path, [arr.shape[a] for a in self._keep], self._dtype_of(arr), array)

  @staticmethod
  def _dtype_of(arr) -> np.dtype:
    return np.dtype(arr.dtype)

  def _index(self, z0: int, z1: int) -> tuple:
    idx: list[Any] = [0] * len(self._arr.shape)
    for a in self._keep:
      idx[a] = slice(None)
    idx[self._keep[0]] = slice(z0, z1)
    return tuple(idx)

  def _read(self, z0, z1):
    return self._arr[self._index(z0, z1)]


def close_memmap(arr) -> None:
  """Closes a numpy memmap's file now rather than at garbage collection."""
  mm = getattr(arr, "_mmap", None)
  if mm is not None:
    mm.close()


def slab_reader(source):
  """(shape, dtype, read(z0, z1)) for a VolumeSource, a tensorstore array, an object with an
  `image` tensorstore (a scan) or a numpy array: what the writers stream from."""
  if isinstance(source, VolumeSource):
    return source.shape, source.dtype, source.read_slab
  if not isinstance(source, ts.TensorStore) and isinstance(getattr(source, "image", None),
                                                           ts.TensorStore):
    source = source.image
  if isinstance(source, ts.TensorStore):
    dtype = np.dtype(source.dtype.numpy_dtype)
    return tuple(source.shape), dtype, lambda z0, z1: source[z0:z1].read().result()
  arr = source if hasattr(source, "shape") and hasattr(source, "dtype") else np.asarray(source)
  return tuple(arr.shape), np.dtype(arr.dtype), lambda z0, z1: np.asarray(arr[z0:z1])
