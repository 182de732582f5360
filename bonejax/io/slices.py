"""Folders of 2D slices, one per Z, in natural order (slice_2 before slice_10).

TIFF slices are read through tifffile (an ImageJ slice knows its pixel size and spacing); PNG,
BMP, JPEG 2000, JPEG, GIF and WebP slices through imageio. Every slice's header is checked up
front, so a slice of another shape or bit depth fails before anything is written. A Bruker
SkyScan reconstruction `.log` beside the slices gives the voxel size.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import tifffile

from bonejax.core import errors
from bonejax.io import source, tiff, voxel

SLICE_SUFFIXES = (".png", ".bmp", ".jp2", ".j2k", ".jpx", ".jpf", ".jpg", ".jpeg", ".gif",
                  ".webp") + tiff.SUFFIXES


def natural_key(name: str) -> list:
  """'slice_2' < 'slice_10': digit runs compare as numbers."""
  return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def slice_files(folder: Path) -> list[Path]:
  """The image files in `folder` (hidden ones left out), in natural order."""
  files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
           and p.suffix.lower() in SLICE_SUFFIXES]
  return sorted(files, key=lambda p: natural_key(p.name))


def skyscan_voxel_size(folder: Path) -> tuple[float, float, float] | None:
  """'Image Pixel Size (um)=...' from a Bruker SkyScan reconstruction log beside the slices."""
  for log in sorted(folder.glob("*.log")):
    try:
      text = log.read_text(errors="replace")
    except OSError:
      continue
    m = re.search(r"^\s*Image Pixel Size \(um\)\s*=\s*([0-9.eE+-]+)", text, re.MULTILINE)
    if m:
      try:
        return voxel.positive([float(m.group(1))] * 3)
      except ValueError:
        return None
  return None


class TiffFolderSource(source.VolumeSource):
  """A folder of 2D TIFF slices; also any folder no other reader claims (it then says that the
  folder holds no slices)."""

  kind = "tiff-folder"
  described = "a folder of 2D slices"

  @classmethod
  def claims_folder(cls, path: Path) -> bool:
    return all(tiff.is_tiff_name(f) for f in slice_files(path))

  def __init__(self, path: Path, array: str = "image"):
    files = sorted((p for p in path.iterdir() if p.is_file() and tiff.is_tiff_name(p)),
                   key=lambda p: natural_key(p.name))
    if not files:
      raise errors.UserError(f"folder {str(path)!r} contains no .tif/.tiff slices")
    self.files = files
    first_shape, first_dtype = None, None
    for f in files:
      with tiff.complaints(f), tiff.open_tiff(f) as tif:
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
    self.voxel_size_um = skyscan_voxel_size(path)
    if self.voxel_size_um is None:
      with tiff.complaints(files[0]), tiff.open_tiff(files[0]) as tif:
        size = tiff.tiff_voxel_size(tif)  # an ImageJ slice knows its pixel and spacing
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
        with tiff.complaints(f):
          out[i] = tifffile.imread(f, series=0).reshape(self.shape[1:])
      except errors.UserError:
        raise
      except Exception as e:
        raise errors.UserError(f"cannot read slice {str(f)!r}: {errors.one_line(e)}") from None
    return out


class ImageFolderSource(source.VolumeSource):
  """A folder of 2D slices imageio reads (any not all TIFF), one per Z in natural order."""

  kind = "image-folder"
  described = "a folder of 2D slices"

  @classmethod
  def claims_folder(cls, path: Path) -> bool:
    files = slice_files(path)
    return bool(files) and not all(tiff.is_tiff_name(f) for f in files)

  def __init__(self, path: Path, array: str = "image", files: list[Path] | None = None):
    import imageio.v3 as iio
    files = files if files is not None else slice_files(path)
    if not files:
      raise errors.UserError(f"folder {str(path)!r} contains no image slices "
                             f"({', '.join(SLICE_SUFFIXES)})")
    self.files = files
    first = None
    for f in files:
      try:
        props = iio.improps(f)
      except Exception as e:
        raise errors.UserError(f"cannot read slice {str(f)!r}: {errors.one_line(e)}") from None
      shape = tuple(int(s) for s in props.shape)
      if len(shape) != 2:
        raise errors.UserError(f"slice {str(f)!r} has shape {shape}; slices in a folder must be "
                               f"2D greyscale images")
      if first is None:
        first = (shape, np.dtype(props.dtype))
      elif (shape, np.dtype(props.dtype)) != first:
        raise errors.UserError(
            f"slice {f.name!r} is {shape} {np.dtype(props.dtype)} but {files[0].name!r} is "
            f"{first[0]} {first[1]}; all slices in {str(path)!r} must have one size and bit "
            f"depth")
    super().__init__(path, (len(files),) + first[0], first[1], array)
    self.voxel_size_um = skyscan_voxel_size(path)

  def _read(self, z0, z1):
    import imageio.v3 as iio
    out = np.empty((z1 - z0,) + self.shape[1:], self.source_dtype)
    for i, f in enumerate(self.files[z0:z1]):
      try:
        plane = iio.imread(f)
      except Exception as e:
        raise errors.UserError(f"cannot read slice {str(f)!r}: {errors.one_line(e)}") from None
      if plane.shape != self.shape[1:] or plane.dtype != self.source_dtype:
        raise errors.UserError(f"slice {str(f)!r} decodes to {plane.shape} {plane.dtype}, not "
                               f"{self.shape[1:]} {self.source_dtype}")
      out[i] = plane
    return out
