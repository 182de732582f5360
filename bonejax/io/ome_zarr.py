"""OME-Zarr in and out. Inputs (NGFF 0.4 on zarr v2, 0.5 on zarr v3): `OmeZarrSource` reads the
full-resolution level, channels moved last, the voxel size from its scale. Outputs (OME-NGFF
0.5 on zarr v3): what napari, Fiji (MoBIE / BigDataViewer), neuroglancer and webKnossos open
without conversion.

An `OmeZarrWriter` makes one multiscale image group:

    PRED.ome.zarr/
      zarr.json     group attributes: "ome" {version 0.5, multiscales (axes with units, one
                    scale per level), image-label (class colours and names) or omero (channel
                    names)}, and bonejax's own attributes (model, classes, bonejax_version, ...)
      0/ 1/ ...     zarr v3 arrays, level 0 at full resolution, each next level halved along
                    Z, Y and X (labels by the most frequent class of each 2x2x2 block,
                    probabilities and images by the block mean); `dimension_names` set

Channels (probabilities, uncertainty maps) carry omero metadata: one labelled channel each (the
class names), class colours, and a display window from the dtype ([0, 1] for float
probabilities, 0-255 for uint8 maps). `nest_under_image` turns a finished labels group into
an image with those labels under its `labels/` group (NGFF's image + labels layout).

Level 0 is filled by the caller slab by slab (`view`: (Z, Y, X) or (Z, Y, X, C), channels last
as everywhere in bonejax, stored channel-first as NGFF wants); `finish()` then builds each
level from the one before, a slab at a time, and writes the metadata, so memory stays a slab's.
The caller writes the group under a temporary name (`outputs.atomic_output`): it appears whole.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tensorstore as ts

from bonejax.core import errors, outputs
from bonejax.data import store
from bonejax.io import colours, source, voxel, zarr

SUFFIX = ".ome.zarr"
NGFF_VERSION = "0.5"
CHUNK = 64
MIN_LEVEL_SIZE = 32   # stop halving once the largest axis is this small
MAX_LEVELS = 10
SLAB_BYTES = 64 << 20  # level-building reads about this much at a time


def is_ome_zarr_path(path: Any) -> bool:
  return str(path).lower().rstrip("/").endswith(SUFFIX)


def level_shapes(shape: Sequence[int], min_size: int = MIN_LEVEL_SIZE,
                 max_levels: int = MAX_LEVELS) -> list[tuple[int, ...]]:
  """(Z, Y, X) of every level: halved (rounding up) until the largest axis is <= min_size."""
  shapes = [tuple(int(s) for s in shape)]
  while len(shapes) < max_levels and max(shapes[-1]) > min_size:
    shapes.append(tuple(max(1, -(-s // 2)) for s in shapes[-1]))
  return shapes


def label_metadata(classes: Sequence[str]) -> dict[str, Any]:
  """NGFF `image-label`: one colour per class (bonejax's report colours; background clear) and
  the class names as properties."""
  return {
      "colors": [{"label-value": k,
                  "rgba": colours.rgba(colours.colour(k), 0 if k == 0 else 255)}
                 for k in range(len(classes))],
      "properties": [{"label-value": k, "class": str(c)} for k, c in enumerate(classes)],
  }


def display_range(dtype: Any) -> tuple[float, float]:
  """The omero window of a channel: [0, 1] for floats (probabilities), the full range of an
  integer type (0-255 for uint8 maps)."""
  dtype = np.dtype(dtype)
  if np.issubdtype(dtype, np.integer):
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)
  return 0.0, 1.0


def channel_colour(k: int) -> str:
  """Channel k's omero colour (RRGGBB): class k's colour, so class probabilities look like the
  labels; the black of class 0 would hide its channel, so it is shown white."""
  c = colours.colour(k).lstrip("#").upper()
  return "FFFFFF" if c == "000000" else c


# ---------------------------------------------------------------------------------------------
# Reading: the full-resolution level.
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
  voxel_um = None
  if all(a in axes for a in "zyx"):
    scale = [a * b for a, b in zip(_scale_of(level.get("coordinateTransformations"), len(axes)),
                                   _scale_of(ms.get("coordinateTransformations"), len(axes)))]
    um = [voxel.unit_to_um(units[axes.index(a)]) if units[axes.index(a)] else None for a in "zyx"]
    if all(u is not None for u in um):
      voxel_um = voxel.positive([scale[axes.index(a)] * u for a, u in zip("zyx", um)])
  if not rel or rel.startswith("/") or ".." in Path(rel).parts:
    raise errors.UserError(f"OME-Zarr {str(path)!r} names an unsafe level path {rel!r}")
  return rel, axes, voxel_um


class OmeZarrSource(zarr.ZarrSource):
  """The full-resolution level of an OME-Zarr image as a (Z, Y, X) or (Z, Y, X, C) source
  (channels moved last, as everywhere in bonejax)."""

  kind = "ome-zarr"

  @classmethod
  def claims_folder(cls, path: Path) -> bool:
    return ome_multiscales(path) is not None

  @classmethod
  def open(cls, path, *, array, channels, context, key):
    multiscales, zarr_format = ome_multiscales(path)
    rel, axes, voxel_um = ome_level0(path, multiscales)
    arr = zarr.open_array(path / rel, "zarr3" if zarr_format == 3 else "zarr", context,
                          "OME-Zarr level")
    if len(axes) == arr.rank and "c" in axes and axes.index("c") != arr.rank - 1:
      arr = arr[ts.d[axes.index("c")].transpose[arr.rank - 1]]
    src = cls(path, arr, array, f"OME-Zarr {str(path)!r}", channels)
    src.voxel_size_um = voxel_um
    return src


# ---------------------------------------------------------------------------------------------
# Downsampling one slab of a level into the next.
# ---------------------------------------------------------------------------------------------


def _blocks(data: np.ndarray) -> np.ndarray:
  """(Z, Y, X[, C]) -> (Z/2, 2, Y/2, 2, X/2, 2[, C]), odd axes padded by repeating the edge."""
  pad = [(0, s % 2) for s in data.shape[:3]] + [(0, 0)] * (data.ndim - 3)
  if any(p[1] for p in pad):
    data = np.pad(data, pad, mode="edge")
  z, y, x = (s // 2 for s in data.shape[:3])
  return data.reshape((z, 2, y, 2, x, 2) + data.shape[3:])


def downsample_mean(data: np.ndarray) -> np.ndarray:
  """Block means, rounded back to integers for integer dtypes."""
  mean = _blocks(data).mean(axis=(1, 3, 5), dtype=np.float64)
  if np.issubdtype(data.dtype, np.integer):
    return np.rint(mean).astype(data.dtype)
  return mean.astype(data.dtype)


def downsample_mode(data: np.ndarray) -> np.ndarray:
  """The most frequent label of each block; ties go to the lowest label."""
  blocks = _blocks(data)
  present = np.unique(data)
  best = np.zeros(blocks.shape[0:1] + blocks.shape[2:3] + blocks.shape[4:5], data.dtype)
  best_count = np.full(best.shape, -1, np.int16)
  for v in present.tolist():  # ascending: a tie keeps the lower label
    count = (blocks == v).sum(axis=(1, 3, 5), dtype=np.int16)
    better = count > best_count
    best[better], best_count[better] = v, count[better]
  return best


# ---------------------------------------------------------------------------------------------
# The writer.
# ---------------------------------------------------------------------------------------------


class OmeZarrWriter:
  """One OME-NGFF 0.5 multiscale image under `path` (see the module docstring).

  `kind`: "labels" (uint8 classes; mode pyramid; `image-label` metadata from `classes`) or
  "image" (images, probabilities, uncertainty; mean pyramid). `channels`: None for (Z, Y, X),
  else C with `channel_names`. `voxel_size_um`: (Z, Y, X) in um, or None (unit-less scale 1).
  """

  def __init__(self, path: str | Path, shape: Sequence[int], dtype: Any, *, kind: str = "image",
               channels: int | None = None, channel_names: Sequence[str] | None = None,
               classes: Sequence[str] | None = None, voxel_size_um: Sequence[float] | None = None,
               name: str | None = None, context: ts.Context | None = None,
               min_level_size: int = MIN_LEVEL_SIZE):
    if kind not in ("labels", "image"):
      raise ValueError(f"kind must be 'labels' or 'image', got {kind!r}")
    self.path, self.kind = Path(path), kind
    self.dtype = np.dtype(dtype)
    self.channels = channels
    self.channel_names = list(channel_names or [])
    self.classes = list(classes or [])
    self.voxel_size_um = tuple(float(v) for v in voxel_size_um) if voxel_size_um else None
    self.name = name or self.path.name
    self.context = context
    self.shapes = level_shapes(shape, min_level_size)
    self.path.mkdir(parents=True, exist_ok=True)
    self.levels = [self._create(0)]
    # The caller's view: channels last, like every other bonejax array.
    self.view = (self.levels[0] if channels is None
                 else self.levels[0][ts.d[0].transpose[3]])

  @property
  def axes(self) -> list[str]:
    return (["c"] if self.channels else []) + ["z", "y", "x"]

  def _full(self, shape3: Sequence[int]) -> list[int]:
    return ([self.channels] if self.channels else []) + list(shape3)

  def _create(self, level: int) -> ts.TensorStore:
    shape = self._full(self.shapes[level])
    chunks = ([1] if self.channels else []) + [max(1, min(CHUNK, s)) for s in self.shapes[level]]
    spec = {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(self.path / str(level))},
        "metadata": {
            "shape": shape, "data_type": self.dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}},
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                       {"name": "zstd", "configuration": {"level": 1}}],
            "fill_value": 0, "dimension_names": self.axes,
        },
        "create": True, "delete_existing": True,
    }
    return ts.open(spec, context=self.context if self.context is not None
                   else store.context()).result()

  def _channels_last(self, arr: ts.TensorStore) -> ts.TensorStore:
    return arr if self.channels is None else arr[ts.d[0].transpose[3]]

  def finish(self, attrs: dict[str, Any] | None = None) -> None:
    """Builds levels 1.. from level 0 (written by the caller) and writes the group metadata."""
    down = downsample_mode if self.kind == "labels" else downsample_mean
    for level in range(1, len(self.shapes)):
      src = self._channels_last(self.levels[level - 1])
      dst_ts = self._create(level)
      dst = self._channels_last(dst_ts)
      plane = math.prod(self.shapes[level - 1][1:]) * (self.channels or 1) * self.dtype.itemsize
      half = max(1, SLAB_BYTES // max(1, 2 * plane))
      depth = self.shapes[level][0]
      pending = None
      for z0 in range(0, depth, half):
        z1 = min(z0 + half, depth)
        data = store.result(src[2 * z0:min(2 * z1, self.shapes[level - 1][0])].read(),
                            self.path / str(level - 1))
        out = down(data)
        if pending is not None:
          pending.result()
        pending = dst[z0:z1].write(out)
      if pending is not None:
        pending.result()
      self.levels.append(dst_ts)
    store.write_group_attrs(self.path, {"ome": self.ome_metadata(), **(attrs or {})})

  def ome_metadata(self) -> dict[str, Any]:
    unit = "micrometer" if self.voxel_size_um else None
    axes = []
    for a in self.axes:
      ax = {"name": a, "type": "channel" if a == "c" else "space"}
      if a != "c" and unit:
        ax["unit"] = unit
      axes.append(ax)
    base = list(self.voxel_size_um) if self.voxel_size_um else [1.0, 1.0, 1.0]
    datasets = []
    factor = [1.0, 1.0, 1.0]
    for level, shape in enumerate(self.shapes):
      if level:  # each level halves every axis longer than 1 (the last block padded)
        factor = [f * (2 if n > 1 else 1) for f, n in zip(factor, self.shapes[level - 1])]
      scale = [b * f for b, f in zip(base, factor)]
      # A level-l voxel centre sits half a coarse voxel in from the corner, not at level 0's.
      shift = [b * (f - 1) / 2 for b, f in zip(base, factor)]
      lead = [1.0] if self.channels else []
      transforms = [{"type": "scale", "scale": lead + scale}]
      if any(shift):
        transforms.append({"type": "translation", "translation": [0.0] * len(lead) + shift})
      datasets.append({"path": str(level), "coordinateTransformations": transforms})
    ome: dict[str, Any] = {
        "version": NGFF_VERSION,
        "multiscales": [{"name": self.name, "axes": axes, "datasets": datasets,
                         "type": "mode" if self.kind == "labels" else "mean"}],
    }
    if self.kind == "labels":
      ome["image-label"] = label_metadata(self.classes)
    elif self.channels and self.channel_names:
      lo, hi = display_range(self.dtype)
      ome["omero"] = {"channels": [
          {"label": n, "color": channel_colour(k), "active": True,
           "window": {"min": lo, "max": hi, "start": lo, "end": hi}}
          for k, n in enumerate(self.channel_names)]}
    return ome


def write_volume(source_: Any, path: str | Path, *, kind: str, overwrite: bool = False,
                 classes: Sequence[str] | None = None, voxel_size_um: Sequence[float] | None = None,
                 attrs: dict[str, Any] | None = None, channel_names: Sequence[str] | None = None,
                 slab: int = 64) -> dict[str, Any]:
  """Writes any (Z, Y, X[, C]) volume (tensorstore, `VolumeSource` or numpy) as OME-Zarr,
  slab by slab, atomically."""
  shape, dtype, read = source.slab_reader(source_)
  channels = shape[3] if len(shape) == 4 else None
  with outputs.atomic_output(path, overwrite) as tmp:
    w = OmeZarrWriter(tmp, shape[:3], dtype, kind=kind, channels=channels, classes=classes,
                      voxel_size_um=voxel_size_um, channel_names=channel_names,
                      name=Path(path).name)
    for z0 in range(0, shape[0], slab):
      w.view[z0:min(z0 + slab, shape[0])].write(
          np.asarray(read(z0, min(z0 + slab, shape[0])), dtype)).result()
    w.finish(attrs)
  return {"output": str(path), "shape": list(shape), "levels": len(w.shapes)}


def read_metadata(path: str | Path) -> dict[str, Any]:
  """The "ome" attributes of an OME-Zarr group (raises errors.UserError when it is not one)."""
  p = Path(path) / "zarr.json"
  try:
    ome = json.loads(p.read_text())["attributes"]["ome"]
  except (OSError, ValueError, KeyError, TypeError):
    raise errors.UserError(f"{str(path)!r} is not an OME-Zarr (0.5) group") from None
  return ome


# ---------------------------------------------------------------------------------------------
# Image and labels in one OME-Zarr.
# ---------------------------------------------------------------------------------------------

LABELS_GROUP = "labels"


def nest_under_image(path: str | Path, image: Any, *, label_name: str = "segmentation",
                     voxel_size_um: Sequence[float] | None = None,
                     attrs: dict[str, Any] | None = None,
                     context: ts.Context | None = None) -> None:
  """Turns the finished labels OME-Zarr at `path` into an image OME-Zarr with those labels at
  `labels/<label_name>` (NGFF's layout, as napari-ome-zarr and MoBIE open it): the label
  multiscale moves down (renames, no copy), then `image` (any (Z, Y, X[, C]) source `write_volume`
  takes, on the labels' grid) is written as the image pyramid at the top. `path` is the caller's
  temporary: the whole appears at once when the caller renames it into place."""
  path = Path(path)
  if not label_name or "/" in label_name or label_name.startswith("."):
    raise ValueError(f"bad label name {label_name!r}")
  label_meta = read_metadata(path)
  shape, dtype, read = source.slab_reader(image)
  levels = label_meta["multiscales"][0]["datasets"]
  label_shape = tuple(store.open_array(path / levels[0]["path"]).shape)
  if tuple(shape[:3]) != label_shape:
    raise errors.UserError(f"image shape {tuple(shape[:3])} != label shape {label_shape}")
  dest = path / LABELS_GROUP / label_name
  dest.mkdir(parents=True)
  for child in list(path.iterdir()):
    if child.name != LABELS_GROUP:
      child.rename(dest / child.name)
  label_attrs = store.read_group_attrs(dest)
  label_attrs["ome"]["image-label"]["source"] = {"image": "../../"}
  store.write_group_attrs(dest, label_attrs)
  store.write_group_attrs(path / LABELS_GROUP, {"ome": {"version": NGFF_VERSION,
                                                        "labels": [label_name]}})
  channels = shape[3] if len(shape) == 4 else None
  # No omero window: an image's intensity range is its own, and viewers then scale to it.
  w = OmeZarrWriter(path, shape[:3], dtype, kind="image", channels=channels,
                    voxel_size_um=voxel_size_um, name=path.name, context=context)
  slab = max(1, SLAB_BYTES // max(1, math.prod(shape[1:]) * np.dtype(dtype).itemsize))
  for z0 in range(0, shape[0], slab):
    z1 = min(z0 + slab, shape[0])
    w.view[z0:z1].write(np.asarray(read(z0, z1), dtype)).result()
  w.finish(attrs)
