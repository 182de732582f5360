"""The volume formats micro-CT and synchrotron users bring, beyond TIFF, .npy and zarr.

- HDF5 / NeXus (h5py): one 3D dataset, named with `key` (`--image_key=/entry/data/data`), or the
  file's only 3D dataset, or the NeXus default plot (`default` -> NXdata `signal`).
- MRC (mrcfile, memory-mapped): real-valued modes 0, 1, 2, 6, 12; voxel size from the header.
- Folders of 2D slices in any format imageio reads (PNG, BMP, JPEG 2000, JPEG, TIFF ...), in
  natural order, all one shape and bit depth (kept); a Bruker SkyScan `.log` beside them gives
  the voxel size.
- Scanco `.isq`: read by the documented header layout (512-byte blocks; int16 voxels after
  `(data offset + 1) * 512` bytes), memory-mapped so it streams. itk-ioscanco, the kept reader,
  is used by the tests to write and cross-check files, not here: it reads whole volumes only and
  crashes the process (SIGSEGV) on a damaged header instead of raising.
- OME-Zarr (NGFF 0.4 on zarr v2, 0.5 on zarr v3): the full-resolution level, channels moved
  last, the voxel size from its scale.
Every source reads slabs on demand (`read_slab`) and carries `voxel_size_um`, (Z, Y, X) in um or
None when the file does not say. `open_volume` in `volume_io` picks the source.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bonejax.core import errors
from bonejax.io import volume_io

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5", ".nxs", ".nx5", ".cxi")
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
MRC_SUFFIXES = (".mrc", ".mrcs", ".rec", ".st", ".ali", ".map")
ISQ_SUFFIXES = (".isq",)
SLICE_SUFFIXES = (".png", ".bmp", ".jp2", ".j2k", ".jpx", ".jpf", ".jpg", ".jpeg", ".gif",
                  ".webp") + volume_io.TIFF_SUFFIXES
# Length units to micrometres (OME, NeXus, ImageJ and HDF5 attribute spellings).
_UNITS_UM = {"um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "micrometre": 1.0,
             "\u00b5m": 1.0, "\u03bcm": 1.0, "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3,
             "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3, "cm": 1e4, "centimeter": 1e4,
             "m": 1e6, "meter": 1e6, "metre": 1e6, "angstrom": 1e-4, "\u00e5": 1e-4, "a": 1e-4}


def unit_to_um(unit: Any) -> float | None:
  if unit is None:
    return None
  if isinstance(unit, bytes):
    unit = unit.decode(errors="replace")
  return _UNITS_UM.get(str(unit).strip().lower())


def _positive(values: Sequence[float]) -> tuple[float, float, float] | None:
  v = tuple(float(x) for x in values)
  return v if len(v) == 3 and all(math.isfinite(x) and x > 0 for x in v) else None


# ---------------------------------------------------------------------------------------------
# HDF5 / NeXus.
# ---------------------------------------------------------------------------------------------


def _h5_datasets(f) -> list[tuple[str, tuple, str]]:
  import h5py
  found = []

  def visit(name, obj):
    if isinstance(obj, h5py.Dataset):
      found.append(("/" + name, tuple(obj.shape), str(obj.dtype)))
  f.visititems(visit)
  return found


def _describe(datasets) -> str:
  shown = ", ".join(f"{n} {'x'.join(map(str, s)) or 'scalar'} {d}" for n, s, d in datasets[:8])
  more = f" and {len(datasets) - 8} more" if len(datasets) > 8 else ""
  return (shown + more) if datasets else "none"


def _nexus_default(f) -> str | None:
  """The NeXus default plot's signal dataset: /@default -> entry/@default -> NXdata/@signal."""
  try:
    node = f
    for _ in range(3):
      default = node.attrs.get("default")
      if default is None:
        break
      node = node[default.decode() if isinstance(default, bytes) else str(default)]
    signal = node.attrs.get("signal")
    if signal is None:
      return None
    ds = node[signal.decode() if isinstance(signal, bytes) else str(signal)]
    return ds.name
  except (KeyError, ValueError, TypeError, OSError):
    return None


