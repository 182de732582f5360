"""HDF5 / NeXus (h5py): one 3D dataset, named with `key` (`--image_key=/entry/data/data`), or the
file's only 3D dataset, or the NeXus default plot (`default` -> NXdata `signal`). Chunked
datasets stream; the voxel size comes from the dataset's or its group's attributes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bonejax.core import errors
from bonejax.io import source, voxel

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5", ".nxs", ".nx5", ".cxi")
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


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
        return voxel.positive(v if v.size == 3 else np.repeat(v[:1], 3))
    for key in ("voxel_size", "pixel_size"):
      if key in attrs:
        scale = voxel.unit_to_um(attrs.get("units", attrs.get("unit")))
        if scale is None:
          continue
        v = np.atleast_1d(np.asarray(attrs[key], np.float64)) * scale
        return voxel.positive(v if v.size == 3 else np.repeat(v[:1], 3))
  return None


class H5Source(source.IndexedSource):
  """One dataset of an HDF5 / NeXus file, read through h5py (chunked datasets stream)."""

  kind = "hdf5"
  suffixes = HDF5_SUFFIXES
  magic = (HDF5_MAGIC,)
  takes_key = True

  @classmethod
  def open(cls, path, *, array, channels, context, key):
    return cls(path, key, array, channels)

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
