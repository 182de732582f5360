"""zarr arrays (v3 or v2, through tensorstore) and bonejax scan directories.

A scan directory is a zarr v3 group with an `image` (and maybe a `labels`) array: `open`
reads the array named by `array`, and a scan's image brings its stored intensity statistics
(`source.stats`). The voxel size comes from the node's `voxel_size_zyx_um` / `voxel_size_um`
attributes. OME-Zarr images are `ome_zarr`'s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import tensorstore as ts

from bonejax.core import errors
from bonejax.data import store
from bonejax.io import resample, source

OUTPUT_SUFFIXES = (".zarr",)


def is_output(path: str | os.PathLike) -> bool:
  return Path(path).suffix.lower() in OUTPUT_SUFFIXES


def attrs_voxel_size(path: Path) -> tuple[float, float, float] | None:
  """`voxel_size_um` (a number, or (Z, Y, X)) from a zarr v3 node's attributes, if there."""
  try:
    attrs = json.loads((Path(path) / "zarr.json").read_text()).get("attributes", {})
  except (OSError, ValueError, AttributeError):
    return None
  v = attrs.get("voxel_size_zyx_um", attrs.get("voxel_size_um"))
  try:
    return resample.as_zyx(v)
  except errors.UserError:
    return None


def _zarr_json_node(path: Path) -> str | None:
  try:
    return json.loads((path / "zarr.json").read_text()).get("node_type")
  except (OSError, ValueError, AttributeError):
    raise errors.UserError(f"{str(path / 'zarr.json')!r} is not valid zarr metadata") from None


def open_array(path: Path, driver: str, context: ts.Context | None, what: str) -> ts.TensorStore:
  """A zarr v3 ('zarr3') or v2 ('zarr') array opened for reading, or a UserError naming it."""
  spec = {"driver": driver, "kvstore": {"driver": "file", "path": str(path)}}
  try:
    return ts.open(spec, open=True, read=True,
                   context=context if context is not None else store.context()).result()
  except Exception as e:
    raise errors.UserError(f"cannot open {what} {str(path)!r}: {errors.one_line(e)}") from None


class ZarrSource(source.IndexedSource):
  """A zarr v3 or v2 array (or a scan's array), read through tensorstore. `arr` is the opened
  tensorstore array (see `open_array`)."""

  kind = "zarr3"

  @classmethod
  def claims_folder(cls, path: Path) -> bool:
    return any((path / name).exists() for name in ("zarr.json", ".zarray", ".zgroup"))

  @classmethod
  def open(cls, path, *, array, channels, context, key):
    if (path / "zarr.json").exists():
      node = _zarr_json_node(path)
      if node == "array":
        return cls.from_path(path, "zarr3", array, channels=channels, context=context)
      if (path / array / "zarr.json").exists():  # a bonejax scan (or any group with that array)
        src = cls.from_path(path / array, "zarr3", array, what=f"scan {str(path)!r} {array}",
                            channels=channels, context=context)
        src.kind, src.path = "scan", path  # report the path the user gave
        # Every reader of a scan (predict, evaluate, import) says when chunks were lost:
        # they would read as zeros. Once per scan and process.
        store.warn_missing_chunks(path)
        if array == "image":
          src.stats = store.read_group_attrs(path).get("intensity")
        src.voxel_size_um = attrs_voxel_size(path)
        return src
      raise errors.UserError(f"{str(path)!r} is a zarr group without an {array!r} array; "
                             f"point at the array itself")
    if (path / ".zarray").exists():
      return cls.from_path(path, "zarr", array, channels=channels, context=context)
    raise errors.UserError(f"{str(path)!r} is a zarr v2 group; point at the array inside it")

  @classmethod
  def from_path(cls, path: Path, driver: str, array: str = "image", what: str | None = None,
                channels: int | None = 1, context: ts.Context | None = None) -> "ZarrSource":
    arr = open_array(path, driver, context, "zarr array")
    src = cls(path, arr, array, what or f"{str(path)!r}", channels)
    src.kind = driver
    src.voxel_size_um = attrs_voxel_size(path)
    return src

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
