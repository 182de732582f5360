"""TIFF in and out: multi-page TIFFs (also ImageJ hyperstacks and 3D series; singleton T/C axes
are dropped) read slab by slab, and volumes written as calibrated multi-page TIFFs.

Uncompressed files are memory-mapped, compressed ones read page range by page range. The voxel
size comes from OME-TIFF PhysicalSize{X,Y,Z} or ImageJ's unit, spacing and resolution tags.
`export_tiff` writes the ImageJ calibration (spacing, unit 'um', X/Y resolution in pixels per
um) so Fiji, BoneJ and CTAn open the file with its voxel size.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tifffile

import bonejax
from bonejax.core import errors, memory_plan, outputs
from bonejax.io import resample, source, voxel

SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")
OUTPUT_SUFFIXES = (".tif", ".tiff")
# Classic TIFF offsets are 32-bit; leave room for the page directories.
BIGTIFF_BYTES = (1 << 32) - (1 << 26)


def is_tiff_name(p: Path) -> bool:
  return p.suffix.lower() in SUFFIXES and not p.name.startswith(".")


class _Complaints(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.errors: list[str] = []

  def emit(self, record):
    if record.levelno >= logging.ERROR:
      self.errors.append(record.getMessage())


@contextlib.contextmanager
def complaints(path: Path):
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


def open_tiff(path: Path) -> tifffile.TiffFile:
  try:
    return tifffile.TiffFile(path)
  except Exception as e:  # TiffFileError, truncated files, OSError
    raise errors.UserError(f"cannot read TIFF {str(path)!r}: {errors.one_line(e)}") from None


def tiff_voxel_size(tif: tifffile.TiffFile) -> tuple[float, float, float] | None:
  """From OME-TIFF PhysicalSize{X,Y,Z} or ImageJ's unit, spacing and resolution tags."""
  try:
    ome = tif.ome_metadata
    if ome:
      sizes, ok = [], True
      for ax in "ZYX":
        m = re.search(rf'PhysicalSize{ax}="([0-9.eE+-]+)"', ome)
        u = re.search(rf'PhysicalSize{ax}Unit="([^"]+)"', ome)
        scale = voxel.unit_to_um(u.group(1)) if u else 1.0  # OME's default unit: micrometre
        if not m or scale is None:
          ok = False
          break
        sizes.append(float(m.group(1)) * scale)
      if ok:
        return voxel.positive(sizes)
    ij = tif.imagej_metadata
    if ij and voxel.unit_to_um(ij.get("unit")) is not None:
      scale = voxel.unit_to_um(ij.get("unit"))
      page = tif.pages.first
      xres = page.tags.get("XResolution")
      yres = page.tags.get("YResolution")
      if xres is None or yres is None:
        return None
      px = [v[1] / v[0] if v[0] else 0 for v in (yres.value, xres.value)]
      z = float(ij.get("spacing", px[1]))
      return voxel.positive([z * scale, px[0] * scale, px[1] * scale])
  except Exception:  # pylint: disable=broad-except  # metadata we cannot parse: unknown size
    return None
  return None


def _check_claimed(tif: tifffile.TiffFile, series: Any, path: Path) -> None:
  """Refuses a series whose metadata (ImageJ `images=`, `slices=`; OME sizes) claims more
  images than the file holds: tifffile believes the description, and reading (or allocating)
  the claimed shape would fail late or exhaust memory."""
  claimed = len(series)
  if series.dataoffset is not None:  # one contiguous block after the first page
    need = series.dataoffset + math.prod(series.shape) * np.dtype(series.dtype).itemsize
    size = os.path.getsize(path)
    if need > size:
      raise errors.UserError(f"TIFF {str(path)!r} claims shape {tuple(series.shape)} "
                             f"({need:,} bytes of image data) but the file has {size:,} bytes: "
                             f"a damaged file or wrong metadata")
    return
  pages = getattr(series, "_pages", None)
  if pages is None or claimed <= 1:
    return
  if len(pages) == 1:  # tifffile then reads the following pages of the file as the series
    stored = len(tif.pages) - (pages[0].index if pages[0] is not None else 0)
  else:
    stored = sum(1 for p in pages if p is not None)
  if claimed > stored:
    raise errors.UserError(f"TIFF {str(path)!r} claims {claimed:,} images (shape "
                           f"{tuple(series.shape)}) but holds {stored}: a damaged file or wrong "
                           f"ImageJ / OME metadata")


