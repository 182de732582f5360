"""bonejax volumes as napari layer data: scale from the voxel size, class names and colours.

The reader and the widgets describe layers as napari's LayerData tuples `(data, kwargs, type)`,
built here without importing napari (a reader may run headless). What bonejax knows about a
layer (intensity statistics, class names, voxel size, the file it came from) travels in
`metadata["bonejax"]`, so a widget can use a scan's stored statistics and write the classes
back into its outputs; layers of other plugins get the same from their scale and values.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bonejax.io import colours as class_colours

KEY = "bonejax"
UNIT = "micrometer"
# Below this, a volume is read into memory (napari can then paint labels and compute
# histograms); above, it stays on disk and napari reads only the planes it shows.
IN_MEMORY_BYTES = 1 << 30
OTHER_LABEL = "#808080"  # labels >= the number of classes


class LazyVolume:
  """A tensorstore array as the numpy-like napari slices: only the planes shown are read."""

  def __init__(self, store):
    self.store = store
    self.shape = tuple(int(s) for s in store.shape)
    self.dtype = np.dtype(store.dtype.numpy_dtype)
    self.ndim = len(self.shape)
    self.size = math.prod(self.shape)

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, index) -> np.ndarray:
    return np.asarray(self.store[index].read().result())

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    a = self[...]
    return a if dtype is None else a.astype(dtype)


def volume(store, force_memory: bool = False):
  """The array of a tensorstore: in memory when small, else a LazyVolume."""
  lazy = LazyVolume(store)
  if force_memory or lazy.size * lazy.dtype.itemsize <= IN_MEMORY_BYTES:
    return lazy[...]
  return lazy


def tensorstore_of(data: Any):
  """The tensorstore behind a layer's data (a LazyVolume), or None for in-memory arrays."""
  return data.store if isinstance(data, LazyVolume) else None


def zyx(voxel_size_um: Any) -> tuple[float, float, float] | None:
  """One number or (Z, Y, X) micrometres as a (Z, Y, X) tuple; None when unknown or invalid."""
  if voxel_size_um is None:
    return None
  try:
    v = ((float(voxel_size_um),) * 3 if np.ndim(voxel_size_um) == 0
         else tuple(float(x) for x in voxel_size_um))
  except (TypeError, ValueError):
    return None
  return v if len(v) == 3 and all(math.isfinite(x) and x > 0 for x in v) else None


def scale_for(voxel_size_um: Any, ndim: int = 3) -> tuple[float, ...]:
  """napari's scale: the (Z, Y, X) voxel size (1 where unknown); leading axes get 1."""
  v = zyx(voxel_size_um) or (1.0, 1.0, 1.0)
  return (1.0,) * (ndim - 3) + v if ndim >= 3 else v[-ndim:]


def units_for(ndim: int = 3) -> tuple[str, ...]:
  """Micrometres on every axis of every bonejax layer, known voxel size or not (then 1 um is
  assumed, as import assumes it): napari renders in physical units only when all layers agree."""
  return (UNIT,) * ndim


def label_colours(num_classes: int) -> dict[Any, str]:
  """Class k's colour from bonejax.io.colours (one look everywhere); 0 is napari's background."""
  colours: dict[Any, str] = {None: OTHER_LABEL}
  colours.update({k: class_colours.colour(k) for k in range(1, num_classes)})
  return colours


def _voxel_meta(voxel_size_um: Any) -> list[float] | None:
  v = zyx(voxel_size_um)
  return list(v) if v is not None else None


def image_layer(data, name: str, *, voxel_size_um: Any = None,
                stats: dict[str, Any] | None = None, source: str | Path | None = None,
                **extra: Any) -> tuple:
  """An image layer; `voxel_size_um`: (Z, Y, X) micrometres (or one number)."""
  kwargs: dict[str, Any] = {
      "name": name, "scale": scale_for(voxel_size_um, 3), "units": units_for(3),
      "metadata": {KEY: {"voxel_size_um": _voxel_meta(voxel_size_um), "intensity": stats,
                         "source": None if source is None else str(source)}}}
  if stats and stats.get("p99_9", 0) > stats.get("p0_5", 0):
    # The stored percentiles: napari would otherwise scan a lazy volume for its range.
    kwargs["contrast_limits"] = (float(stats["p0_5"]), float(stats["p99_9"]))
  kwargs.update(extra)
  return (data, kwargs, "image")


def labels_layer(data, name: str, classes: Sequence[str] | None, *,
                 voxel_size_um: Any = None, source: str | Path | None = None,
                 **extra: Any) -> tuple:
  """A labels layer; `voxel_size_um`: (Z, Y, X) micrometres (or one number)."""
  kwargs: dict[str, Any] = {
      "name": name, "scale": scale_for(voxel_size_um, 3), "units": units_for(3),
      "metadata": {KEY: {"voxel_size_um": _voxel_meta(voxel_size_um),
                         "classes": None if classes is None else list(classes),
                         "source": None if source is None else str(source)}}}
  if classes:
    # Hovering shows "value; class: bone" in the status bar.
    kwargs["features"] = {"index": list(range(len(classes))), "class": list(classes)}
    kwargs["colormap"] = label_colours(len(classes))
  kwargs.update(extra)
  return (data, kwargs, "labels")


# ---------------------------------------------------------------------------------------------
# Reading what a layer carries (any napari layer, ours or not).
# ---------------------------------------------------------------------------------------------


def data_of(layer):
  """A layer's full-resolution array (level 0 of a multiscale layer)."""
  return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def info(layer) -> dict[str, Any]:
  return dict((getattr(layer, "metadata", None) or {}).get(KEY) or {})


def classes_of(layer) -> list[str] | None:
  classes = info(layer).get("classes")
  if classes:
    return [str(c) for c in classes]
  feats = getattr(layer, "features", None)
  if feats is not None and "class" in getattr(feats, "columns", ()) and len(feats):
    return [str(c) for c in feats["class"]]
  return None


def voxel_size_of(layer) -> tuple[float, float, float] | None:
  """The layer's (Z, Y, X) voxel size in micrometres: ours, else its scale when not all 1
  (another plugin's layer in micrometres), else None."""
  v = zyx(info(layer).get("voxel_size_um"))
  if v is not None:
    return v
  scale = zyx([float(s) for s in getattr(layer, "scale", ())[-3:]])
  if scale is not None and not all(math.isclose(s, 1.0) for s in scale):
    return scale
  return None


def source_of(layer) -> str | None:
  return info(layer).get("source")
