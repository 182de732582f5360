"""Drag and drop into napari: bonejax scans, datasets, predictions and OME-Zarr images.

`get_reader(path)` (the manifest's reader command) answers only for directories it recognises,
so napari falls back to other readers for everything else:
  DATA/ (dataset.json)        every scan: image + labels layers, class names from dataset.json
  DATA/scan_000 (zarr group)  its image (stored statistics as contrast limits) and labels
  pred.zarr (zarr array)      labels (integers with class names, as predict.py writes them)
                              or an image; (Z, Y, X, K) mean probabilities as one image
                              layer per class
  x.ome.zarr                  OME-NGFF 0.4 / 0.5 (see ngff)
Scale is the (Z, Y, X) voxel size in micrometres, never collapsed to one number (a prediction
takes its source scan's when it has none); every layer is in micrometres. The scans of a dataset
are placed with their centres on the first scan's, so one with another voxel size (hence
another physical extent) still opens centred in the view.
Bad input (a damaged scan, a dataset.json that does not parse) is one napari notification,
never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tensorstore as ts

from bonejax.core import errors
from bonejax.data import store
from bonejax.evaluate import provenance, report
from bonejax.io import colours
from bonejax.napari import jobs, layers, ngff


def kind_of(p: Path) -> str | None:
  if not p.is_dir():
    return None
  if (p / store.DATASET_JSON).exists():
    return "dataset"
  if store.is_scan(p):
    return "scan"
  if ngff.is_ome_zarr(p):
    return "ome"
  if (p / ".zarray").exists():
    return "array"
  if (p / "zarr.json").exists():
    try:
      node = json.loads((p / "zarr.json").read_text()).get("node_type")
    except (OSError, ValueError):
      return None
    return "array" if node == "array" else None
  return None


def get_reader(path: str | list[str]) -> Callable | None:
  if isinstance(path, (list, tuple)):
    if len(path) != 1:
      return None
    path = path[0]
  kind = kind_of(Path(path))
  if kind is None:
    return None
  return lambda p: read(p, kind)


def read(path: str | list[str], kind: str | None = None) -> list[tuple]:
  """LayerData for `path`; on bad input a notification and napari's 'nothing' sentinel."""
  p = Path(path[0] if isinstance(path, (list, tuple)) else path)
  try:
    kind = kind or kind_of(p)
    if kind is None:
      raise errors.UserError(f"{str(p)!r} is not a bonejax scan, dataset, prediction or OME-Zarr")
    return {"dataset": read_dataset, "scan": read_scan, "array": read_array,
            "ome": ngff.read}[kind](p)
  except Exception as e:  # pylint: disable=broad-except  (a reader never shows a traceback)
    from napari.utils.notifications import show_error
    show_error(f"bonejax: {jobs.message(e)}")
    return [(None,)]


# ---------------------------------------------------------------------------------------------
# Scans and datasets.
# ---------------------------------------------------------------------------------------------


def scan_classes(scan: store.Scan) -> list[str] | None:
  return report.dataset_classes(scan.path) or scan.attrs.get("classes")


def attrs_voxel_size(attrs: dict[str, Any]) -> tuple[float, float, float] | None:
  """(Z, Y, X) micrometres from bonejax attributes (`voxel_size_zyx_um`, else the one number)."""
  return layers.zyx(attrs.get("voxel_size_zyx_um", attrs.get("voxel_size_um")))


def scan_layers(scan: store.Scan, classes: list[str] | None = None,
                visible: bool = True, translate: tuple[float, ...] | None = None) -> list[tuple]:
  v = attrs_voxel_size(scan.attrs)
  extra = {"visible": visible}
  if translate is not None:
    extra["translate"] = tuple(translate)
  out = [layers.image_layer(layers.volume(scan.image), scan.name, voxel_size_um=v,
                            stats=scan.attrs.get("intensity"), source=scan.path, **extra)]
  if scan.labels is not None:
    out.append(layers.labels_layer(layers.volume(scan.labels), f"{scan.name} labels",
                                   classes or scan_classes(scan), voxel_size_um=v,
                                   source=scan.path, **extra))
  return out


def centre_um(shape, voxel_size_um) -> np.ndarray:
  """The physical centre of a volume (voxel centres at index x scale, as napari places them)."""
  scale = np.asarray(layers.scale_for(voxel_size_um, 3))
  return (np.asarray(shape[:3], float) - 1) * scale / 2


def read_scan(p: Path) -> list[tuple]:
  return scan_layers(store.open_scan(p))