class TiffSource(source.VolumeSource):
  """A multi-page TIFF: memory-mapped when uncompressed, else read a page range at a time."""

  kind = "tiff"
  described = "a TIFF"
  suffixes = SUFFIXES
  magic = (b"II", b"MM")

  @classmethod
  def open(cls, path, *, array, channels, context, key):
    source.one_channel(path, channels, cls.described)
    if channels is None:
      # Multi-channel TIFFs (RGB, CZYX hyperstacks) have no one channel-axis convention.
      with complaints(path), open_tiff(path) as tif:
        shape = tuple(tif.series[0].shape) if tif.series else ()
      if shape and source.channels_of(shape) > 1:
        raise errors.UserError(f"TIFF {str(path)!r} has {source.channels_of(shape)} channels "
                               f"(shape {shape}): give a multi-channel volume as a (Z, Y, X, C) "
                               f".npy or zarr")
    return cls(path, array)

  def __init__(self, path: Path, array: str = "image"):
    try:
      with complaints(path):
        self._open(path, array)
    except BaseException as e:
      if getattr(self, "_tif", None) is not None:
        self.close()
      if isinstance(e, Exception) and not isinstance(e, errors.UserError):
        # tifffile parses lazily: a damaged file fails on first use with whatever the parser
        # met (RuntimeError "incompatible keyframe", struct.error, IndexError, ...).
        raise errors.UserError(f"cannot read TIFF {str(path)!r}: damaged file "
                               f"({type(e).__name__}: {errors.one_line(e)})") from None
      raise

  def _open(self, path: Path, array: str) -> None:
    self._tif, self._mm = open_tiff(path), None
    if not self._tif.series:
      raise errors.UserError(f"TIFF {str(path)!r} holds no images")
    series = self._tif.series[0]
    what = f"TIFF {str(path)!r}"
    if len(self._tif.series) > 1:
      what += f" (first of its {len(self._tif.series)} image series)"
    _check_claimed(self._tif, series, path)
    keep = source.squeeze_to_3d(series.shape, what)
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
    if self._mm is None and not self._paged:
      memory_plan.require_fits(f"TIFF {str(path)!r} of shape {tuple(series.shape)}, stored as one "
                               f"block (read whole),", 2 * self.nbytes)
    self.voxel_size_um = tiff_voxel_size(self._tif)

  def _read(self, z0, z1):
    with complaints(self.path):
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


# ---------------------------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------------------------


def is_output(path: str | os.PathLike) -> bool:
  return Path(path).suffix.lower() in OUTPUT_SUFFIXES


def calibration(voxel_size_um: Sequence[float] | None) -> dict[str, Any]:
  """What makes a TIFF calibrated in ImageJ / Fiji / BoneJ: X/Y resolution in pixels per um
  (`resolution`) and, in the ImageJ description, the Z spacing and the unit; {} when the voxel
  size is unknown."""
  v = resample.as_zyx(voxel_size_um)  # a number or (Z, Y, X); a zero or NaN fails here
  if v is None:
    return {}
  return {"resolution": (1.0 / v[2], 1.0 / v[1]), "spacing": v[0], "unit": "um"}


def export_tiff(source_: Any, path: str | os.PathLike, overwrite: bool = False,
                slab: int = 64, voxel_size_um: Sequence[float] | None = None) -> dict[str, Any]:
  """Writes a (Z, Y, X) array as a multi-page TIFF (one page per slice), slab by slab.

  `source_`: a tensorstore array, a VolumeSource, a scan or a numpy array. `voxel_size_um`:
  (Z, Y, X) in um (default: the source's own when it knows one), written as ImageJ calibration
  (`calibration`) so Fiji, BoneJ and CTAn open the file with its voxel size. BigTIFF when the
  data would not fit classic TIFF's 4 GiB (ImageJ's own layout cannot hold those: they keep the
  X/Y resolution only). The file appears only when complete (outputs.atomic_output). Returns
  {"output", "shape", "dtype", "bigtiff"} and, when calibrated, "voxel_size_zyx_um".
  """
  shape, dtype, read = source.slab_reader(source_)
  if len(shape) != 3:
    raise errors.UserError(f"can only export a 3D (Z, Y, X) volume as TIFF, got shape {shape}")
  if voxel_size_um is None and isinstance(source_, source.VolumeSource):
    voxel_size_um = source_.voxel_size_um
  if dtype == np.bool_:
    dtype = np.dtype(np.uint8)
  slab = max(1, int(slab))
  bigtiff = math.prod(shape) * dtype.itemsize > BIGTIFF_BYTES
  cal = calibration(voxel_size_um)

  def pages():
    for z0 in range(0, shape[0], slab):
      data = np.asarray(read(z0, min(z0 + slab, shape[0]))).astype(dtype, copy=False)
      yield from data

  # ImageJ's format holds uint8, uint16 and float32 in classic TIFF; anything else keeps the
  # X/Y resolution and the spacing in tifffile's own description only.
  imagej = bool(cal) and dtype.name in ("uint8", "uint16", "float32") and not bigtiff
  meta: dict[str, Any] = {"axes": "ZYX", "bonejax_version": bonejax.__version__}
  kw: dict[str, Any] = {}
  if cal:
    kw["resolution"] = cal["resolution"]
    meta.update(spacing=cal["spacing"], unit=cal["unit"])
  # The software tag and the description mark the file as bonejax's: --overwrite may replace it.
  with outputs.atomic_output(path, overwrite) as tmp:
    with tifffile.TiffWriter(tmp, bigtiff=bigtiff, imagej=imagej) as tw:
      tw.write(pages(), shape=shape, dtype=dtype, photometric="minisblack",
               software=f"bonejax {bonejax.__version__}", metadata=meta, **kw)
  result = {"output": str(path), "shape": list(shape), "dtype": dtype.name, "bigtiff": bigtiff}
  if cal:
    result["voxel_size_zyx_um"] = [cal["spacing"], 1.0 / cal["resolution"][1],
                                   1.0 / cal["resolution"][0]]
  return result
