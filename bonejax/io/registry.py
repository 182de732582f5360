"""Which reader opens an input, and which writer a named output gets.

As nnU-Net's reader-writer registry: `READERS` lists the reader classes, each declaring what
it reads (`suffixes`, `magic` bytes, or `claims_folder` for folder formats); `open_volume`
asks them in order. A new format is one new module and one entry here.

Folders: the first reader whose `claims_folder` says yes (OME-Zarr before plain zarr, a
folder of slices last). Files: the first reader whose suffixes match the name, else the first
whose magic bytes start the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import tensorstore as ts

from bonejax.core import errors
from bonejax.io import hdf5, isq, mrc, npy, ome_zarr, slices, source, tiff, zarr

READERS: tuple[type[source.VolumeSource], ...] = (
    ome_zarr.OmeZarrSource,     # folders
    zarr.ZarrSource,
    slices.ImageFolderSource,
    slices.TiffFolderSource,    # any other folder: it says what a slice folder needs
    npy.NpySource,              # files
    tiff.TiffSource,
    hdf5.H5Source,
    mrc.MrcSource,
    isq.IsqSource,
)

# (format name, does a path name this format?) in order; the first match wins.
WRITERS: tuple[tuple[str, Callable[[str | os.PathLike], bool]], ...] = (
    ("ome-zarr", ome_zarr.is_ome_zarr_path),
    ("tiff", tiff.is_output),
    ("zarr", zarr.is_output),
)

_MAGIC_BYTES = max(len(m) for r in READERS for m in r.magic)


def _magic(p: Path) -> bytes:
  try:
    with open(p, "rb") as f:
      return f.read(_MAGIC_BYTES)
  except OSError as e:
    raise errors.UserError(f"cannot read {str(p)!r}: {errors.one_line(e)}") from None


def reader_for(p: Path) -> type[source.VolumeSource]:
  """The reader class for the existing path `p` (a UserError when none reads it)."""
  if p.is_dir():
    for reader in READERS:
      if reader.claims_folder(p):
        return reader
  else:
    suffix = p.suffix.lower()
    for reader in READERS:
      if suffix in reader.suffixes:
        return reader
    head = _magic(p)
    for reader in READERS:
      if any(head.startswith(m) for m in reader.magic):
        return reader
  raise errors.UserError(f"{str(p)!r}: unsupported input (need a multi-page TIFF, a folder of 2D "
                         f"slices, a .npy, a zarr or OME-Zarr array, a scan directory, an HDF5 / "
                         f"NeXus, MRC or Scanco .isq file)")


def open_volume(path: str | os.PathLike, array: str = "image", channels: int | None = 1,
                context: ts.Context | None = None,
                key: str | None = None) -> source.VolumeSource:
  """Opens any supported input as a lazily read (Z, Y, X) volume, or (Z, Y, X, C).

  `array` is "image" (dtypes converted as `source` says) or "labels" (integer dtypes kept;
  floats rejected). For a bonejax scan directory it also picks the array read; a scan's image
  brings its stored intensity statistics (`source.stats`).
  `channels`: 1 (a 3D volume), C > 1 (a (Z, Y, X, C) .npy or zarr) or None (whatever the file
  has). `context`: the tensorstore context zarr arrays open in (default the shared one), e.g.
  one with a chunk cache sized for the caller's memory budget.
  `key`: the dataset inside an HDF5 / NeXus file (`--image_key`); refused for other formats.
  """
  if array not in ("image", "labels"):
    raise ValueError(f"array must be 'image' or 'labels', got {array!r}")
  if channels is not None and (not isinstance(channels, (int, np.integer)) or channels < 1):
    raise ValueError(f"channels must be a positive integer or None, got {channels!r}")
  if array == "labels" and channels not in (1, None):
    raise ValueError(f"labels have one channel, got channels={channels}")
  want = 1 if array == "labels" else channels
  p = errors.require_exists(path, array)
  reader = reader_for(p)
  if key and not reader.takes_key:
    raise errors.UserError(f"a dataset key ({key!r}) only goes with an HDF5 / NeXus file, not "
                           f"{str(p)!r}")
  try:
    return reader.open(p, array=array, channels=want, context=context, key=key)
  except (errors.UserError, MemoryError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    # A parser meeting a damaged or hostile file raises whatever it met (struct.error,
    # IndexError, RuntimeError, ...): bad input, named, never an internal error (exit 3).
    raise errors.UserError(f"cannot read {str(p)!r} as {reader.described}: damaged file "
                           f"({type(e).__name__}: {errors.short_message(e)})") from None


def output_format(path: str | os.PathLike) -> str | None:
  """How a volume written to `path` is stored, by its name: "ome-zarr" (.ome.zarr), "tiff"
  (.tif/.tiff) or "zarr" (zarr v3); None for any other name (each caller says what it takes)."""
  for name, names_it in WRITERS:
    if names_it(path):
      return name
  return None
