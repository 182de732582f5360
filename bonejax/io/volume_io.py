"""Volumes in and out: stream (Z, Y, X) slabs from the files users have, write scans and TIFFs.

`open_volume(path)` accepts
- a multi-page TIFF (also an ImageJ hyperstack or a single 3D series; singleton T/C axes are
  dropped). Uncompressed files are memory-mapped, compressed ones read page range by page range;
- a folder of 2D slices, taken in natural order (slice_2 before slice_10): TIFFs through
  tifffile, PNG / BMP / JPEG 2000 / ... through imageio (`formats`);
- a .npy file (memory-mapped);
- a zarr array, v3 or v2 (through tensorstore), an OME-Zarr image (its full-resolution level),
  or a bonejax scan directory (its image, or its labels with `array="labels"`; a scan's image
  also brings its stored intensity statistics);
- HDF5 / NeXus (`key` names the dataset), MRC and Scanco .isq files (`formats`).
Nothing reads a whole volume: `read_slab(z0, z1)` reads only those slices, so an import needs
memory for a couple of slabs, whatever the volume size. Every source says its voxel size,
`voxel_size_um` = (Z, Y, X) in um, when the file records one (TIFF ImageJ / OME metadata, scan
attributes, OME-Zarr scale, HDF5 attributes, MRC and ISQ headers, a SkyScan log), else None.

Channels: volumes are (Z, Y, X) by default. `channels=C` asks for a (Z, Y, X, C) .npy or zarr
array (multi-channel models); `channels=None` takes what the file has (a last axis of size > 1
after three others is the channel axis), and the source's `channels` says which. The predictor
opens its input this way, the importer with the default.

Image dtypes: uint8, uint16 and float32 are kept; bool becomes uint8; every other integer type
(int8, int16 -- common in CT --, int32, int64, uint32, uint64) and float16/float64 become float32
(integers above 2**24 lose precision). Labels keep their integer type; `import_volume` checks
their values and stores them as uint8.

`import_volume(...)` is what `launch/import_volume.py` runs; `export_tiff(...)` writes any
array (tensorstore or numpy) to a multi-page TIFF slab by slab.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tensorstore as ts
import tifffile

import bonejax
from bonejax.core import errors, outputs
from bonejax.core.progress import Progress
from bonejax.data import store
from bonejax.io import intensity, ome_zarr

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")
KEPT_DTYPES = ("uint8", "uint16", "float32")
DEFAULT_CLASSES = ("background", "bone", "pore")
STATS_VOXELS = 1 << 20
# Classic TIFF offsets are 32-bit; leave room for the page directories.
BIGTIFF_BYTES = (1 << 32) - (1 << 26)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# ---------------------------------------------------------------------------------------------
# Sources.
# ---------------------------------------------------------------------------------------------


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


def _label_dtype_for(dtype: np.dtype) -> np.dtype:
  dtype = np.dtype(dtype)
  if dtype == np.bool_:
    return np.dtype(np.uint8)
  if np.issubdtype(dtype, np.integer):
    return dtype.newbyteorder("=")
  raise errors.UserError(f"labels must be integers, got dtype {dtype}")


def _squeeze_to_3d(shape: Sequence[int], what: str) -> list[int]:
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


def _keep_axes(shape: Sequence[int], what: str, channels: int) -> list[int]:
  """The axes of a (Z, Y, X) volume, or of a (Z, Y, X, C) one with C = `channels` > 1."""
  shape = tuple(int(s) for s in shape)
  if channels == 1:
    return _squeeze_to_3d(shape, what)
  if len(shape) < 4 or shape[-1] != channels or len([s for s in shape if s != 1]) > 4:
    raise errors.UserError(f"{what} has shape {shape}: not a (Z, Y, X, {channels}) volume "
                        f"({channels} channels on the last axis)")
  return _squeeze_to_3d(shape[:-1], what) + [len(shape) - 1]


def _check_channels_arg(channels: int | None) -> None:
  if channels is not None and (not isinstance(channels, (int, np.integer)) or channels < 1):
    raise ValueError(f"channels must be a positive integer or None, got {channels!r}")


class VolumeSource:
  """A lazily read (Z, Y, X) volume, or (Z, Y, X, C) with `channels` C > 1. `dtype` is the dtype
  `read_slab` returns; `stats`, the intensity statistics stored with it (a scan's), or None."""

  kind = "volume"
  stats: dict[str, Any] | None = None
  voxel_size_um: tuple[float, float, float] | None = None

  def __init__(self, path: Path, shape: Sequence[int], source_dtype: np.dtype, array: str):
    self.path = path
    self.shape = tuple(int(s) for s in shape)
    self.channels = self.shape[3] if len(self.shape) == 4 else 1
    self.source_dtype = np.dtype(source_dtype)
    self.array = array
    self.dtype = (_label_dtype_for(self.source_dtype) if array == "labels"
                  else image_dtype_for(self.source_dtype))
    if 0 in self.shape:
      raise errors.UserError(f"{str(path)!r} is empty (shape {self.shape})")

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


class _IndexedSource(VolumeSource):
  """An array-like (numpy memmap, tensorstore) with singleton axes to index away."""

  def __init__(self, path, arr, array, what, channels: int | None = 1):
    self._arr = arr
    if channels is None:
      channels = channels_of(arr.shape)
    self._keep = _keep_axes(arr.shape, what, channels)
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


class NpySource(_IndexedSource):
  kind = "npy"

  def __init__(self, path: Path, array: str = "image", channels: int | None = 1):
    try:
      arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # a truncated header, a pickle, not an .npy at all
      raise errors.UserError(f"cannot read .npy {str(path)!r}: {errors.one_line(e)}") from None
    if not isinstance(arr, np.ndarray):
      raise errors.UserError(f"{str(path)!r} is not a single .npy array")
    super().__init__(path, arr, array, f"{str(path)!r}", channels)

  def close(self):
    mm = getattr(self._arr, "_mmap", None)
    if mm is not None:
      mm.close()


class ZarrSource(_IndexedSource):
  """A zarr v3 ('zarr3') or v2 ('zarr') array, read through tensorstore."""

  def __init__(self, path: Path, driver: str, array: str = "image", what: str | None = None,
               channels: int | None = 1, context: ts.Context | None = None):
    self.kind = driver
    spec = {"driver": driver, "kvstore": {"driver": "file", "path": str(path)}}
    try:
      arr = ts.open(spec, open=True, read=True,
                    context=context if context is not None else store.context()).result()
    except Exception as e:
      raise errors.UserError(f"cannot open zarr array {str(path)!r}: {errors.one_line(e)}") from None
    super().__init__(path, arr, array, what or f"{str(path)!r}", channels)
    self.voxel_size_um = _attrs_voxel_size(path)

  @property
  def tensorstore(self) -> ts.TensorStore | None:
    return self._arr if tuple(self._arr.shape) == self.shape else None

  @staticmethod
  def _dtype_of(arr) -> np.dtype:
    try:
      return np.dtype(arr.dtype.numpy_dtype)
    except (TypeError, ValueError):
      raise errors.UserError(f"unsupported zarr dtype {arr.dtype}") from None

  def _read(self, z0, z1):
    try:
      return self._arr[self._index(z0, z1)].read().result()
    except Exception as e:
      raise errors.UserError(f"cannot read {str(self.path)!r} slices {z0}-{z1 - 1}: "
                          f"{errors.one_line(e)}") from None


def _attrs_voxel_size(path: Path) -> tuple[float, float, float] | None:
  """`voxel_size_um` (a number, or (Z, Y, X)) from a zarr v3 node's attributes, if there."""
  try:
    attrs = json.loads((Path(path) / "zarr.json").read_text()).get("attributes", {})
  except (OSError, ValueError, AttributeError):
    return None
  v = attrs.get("voxel_size_zyx_um", attrs.get("voxel_size_um"))
  try:
    from bonejax.io import resample
    return resample.as_zyx(v)
  except errors.UserError:
    return None


class _Complaints(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.errors: list[str] = []

  def emit(self, record):
    if record.levelno >= logging.ERROR:
      self.errors.append(record.getMessage())


@contextlib.contextmanager
def _tiff_complaints(path: Path):
  """tifffile logs (rather than raises) on damaged files, and the log would break the one-line
  error contract on stderr: collect its complaints and raise the first as a UserError."""
  logger = logging.getLogger("tifffile")
  handler, propagate = _Complaints(), logger.propagate
  logger.addHandler(handler)
  logger.propagate = False
  damaged = lambda: (f"cannot read TIFF {str(path)!r}: damaged file "
                     f"({errors.one_line(handler.errors[0])})")
  try:
    yield
  except errors.UserError as e:
    if handler.errors:
      raise errors.UserError(f"{damaged()}; {e}") from None
    raise
  finally:
    logger.removeHandler(handler)
    logger.propagate = propagate
  if handler.errors:
    raise errors.UserError(damaged())


def _open_tiff(path: Path) -> tifffile.TiffFile:
  try:
    return tifffile.TiffFile(path)
  except Exception as e:  # TiffFileError, truncated files, OSError
    raise errors.UserError(f"cannot read TIFF {str(path)!r}: {errors.one_line(e)}") from None


class TiffSource(VolumeSource):
  """A multi-page TIFF: memory-mapped when uncompressed, else read a page range at a time."""

  kind = "tiff"

  def __init__(self, path: Path, array: str = "image"):
    try:
      with _tiff_complaints(path):
        self._open(path, array)
    except BaseException:
      if getattr(self, "_tif", None) is not None:
        self.close()
      raise

  def _open(self, path: Path, array: str) -> None:
    self._tif, self._mm = _open_tiff(path), None
    if not self._tif.series:
      raise errors.UserError(f"TIFF {str(path)!r} holds no images")
    series = self._tif.series[0]
    what = f"TIFF {str(path)!r}"
    if len(self._tif.series) > 1:
      what += f" (first of its {len(self._tif.series)} image series)"
    keep = _squeeze_to_3d(series.shape, what)
    shape = [series.shape[a] for a in keep]
    super().__init__(path, shape, series.dtype, array)
    try:
      mm = tifffile.memmap(path, series=0, mode="r")
      self._mm = mm.reshape(shape) if mm.size == math.prod(shape) else None
    except Exception:  # compressed, tiled, scattered or truncated pages: not mappable
      self._mm = None
    # One page per Z slice lets us read page ranges; anything else is read whole, once.
    pages = series.pages
    self._paged = (len(pages) == shape[0] and pages[0] is not None
                   and math.prod(pages[0].shape) == shape[1] * shape[2])
    self._whole = None
    from bonejax.io import formats
    self.voxel_size_um = formats.tiff_voxel_size(self._tif)

  def _read(self, z0, z1):
    with _tiff_complaints(self.path):
      return self._read_pages(z0, z1)

  def _read_pages(self, z0, z1):
    try:
      if self._mm is not None:
        return self._mm[z0:z1]
      if self._paged:
        return self._tif.asarray(key=range(z0, z1), series=0)
      if self._whole is None:
        self._whole = self._tif.series[0].asarray().reshape(self.shape)
      return self._whole[z0:z1]
    except Exception as e:
      raise errors.UserError(f"cannot read TIFF {str(self.path)!r} slices {z0}-{z1 - 1}: "
                          f"{errors.one_line(e)}") from None

  def close(self):
    self._mm = None
    self._tif.close()


def natural_key(name: str) -> list:
  """'slice_2' < 'slice_10': digit runs compare as numbers."""
  return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _is_tiff_name(p: Path) -> bool:
  return p.suffix.lower() in TIFF_SUFFIXES and not p.name.startswith(".")


class TiffFolderSource(VolumeSource):
  """A folder of 2D TIFF slices, one per Z, in natural order; all the same shape and dtype."""

  kind = "tiff-folder"

  def __init__(self, path: Path, array: str = "image"):
    files = sorted((p for p in path.iterdir() if p.is_file() and _is_tiff_name(p)),
                   key=lambda p: natural_key(p.name))
    if not files:
      raise errors.UserError(f"folder {str(path)!r} contains no .tif/.tiff slices")
    self.files = files
    first_shape, first_dtype = None, None
    # Check every slice's header up front, so a mismatch fails before any data is written.
    for f in files:
      with _tiff_complaints(f), _open_tiff(f) as tif:
        if not tif.series:
          raise errors.UserError(f"slice {str(f)!r} holds no image")
        shape, dtype = self._slice_shape(f, tif.series[0]), tif.series[0].dtype
      if first_shape is None:
        first_shape, first_dtype = shape, dtype
      elif shape != first_shape or dtype != first_dtype:
        raise errors.UserError(
            f"slice {f.name!r} is {shape} {dtype} but {files[0].name!r} is {first_shape} "
            f"{first_dtype}; all slices in {str(path)!r} must have one shape and dtype")
    super().__init__(path, (len(files),) + first_shape, first_dtype, array)
    from bonejax.io import formats
    self.voxel_size_um = formats.skyscan_voxel_size(path)
    if self.voxel_size_um is None:
      with _tiff_complaints(files[0]), _open_tiff(files[0]) as tif:
        size = formats.tiff_voxel_size(tif)  # an ImageJ slice knows its pixel and spacing
      self.voxel_size_um = size

  @staticmethod
  def _slice_shape(f: Path, series) -> tuple[int, int]:
    shape = tuple(int(s) for s in series.shape)
    squeezed = tuple(s for s in shape if s != 1)
    if len(shape) == 2:
      return shape
    if len(squeezed) <= 2 and len(shape) > 2:
      return (1,) * (2 - len(squeezed)) + squeezed
    raise errors.UserError(f"slice {str(f)!r} has shape {shape}; slices in a folder must be 2D")

  def _read(self, z0, z1):
    out = np.empty((z1 - z0,) + self.shape[1:], self.source_dtype)
    for i, f in enumerate(self.files[z0:z1]):
      try:
        with _tiff_complaints(f):
          out[i] = tifffile.imread(f, series=0).reshape(self.shape[1:])
      except errors.UserError:
        raise
      except Exception as e:
        raise errors.UserError(f"cannot read slice {str(f)!r}: {errors.one_line(e)}") from None
    return out


def _zarr_json_node(path: Path) -> str | None:
  try:
    return json.loads((path / "zarr.json").read_text()).get("node_type")
  except (OSError, ValueError, AttributeError):
    raise errors.UserError(f"{str(path / 'zarr.json')!r} is not valid zarr metadata") from None


def open_volume(path: str | os.PathLike, array: str = "image", channels: int | None = 1,
                context: ts.Context | None = None, key: str | None = None) -> VolumeSource:
  """Opens any supported input as a lazily read (Z, Y, X) volume, or (Z, Y, X, C).

  `array` is "image" (dtypes converted as the module docstring says) or "labels" (integer
  dtypes kept; floats rejected). For a bonejax scan directory it also picks the array read;
  a scan's image brings its stored intensity statistics (`source.stats`).
  `channels`: 1 (a 3D volume), C > 1 (a (Z, Y, X, C) .npy or zarr) or None (whatever the file
  has; see the module docstring). `context`: the tensorstore context zarr arrays open in
  (default the shared one), e.g. one with a chunk cache sized for the caller's memory budget.
  `key`: the dataset inside an HDF5 / NeXus file (`--image_key`); refused for other formats.
  """
  if array not in ("image", "labels"):
    raise ValueError(f"array must be 'image' or 'labels', got {array!r}")
  _check_channels_arg(channels)
  if array == "labels" and channels not in (1, None):
    raise ValueError(f"labels have one channel, got channels={channels}")
  want = 1 if array == "labels" else channels
  p = errors.require_exists(path, array)
  from bonejax.io import formats
  if key and not _is_hdf5(p):
    raise errors.UserError(f"a dataset key ({key!r}) only goes with an HDF5 / NeXus file, not "
                        f"{str(p)!r}")
  if p.is_dir():
    ome = formats.ome_multiscales(p)
    if ome is not None:
      return formats.open_ome_zarr(p, *ome, array, want, context)
    if (p / "zarr.json").exists():
      node = _zarr_json_node(p)
      if node == "array":
        return ZarrSource(p, "zarr3", array, channels=want, context=context)
      if (p / array / "zarr.json").exists():  # a bonejax scan (or any group with that array)
        source = ZarrSource(p / array, "zarr3", array, what=f"scan {str(p)!r} {array}",
                            channels=want, context=context)
        source.kind, source.path = "scan", p  # report the path the user gave
        attrs = store.read_group_attrs(p)
        if array == "image":
          source.stats = attrs.get("intensity")
        source.voxel_size_um = _attrs_voxel_size(p)
        return source
      raise errors.UserError(f"{str(p)!r} is a zarr group without an {array!r} array; "
                          f"point at the array itself")
    if (p / ".zarray").exists():
      return ZarrSource(p, "zarr", array, channels=want, context=context)
    if (p / ".zgroup").exists():
      raise errors.UserError(f"{str(p)!r} is a zarr v2 group; point at the array inside it")
    _one_channel(p, want, "a folder of 2D slices")
    files = formats.slice_files(p)
    if files and not all(_is_tiff_name(f) for f in files):
      return formats.ImageFolderSource(p, array, files)
    return TiffFolderSource(p, array)
  suffix = p.suffix.lower()
  if suffix == ".npy":
    return NpySource(p, array, want)
  if suffix in TIFF_SUFFIXES:
    return _tiff_source(p, array, want)
  if _is_hdf5(p):
    return formats.H5Source(p, key, array, want)
  if suffix in formats.MRC_SUFFIXES:
    _one_channel(p, want, "an MRC file")
    return formats.MrcSource(p, array)
  if suffix in formats.ISQ_SUFFIXES:
    _one_channel(p, want, "a Scanco ISQ file")
    return formats.IsqSource(p, array)
  magic = _magic(p)
  if magic[:2] in (b"II", b"MM"):
    return _tiff_source(p, array, want)
  if magic[:4] == b"\x93NUM":
    return NpySource(p, array, want)
  if magic[:16] == formats.ISQ_MAGIC:
    return formats.IsqSource(p, array)
  raise errors.UserError(f"{str(p)!r}: unsupported input (need a multi-page TIFF, a folder of 2D "
                      f"slices, a .npy, a zarr or OME-Zarr array, a scan directory, an HDF5 / "
                      f"NeXus, MRC or Scanco .isq file)")


def _magic(p: Path) -> bytes:
  try:
    with open(p, "rb") as f:
      return f.read(16)
  except OSError as e:
    raise errors.UserError(f"cannot read {str(p)!r}: {errors.one_line(e)}") from None


def _is_hdf5(p: Path) -> bool:
  from bonejax.io import formats
  if p.is_dir():
    return False
  return p.suffix.lower() in formats.HDF5_SUFFIXES or _magic(p)[:8] == formats.HDF5_MAGIC


def _one_channel(p: Path, channels: int | None, what: str) -> None:
  if channels not in (1, None):
    raise errors.UserError(f"{str(p)!r} is {what}, which has one channel; a {channels}-channel "
                        f"volume must be a (Z, Y, X, {channels}) .npy or zarr")


def _tiff_source(p: Path, array: str, channels: int | None) -> VolumeSource:
  _one_channel(p, channels, "a TIFF")
  if channels is None:
    # Multi-channel TIFFs (RGB, CZYX hyperstacks) have no one channel-axis convention.
    with _tiff_complaints(p), _open_tiff(p) as tif:
      shape = tuple(tif.series[0].shape) if tif.series else ()
    if shape and channels_of(shape) > 1:
      raise errors.UserError(f"TIFF {str(p)!r} has {channels_of(shape)} channels (shape {shape}): "
                          f"give a multi-channel volume as a (Z, Y, X, C) .npy or zarr")
  return TiffSource(p, array)


# ---------------------------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------------------------


def _slab_reader(source):
  """(shape, dtype, read(z0, z1)) for a tensorstore array, a VolumeSource or a numpy array."""
  if isinstance(source, VolumeSource):
    return source.shape, source.dtype, source.read_slab
  if isinstance(source, store.Scan):
    source = source.image
  if isinstance(source, ts.TensorStore):
    dtype = np.dtype(source.dtype.numpy_dtype)
    return tuple(source.shape), dtype, lambda z0, z1: source[z0:z1].read().result()
  arr = source if hasattr(source, "shape") and hasattr(source, "dtype") else np.asarray(source)
  return tuple(arr.shape), np.dtype(arr.dtype), lambda z0, z1: np.asarray(arr[z0:z1])


def output_format(path: str | os.PathLike) -> str | None:
  """How a volume written to `path` is stored, by its name: "ome-zarr" (.ome.zarr), "tiff"
  (.tif/.tiff) or "zarr" (zarr v3); None for any other name (each caller says what it takes)."""
  if ome_zarr.is_ome_zarr_path(path):
    return "ome-zarr"
  suffix = Path(path).suffix.lower()
  if suffix in (".tif", ".tiff"):
    return "tiff"
  if suffix == ".zarr":
    return "zarr"
  return None


def export_tiff(source, path: str | os.PathLike, overwrite: bool = False,
                slab: int = 64) -> dict[str, Any]:
  """Writes a (Z, Y, X) array as a multi-page TIFF (one page per slice), slab by slab.

  BigTIFF when the data would not fit classic TIFF's 4 GiB. The file appears only when
  complete (outputs.atomic_output). Returns {"output", "shape", "dtype", "bigtiff"}.
  """
  shape, dtype, read = _slab_reader(source)
  if len(shape) != 3:
    raise errors.UserError(f"can only export a 3D (Z, Y, X) volume as TIFF, got shape {shape}")
  if dtype == np.bool_:
    dtype = np.dtype(np.uint8)
  slab = max(1, int(slab))
  bigtiff = math.prod(shape) * dtype.itemsize > BIGTIFF_BYTES

  def pages():
    for z0 in range(0, shape[0], slab):
      data = np.asarray(read(z0, min(z0 + slab, shape[0]))).astype(dtype, copy=False)
      yield from data

  # The software tag and the description mark the file as bonejax's: --overwrite may replace it.
  with outputs.atomic_output(path, overwrite) as tmp:
    with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
      tw.write(pages(), shape=shape, dtype=dtype, photometric="minisblack",
               software=f"bonejax {bonejax.__version__}",
               metadata={"axes": "ZYX", "bonejax_version": bonejax.__version__})
  return {"output": str(path), "shape": list(shape), "dtype": dtype.name, "bigtiff": bigtiff}


# ---------------------------------------------------------------------------------------------
# Import.
# ---------------------------------------------------------------------------------------------


def check_scan_name(name: str) -> str:
  if not name or not _SAFE_NAME.match(name) or name in (store.DATASET_JSON, "zarr.json"):
    raise errors.UserError(f"--scan={name!r} is not a safe scan name (letters, digits, '.', '_', "
                        f"'-'; starting with a letter or digit)")
  return name


def parse_classes(text: str | Sequence[str]) -> list[str]:
  names = text.split(",") if isinstance(text, str) else list(text)
  names = [str(c).strip() for c in names]
  if len(names) < 2 or not all(names) or len(set(names)) != len(names):
    raise errors.UserError(f"--classes={text!r} needs at least 2 distinct, non-empty names")
  if len(names) > 256:
    raise errors.UserError(f"--classes: at most 256 classes fit uint8 labels, got {len(names)}")
  return names


def _wait(futures: list) -> None:
  for f in futures:
    f.result()


def import_volume(image: str | os.PathLike, out: str | os.PathLike, scan: str,
                  labels: str | os.PathLike | None = None,
                  classes: str | Sequence[str] = DEFAULT_CLASSES,
                  voxel_size_um: float | Sequence[float] | None = None,
                  chunks: Sequence[int] = store.DEFAULT_CHUNKS, slab: int = 64,
                  overwrite: bool = False, progress_every_s: float = 5.0,
                  resample_um: float | None = None, image_key: str | None = None,
                  labels_key: str | None = None) -> dict[str, Any]:
  """Streams a volume (and optional labels) into DATA/scan and registers it in dataset.json.

  `voxel_size_um`: a number or (Z, Y, X); default the file's own (TIFF / OME / HDF5 / MRC /
  ISQ / OME-Zarr metadata), else 1 um. `resample_um`: resample image (linearly) and labels
  (nearest) to this isotropic voxel size on the way, slab by slab. `image_key` / `labels_key`:
  the datasets inside HDF5 / NeXus files. The scan is written under a temporary name and
  renamed into place only once complete; any error leaves the dataset as it was (no scan
  directory, dataset.json untouched).
  """
  from bonejax.io import resample
  start = time.perf_counter()
  check_scan_name(scan)
  classes = parse_classes(classes)
  given_voxel = resample.as_zyx(voxel_size_um)
  if resample_um is not None:
    resample.as_zyx(resample_um)
  if int(slab) < 1:
    raise errors.UserError(f"--slab={slab} must be positive")
  slab = int(slab)
  chunks = tuple(int(c) for c in chunks)
  if len(chunks) != 3 or min(chunks) < 1:
    raise errors.UserError(f"--chunks={chunks} needs 3 positive integers")
  if not out:
    raise errors.UserError("no --out dataset directory given")
  data = Path(out)
  if data.exists() and not data.is_dir():
    raise errors.UserError(f"--out {str(data)!r} exists and is not a directory")
  if (data / store.DATASET_JSON).exists():
    existing = store.open_dataset(data)
    if existing.classes != classes:
      raise errors.UserError(f"--classes {classes} disagree with {str(data / store.DATASET_JSON)!r}"
                          f" classes {existing.classes}")
  final = data / scan
  inputs = (image, labels)
  outputs.check_not_input(final, inputs, "scan")
  for given in inputs:
    if given and store.is_scan(given):
      store.warn_missing_chunks(given)
  made = outputs.make_dirs(data)
  try:
    # The claim makes a second import of the same scan fail at once, and is held until the scan
    # is registered, so parallel imports never take it for an orphan (store.unlisted_scans).
    with outputs.claim_output(final, "scan"):
      outputs.check_output(final, overwrite, inputs, "scan")
      src = open_volume(image, "image", key=image_key)
      lab = None
      try:
        if labels:
          lab = open_volume(labels, "labels", key=labels_key)
          if lab.shape != src.shape:
            raise errors.UserError(f"labels shape {lab.shape} != image shape {src.shape}")
        found = src.voxel_size_um
        voxel = given_voxel or found or (1.0, 1.0, 1.0)
        voxel_from = "flag" if given_voxel else ("metadata" if found else "default")
        original = {"shape": list(src.shape), "voxel_size_um": list(voxel)}
        if resample_um is not None and not resample.same_size(voxel, resample_um):
          src.voxel_size_um = voxel
          src = resample.ResampledSource(src, resample_um, order=1)
          if lab is not None:
            lab.voxel_size_um = voxel
            lab = resample.ResampledSource(lab, resample_um, order=0)
          voxel = src.voxel_size_um
        elif resample_um is not None:
          voxel = resample.as_zyx(resample_um)
        stats = _stream_scan(src, lab, final, classes, voxel, chunks, slab, overwrite,
                             progress_every_s, inputs,
                             original if tuple(original["shape"]) != src.shape else None)
        try:
          dataset = store.add_scan_to_dataset(data, scan, classes)
        except BaseException:
          outputs.remove_path(final)
          raise
      finally:
        src.close()
        if lab is not None:
          lab.close()
  except BaseException:
    # Leave no empty dataset directory behind if this call made it.
    outputs.remove_made_dirs(made)
    raise
  result = {"dataset": str(data), "scan": scan, "path": str(final), "shape": list(src.shape),
            "dtype": src.dtype.name, "source_dtype": src.source_dtype.name,
            "has_labels": lab is not None, "classes": classes,
            "num_scans": len(dataset.scans), **_voxel_attrs(voxel),
            "voxel_size_from": voxel_from, "intensity": stats,
            "seconds": round(time.perf_counter() - start, 3)}
  if isinstance(src, resample.ResampledSource):
    result["resampled_from"] = original
  return result


def _voxel_attrs(voxel: Sequence[float]) -> dict[str, Any]:
  """`voxel_size_um` as one number (the contract's), plus (Z, Y, X) when anisotropic."""
  from bonejax.io import resample
  voxel = [float(v) for v in voxel]
  if resample.isotropic(voxel):
    return {"voxel_size_um": voxel[2]}
  return {"voxel_size_um": voxel[2], "voxel_size_zyx_um": voxel}


def _stream_scan(src: VolumeSource, lab: VolumeSource | None, final: Path, classes: list[str],
                 voxel_size_um: Sequence[float], chunks: Sequence[int], slab: int,
                 overwrite: bool, progress_every_s: float, inputs: Sequence[Any] = (),
                 resampled_from: dict[str, Any] | None = None) -> dict[str, Any]:
  attrs = {
      **_voxel_attrs(voxel_size_um),
      "source": str(Path(src.path).resolve()),
      "source_dtype": src.source_dtype.name,
      "imported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "bonejax_version": bonejax.__version__,
  }
  if lab is not None:
    attrs["labels_source"] = str(Path(lab.path).resolve())
  if resampled_from is not None:
    attrs["resampled_from"] = resampled_from
  depth = src.shape[0]
  n_slabs = -(-depth // slab)
  with outputs.atomic_output(final, overwrite, inputs, "scan") as tmp:
    scan = store.create_scan(tmp, src.shape, src.dtype, lab is not None, attrs, chunks)
    acc = intensity.StatsAccumulator(src.dtype, math.prod(src.shape))
    progress = Progress(total=n_slabs, desc=f"import {final.name}", unit="slabs",
                            every_s=progress_every_s)
    in_flight: list = []  # [futures of the previous slab, futures of this one]
    try:
      for z0 in range(0, depth, slab):
        z1 = min(z0 + slab, depth)
        where = f"(slices {z0}-{z1 - 1})"
        img = src.read_slab(z0, z1)
        try:
          # A few planes at a time: the statistics make float64 temporaries of what they get.
          step = max(1, STATS_VOXELS // (img.shape[1] * img.shape[2]))
          for p0 in range(0, img.shape[0], step):
            acc.update(img[p0:p0 + step])
        except errors.UserError as e:
          raise errors.UserError(f"{src.path}: {e} {where}") from None
        lbl = None
        if lab is not None:
          lbl = lab.read_slab(z0, z1)
          try:
            store.validate_labels(lbl, img.shape, len(classes))
          except errors.UserError as e:
            raise errors.UserError(f"{lab.path}: {e} {where}") from None
        in_flight.append([store.write_slab(scan.image, 0, z0, img)])
        if lbl is not None:
          in_flight[-1].append(store.write_slab(scan.labels, 0, z0, lbl.astype(np.uint8)))
        # The next slab is read while this one is written; at most two slabs in memory.
        if len(in_flight) > 1:
          _wait(in_flight.pop(0))
        progress.update(1)
      while in_flight:
        _wait(in_flight.pop(0))
    finally:
      # Never let the temporary scan be deleted under writes still in flight.
      for futures in in_flight:
        for f in futures:
          try:
            f.result()
          except Exception:  # pylint: disable=broad-except
            pass
    stats = acc.finalize()
    store.update_scan_attrs(scan, intensity=stats)
    store.record_chunks(scan)
    progress.close()
  return stats