def read_dataset(p: Path) -> list[tuple]:
  ds = store.open_dataset(p)
  if not ds.scans:
    raise errors.UserError(f"dataset {str(p)!r} lists no scans")
  out = []
  anchor = None
  for i, name in enumerate(ds.scans):
    scan = ds.open_scan(name)
    centre = centre_um(scan.image.shape, attrs_voxel_size(scan.attrs))
    anchor = centre if anchor is None else anchor
    # Every scan centred on the first: the view napari fits around all layers stays centred on
    # the one shown, whatever the others' voxel sizes and shapes.
    out += scan_layers(scan, ds.classes, visible=i == 0,  # one shown at a time
                       translate=tuple(float(t) for t in anchor - centre))
  return out


# ---------------------------------------------------------------------------------------------
# Single arrays: predictions, probabilities, scans' own arrays.
# ---------------------------------------------------------------------------------------------


def open_array(p: Path) -> tuple[Any, dict[str, Any]]:
  """(tensorstore, attributes) of a zarr v3 or v2 array."""
  v3 = (p / "zarr.json").exists()
  spec = {"driver": "zarr3" if v3 else "zarr", "kvstore": {"driver": "file", "path": str(p)}}
  try:
    arr = ts.open(spec, open=True, read=True, context=store.context()).result()
  except ValueError as e:
    raise errors.UserError(f"cannot open zarr array {str(p)!r}: {errors.short_message(e)}") from None
  if v3:
    attrs = store.array_attrs(p)
  else:
    zattrs = p / ".zattrs"
    attrs = json.loads(zattrs.read_text()) if zattrs.exists() else {}
  return arr, attrs


def array_voxel_size(p: Path, attrs: dict[str, Any]) -> tuple[float, float, float] | None:
  v = attrs_voxel_size(attrs)
  if v is not None:
    return v
  candidates = [attrs.get("source"),
                 # demo.py names its held-out scan: WORKDIR/prediction.zarr beside WORKDIR/data
                 p.parent / "data" / attrs["scan"] if isinstance(attrs.get("scan"), str) else None,
                 p.parent if p.name in ("image", "labels") else None]
  return provenance.voxel_size_of(*(c for c in candidates if c and Path(c).exists()))


def array_classes(p: Path, attrs: dict[str, Any]) -> list[str] | None:
  if attrs.get("classes"):
    return [str(c) for c in attrs["classes"]]
  if p.name == "labels" and store.is_scan(p.parent):
    return report.dataset_classes(p.parent)
  return None


def read_array(p: Path) -> list[tuple]:
  arr, attrs = open_array(p)
  dtype = np.dtype(arr.dtype.numpy_dtype)
  name = p.name[:-5] if p.name.endswith(".zarr") else p.name
  v = array_voxel_size(p, attrs)
  classes = array_classes(p, attrs)
  # Labels: predictions name their classes (predict.py, demo.py), a scan's labels/ has them in
  # dataset.json; any other integer array is an image (a uint16 volume is not a segmentation).
  is_labels = attrs.get("classes") or (p.name == "labels" and store.is_scan(p.parent))
  if arr.rank == 3 and np.issubdtype(dtype, np.integer) and is_labels:
    return [layers.labels_layer(layers.volume(arr), name, classes, voxel_size_um=v, source=p)]
  if arr.rank == 4 and arr.shape[3] <= 16:
    # Channels last: (Z, Y, X, K) mean probabilities, one layer per class in the class's colour;
    # other channels (uncertainty maps: entropy, disagreement) one layer each.
    k = int(arr.shape[3])
    probs = np.issubdtype(dtype, np.floating) and classes and len(classes) == k
    names = (list(attrs.get("channels") or []) if not probs else classes) or []
    if len(names) != k:
      names = [f"class_{i}" for i in range(k)] if np.issubdtype(dtype, np.floating) \
          else [str(i) for i in range(k)]
    data, kwargs, _ = layers.image_layer(layers.volume(arr), name, voxel_size_um=v, source=p)
    kwargs.update(channel_axis=3, blending="additive")
    if np.issubdtype(dtype, np.floating):
      kwargs.update(name=[f"{name} p({c})" for c in names], contrast_limits=[(0.0, 1.0)] * k,
                    colormap=["gray"] + [_colormap(i) for i in range(1, k)],
                    visible=[i > 0 for i in range(k)])
    else:
      kwargs.update(name=[f"{name} {c}" for c in names], colormap="magma",
                    visible=[i == 0 for i in range(k)])
    return [(data, kwargs, "image")]
  if arr.rank in (3, 4):
    return [layers.image_layer(layers.volume(arr), name, voxel_size_um=v, source=p)]
  raise errors.UserError(f"{str(p)!r} has shape {tuple(arr.shape)}; bonejax volumes are "
                      f"(Z, Y, X) or (Z, Y, X, C)")


def _colormap(k: int):
  """A black-to-class-colour ramp (napari takes a name or an (N, 4) array of colours)."""
  c = colours.colour(k).lstrip("#")
  rgb = [int(c[i:i + 2], 16) / 255 for i in (0, 2, 4)]
  return np.array([[0, 0, 0, 1], rgb + [1]], np.float32)