def _h5_voxel_size(ds) -> tuple[float, float, float] | None:
  """From the dataset's (or its group's) attributes: `voxel_size_um` or `element_size_um`
  (ilastik, Fiji), or `voxel_size` / `pixel_size` with a `units` attribute."""
  for node in (ds, ds.parent):
    attrs = node.attrs
    for key, scale in (("voxel_size_um", 1.0), ("element_size_um", 1.0)):
      if key in attrs:
        v = np.atleast_1d(np.asarray(attrs[key], np.float64)) * scale
        return _positive(v if v.size == 3 else np.repeat(v[:1], 3))
    for key in ("voxel_size", "pixel_size"):
      if key in attrs:
        scale = unit_to_um(attrs.get("units", attrs.get("unit")))
        if scale is None:
          continue
        v = np.atleast_1d(np.asarray(attrs[key], np.float64)) * scale
        return _positive(v if v.size == 3 else np.repeat(v[:1], 3))
  return None


class H5Source(volume_io._IndexedSource):
  """One dataset of an HDF5 / NeXus file, read through h5py (chunked datasets stream)."""

  kind = "hdf5"

  def __init__(self, path: Path, key: str | None = None, array: str = "image",
               channels: int | None = 1):
    import h5py
    try:
      self._file = h5py.File(path, "r")
    except Exception as e:  # not HDF5, truncated, locked
      raise errors.UserError(f"cannot read HDF5 {str(path)!r}: {errors.one_line(e)}") from None
    try:
      ds = self._dataset(path, key)
      self.key = ds.name
      super().__init__(path, ds, array, f"HDF5 dataset {ds.name!r} in {str(path)!r}", channels)
      self.voxel_size_um = _h5_voxel_size(ds)
    except BaseException:
      self._file.close()
      raise

  def _dataset(self, path: Path, key: str | None):
    import h5py
    f = self._file
    datasets = _h5_datasets(f)
    if key:
      node = f.get(key)
      if not isinstance(node, h5py.Dataset):
        what = "is a group, not a dataset" if node is not None else "does not exist"
        raise errors.UserError(f"HDF5 key {key!r} {what} in {str(path)!r}; its datasets: "
                            f"{_describe(datasets)}")
      return node
    default = _nexus_default(f)
    if default is not None:
      return f[default]
    volumes = [d for d in datasets if len([s for s in d[1] if s != 1]) >= 3]
    if len(volumes) == 1:
      return f[volumes[0][0]]
    raise errors.UserError(f"{str(path)!r} holds {len(volumes) or 'no'} volume datasets; name one "
                        f"with --image_key (datasets: {_describe(datasets)})")

  def _read(self, z0, z1):
    try:
      return super()._read(z0, z1)
    except Exception as e:
      raise errors.UserError(f"cannot read HDF5 {str(self.path)!r} {self.key} slices "
                          f"{z0}-{z1 - 1}: {errors.one_line(e)}") from None

  def close(self):
    self._file.close()


# ---------------------------------------------------------------------------------------------
# MRC.
# ---------------------------------------------------------------------------------------------

MRC_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}


class MrcSource(volume_io._IndexedSource):
  """An MRC / CCP4 map or tomogram, memory-mapped by mrcfile."""

  kind = "mrc"

  def __init__(self, path: Path, array: str = "image"):
    import mrcfile
    import warnings
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mrcfile warns (rather than raises) on odd headers
        self._mrc = mrcfile.mmap(path, mode="r", permissive=True)
    except Exception as e:
      raise errors.UserError(f"cannot read MRC {str(path)!r}: {errors.one_line(e)}") from None
    try:
      mode = int(self._mrc.header.mode)
      if mode not in MRC_MODES or self._mrc.data is None:
        raise errors.UserError(
            f"MRC {str(path)!r} has data mode {mode}, not a real-valued volume (need one of "
            + ", ".join(f"{m} ({t})" for m, t in MRC_MODES.items()) + ")")
      super().__init__(path, self._mrc.data, array, f"MRC {str(path)!r}", 1)
      vs = self._mrc.voxel_size
      # Angstrom, (x, y, z) -> um, (z, y, x); all zero when the header leaves it unset.
      self.voxel_size_um = _positive([float(vs.z) * 1e-4, float(vs.y) * 1e-4,
                                      float(vs.x) * 1e-4])
    except BaseException:
      self._mrc.close()
      raise

  def close(self):
    self._arr = None
    self._mrc.close()


# ---------------------------------------------------------------------------------------------
# Folders of 2D slices (imageio).
# ---------------------------------------------------------------------------------------------


def slice_files(folder: Path) -> list[Path]:
  """The image files in `folder` (hidden ones left out), in natural order."""
  files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
           and p.suffix.lower() in SLICE_SUFFIXES]
  return sorted(files, key=lambda p: volume_io.natural_key(p.name))


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
        return _positive([float(m.group(1))] * 3)
      except ValueError:
        return None
  return None


class ImageFolderSource(volume_io.VolumeSource):
  """A folder of 2D slices imageio reads, one per Z in natural order; every slice's shape and
  dtype are checked up front, so a mismatch fails before anything is written."""

  kind = "image-folder"

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


# ---------------------------------------------------------------------------------------------
# Scanco .isq.
# ---------------------------------------------------------------------------------------------

ISQ_MAGIC = b"CTDATA-HEADER_V1"
ISQ_INT16 = 3  # the header's data type code of signed 16-bit voxels, the only one ISQ uses


class IsqSource(volume_io._IndexedSource):
  """A Scanco ISQ volume: int16 voxels, x fastest, after a header of 512-byte blocks.

  Header fields (little-endian int32 at byte offsets): 16 data type, 44/48/52 dimensions in
  voxels (x, y, z), 56/60/64 dimensions in um, 508 data offset in blocks (data begins at
  (offset + 1) * 512).
  """

  kind = "isq"

  def __init__(self, path: Path, array: str = "image"):
    try:
      size = path.stat().st_size
      with open(path, "rb") as f:
        head = f.read(512)
    except OSError as e:
      raise errors.UserError(f"cannot read ISQ {str(path)!r}: {errors.one_line(e)}") from None
    bad = f"ISQ {str(path)!r} is damaged or not a Scanco ISQ file"
    if len(head) < 512 or head[:16] != ISQ_MAGIC:
      raise errors.UserError(f"{bad} (no {ISQ_MAGIC.decode()} header)")
    ints = np.frombuffer(head, "<i4")
    dtype_code, dims, dims_um, offset = int(ints[4]), ints[11:14], ints[14:17], int(ints[127])
    if dtype_code != ISQ_INT16:
      raise errors.UserError(f"{bad} (data type {dtype_code}; ISQ volumes are int16, type 3)")
    if (dims <= 0).any() or offset < 0:
      raise errors.UserError(f"{bad} (dimensions {dims.tolist()}, data offset {offset})")
    nx, ny, nz = (int(d) for d in dims)
    start, nbytes = (offset + 1) * 512, nx * ny * nz * 2
    if start + nbytes > size:
      raise errors.UserError(f"{bad}: truncated ({size} bytes; the header promises "
                          f"{nx} x {ny} x {nz} int16 voxels from byte {start})")
    mm = np.memmap(path, np.dtype("<i2"), "r", offset=start, shape=(nz, ny, nx))
    super().__init__(path, mm, array, f"ISQ {str(path)!r}", 1)
    self.voxel_size_um = _positive([dims_um[2] / nz, dims_um[1] / ny, dims_um[0] / nx]) \
        if (dims_um > 0).all() else None

  def close(self):
    mm = getattr(self._arr, "_mmap", None)
    if mm is not None:
      mm.close()


# ---------------------------------------------------------------------------------------------
# OME-Zarr inputs.
# ---------------------------------------------------------------------------------------------


def ome_multiscales(path: Path) -> tuple[list, int] | None:
  """(multiscales list, zarr format) when `path` is an OME-Zarr image group, else None."""
  if (path / "zarr.json").exists():
    try:
      meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
      return None
    attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
    ms = (attrs.get("ome") or {}).get("multiscales") or attrs.get("multiscales")
    return (ms, 3) if ms else None
  if (path / ".zattrs").exists():
    try:
      attrs = json.loads((path / ".zattrs").read_text())
    except (OSError, ValueError):
      return None
    ms = attrs.get("multiscales") if isinstance(attrs, dict) else None
    return (ms, 2) if ms else None
  return None


def _scale_of(transforms: Any, n: int) -> list[float]:
  scale = [1.0] * n
  for t in transforms or []:
    if isinstance(t, dict) and t.get("type") == "scale" and len(t.get("scale", [])) == n:
      scale = [a * float(b) for a, b in zip(scale, t["scale"])]
  return scale


def ome_level0(path: Path, multiscales: list) -> tuple[str, list[str], list[float] | None]:
  """(level-0 path, axis names, voxel size (Z, Y, X) in um or None) of the first multiscale."""
  try:
    ms = multiscales[0]
    level = ms["datasets"][0]
    axes = [a["name"] if isinstance(a, dict) else str(a) for a in ms.get("axes", [])]
    units = [a.get("unit") if isinstance(a, dict) else None for a in ms.get("axes", [])]
    rel = str(level["path"])
  except (KeyError, IndexError, TypeError) as e:
    raise errors.UserError(f"OME-Zarr {str(path)!r} has malformed multiscales metadata "
                        f"({errors.one_line(e)})") from None
  if not axes:
    axes = ["t", "c", "z", "y", "x"][-len(level.get("coordinateTransformations", [{}])[0]
                                          .get("scale", [0] * 5)):]
  voxel = None
  if all(a in axes for a in "zyx"):
    scale = [a * b for a, b in zip(_scale_of(level.get("coordinateTransformations"), len(axes)),
                                   _scale_of(ms.get("coordinateTransformations"), len(axes)))]
    um = [unit_to_um(units[axes.index(a)]) if units[axes.index(a)] else None for a in "zyx"]
    if all(u is not None for u in um):
      voxel = _positive([scale[axes.index(a)] * u for a, u in zip("zyx", um)])
  if not rel or rel.startswith("/") or ".." in Path(rel).parts:
    raise errors.UserError(f"OME-Zarr {str(path)!r} names an unsafe level path {rel!r}")
  return rel, axes, voxel


def open_ome_zarr(path: Path, multiscales: list, zarr_format: int, array: str,
                  channels: int | None, context=None) -> volume_io.VolumeSource:
  """The full-resolution level as a (Z, Y, X) or (Z, Y, X, C) source (channels moved last)."""
  import tensorstore as ts
  rel, axes, voxel = ome_level0(path, multiscales)
  src = volume_io.ZarrSource.__new__(volume_io.ZarrSource)
  driver = "zarr3" if zarr_format == 3 else "zarr"
  spec = {"driver": driver, "kvstore": {"driver": "file", "path": str(path / rel)}}
  from bonejax.data import store
  try:
    arr = ts.open(spec, open=True, read=True,
                  context=context if context is not None else store.context()).result()
  except Exception as e:
    raise errors.UserError(f"cannot open OME-Zarr level {str(path / rel)!r}: "
                        f"{errors.one_line(e)}") from None
  if len(axes) == arr.rank and "c" in axes and axes.index("c") != arr.rank - 1:
    arr = arr[ts.d[axes.index("c")].transpose[arr.rank - 1]]  # channels last, as elsewhere
  src.kind = "ome-zarr"
  volume_io._IndexedSource.__init__(src, path, arr, array, f"OME-Zarr {str(path)!r}", channels)
  src.voxel_size_um = voxel
  return src


# ---------------------------------------------------------------------------------------------
# TIFF metadata.
# ---------------------------------------------------------------------------------------------


def tiff_voxel_size(tif) -> tuple[float, float, float] | None:
  """From OME-TIFF PhysicalSize{X,Y,Z} or ImageJ's unit, spacing and resolution tags."""
  try:
    ome = tif.ome_metadata
    if ome:
      sizes, ok = [], True
      for ax in "ZYX":
        m = re.search(rf'PhysicalSize{ax}="([0-9.eE+-]+)"', ome)
        u = re.search(rf'PhysicalSize{ax}Unit="([^"]+)"', ome)
        scale = unit_to_um(u.group(1)) if u else 1.0  # OME's default unit is the micrometre
        if not m or scale is None:
          ok = False
          break
        sizes.append(float(m.group(1)) * scale)
      if ok:
        return _positive(sizes)
    ij = tif.imagej_metadata
    if ij and unit_to_um(ij.get("unit")) is not None:
      scale = unit_to_um(ij.get("unit"))
      page = tif.pages.first
      xres = page.tags.get("XResolution")
      yres = page.tags.get("YResolution")
      if xres is None or yres is None:
        return None
      px = [v[1] / v[0] if v[0] else 0 for v in (yres.value, xres.value)]
      z = float(ij.get("spacing", px[1]))
      return _positive([z * scale, px[0] * scale, px[1] * scale])
  except Exception:  # pylint: disable=broad-except  # metadata we cannot parse: unknown size
    return None
  return None
