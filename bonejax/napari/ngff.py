"""OME-Zarr (OME-NGFF 0.4 and 0.5) images and label images as napari layers.

Read from the specification, not through another package: 0.5 keeps its metadata in a zarr v3
group's `zarr.json` under `attributes.ome`, 0.4 in a zarr v2 group's `.zattrs`. An image's
`multiscales` give the resolution levels (napari shows them as one multiscale layer) and the
scale of level 0 with the axes' units; an `image-label` group is a labels layer whose `colors`
and `properties` give the class colours and names; an image's `labels/` group lists its label
images, opened with it. Arrays are read lazily through tensorstore.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from bonejax.core import errors
from bonejax.data import store
from bonejax.napari import layers

_TO_UM = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "angstrom": 1e-4,
          "centimeter": 1e4, "meter": 1e6}
_NAME_KEYS = ("class", "name", "label_name", "class_name", "label-name")


def _attrs(p: Path) -> dict[str, Any]:
  """The OME attributes of a group (0.5: attributes.ome; 0.4: .zattrs), or {}."""
  try:
    if (p / "zarr.json").exists():
      meta = json.loads((p / "zarr.json").read_text())
      attrs = meta.get("attributes", {}) if meta.get("node_type") == "group" else {}
      return dict(attrs.get("ome", attrs))
    if (p / ".zattrs").exists():
      return dict(json.loads((p / ".zattrs").read_text()))
  except (OSError, ValueError, AttributeError):
    return {}
  return {}


def is_ome_zarr(p: Path) -> bool:
  a = _attrs(p)
  return bool(a.get("multiscales")) or bool(a.get("labels"))


def _open(p: Path):
  v3 = (p / "zarr.json").exists()
  spec = {"driver": "zarr3" if v3 else "zarr", "kvstore": {"driver": "file", "path": str(p)}}
  try:
    return ts.open(spec, open=True, read=True, context=store.context()).result()
  except ValueError as e:
    raise errors.UserError(f"cannot open OME-Zarr array {str(p)!r}: {errors.short_message(e)}") \
        from None


def _scale(ms: dict[str, Any], ndim: int) -> list[float]:
  scale = np.ones(ndim)
  for transforms in (ms["datasets"][0].get("coordinateTransformations", []),
                     ms.get("coordinateTransformations", [])):
    for t in transforms or []:
      if t.get("type") == "scale" and len(t.get("scale", [])) == ndim:
        scale = scale * np.asarray(t["scale"], float)
  return scale.tolist()


def _levels(p: Path, a: dict[str, Any]) -> tuple[list, dict[str, Any]]:
  """([level arrays], kwargs: scale, units, channel axis, voxel size) of a multiscale image."""
  ms = a["multiscales"][0]
  arrays = [_open(p / d["path"]) for d in ms["datasets"]]
  data = [layers.volume(arr) for arr in arrays]
  ndim = arrays[0].rank
  axes = ms.get("axes") or [{"name": n, "type": "space"} for n in "zyx"[-ndim:]]
  axes = [{"name": x, "type": "space"} if isinstance(x, str) else x for x in axes]  # 0.3 form
  scale = _scale(ms, ndim)
  kwargs: dict[str, Any] = {}
  channel = [i for i, x in enumerate(axes) if x.get("type") == "channel"]
  space = [i for i, x in enumerate(axes) if x.get("type") == "space"]
  units = [x.get("unit") for x in axes]
  if channel:
    kwargs["channel_axis"] = channel[0]
  kept = [i for i in range(ndim) if i not in channel]
  # Scales in micrometres whatever unit the file uses: napari renders in physical units only
  # when every layer has the same ones (bonejax's are all micrometres).
  kwargs["scale"] = tuple(scale[i] * _TO_UM.get(units[i], 1.0) for i in kept)
  kwargs["units"] = layers.units_for(len(kept))
  um = [scale[i] * _TO_UM[units[i]] for i in space if units[i] in _TO_UM]
  voxel = tuple(um[-3:]) if len(um) == len(space) and len(um) >= 3 else None  # (Z, Y, X)
  if len(data) > 1:
    kwargs["multiscale"] = True
  return (data if len(data) > 1 else data[0]), dict(kwargs, voxel=voxel)


def _classes_and_colours(label: dict[str, Any]) -> tuple[list[str] | None, dict | None]:
  """Class names (index = label value) and napari colours from an image-label's metadata."""
  names: dict[int, str] = {}
  for prop in label.get("properties") or []:
    if "label-value" not in prop:
      continue
    key = next((k for k in _NAME_KEYS if isinstance(prop.get(k), str)), None)
    if key is None:
      key = next((k for k, v in prop.items() if k != "label-value" and isinstance(v, str)), None)
    if key is not None:
      names[int(prop["label-value"])] = prop[key]
  classes = None
  if names:
    classes = [names.get(k, "background" if k == 0 else f"class_{k}")
               for k in range(max(names) + 1)]
  colours = None
  if label.get("colors"):
    colours = {None: layers.OTHER_LABEL}
    for c in label["colors"]:
      if "label-value" in c and "rgba" in c:
        rgba = np.asarray(c["rgba"], float)
        colours[int(c["label-value"])] = (rgba / 255.0 if rgba.max() > 1 else rgba).tolist()
  return classes, colours


def _channels(a: dict[str, Any], n: int) -> list[dict[str, Any]] | None:
  """The omero channels (label, colour, window) when there is one per channel, else None."""
  chans = (a.get("omero") or {}).get("channels") or []
  return chans if len(chans) == n and all(isinstance(c, dict) for c in chans) else None


def _ramp(colour: Any):
  """A black-to-colour ramp from an omero RRGGBB colour (None: napari's default)."""
  try:
    c = str(colour).lstrip("#")
    rgb = [int(c[i:i + 2], 16) / 255 for i in (0, 2, 4)]
  except (ValueError, IndexError):
    return None
  return np.array([[0, 0, 0, 1], rgb + [1]], np.float32)


def _image_layer(p: Path, a: dict[str, Any], name: str) -> tuple:
  data, kw = _levels(p, a)
  voxel = kw.pop("voxel")
  meta = {layers.KEY: {"voxel_size_um": list(voxel) if voxel else None, "intensity": None,
                       "source": str(p)}}
  kw.setdefault("units", layers.units_for(len(kw["scale"])))
  names: Any = name
  axis = kw.get("channel_axis")
  if axis is not None:
    level0 = data[0] if isinstance(data, list) else data
    n = int(level0.shape[axis])
    chans = _channels(a, n)
    floating = np.issubdtype(np.dtype(level0.dtype), np.floating)
    labels = [str(c.get("label") or k) for k, c in enumerate(chans)] if chans else \
        [str(k) for k in range(n)]
    # Probabilities (floats) read "pred p(bone)", maps "unc entropy": named by their channel.
    names = [f"{name} p({lab})" if floating else f"{name} {lab}" for lab in labels]
    kw["blending"] = "additive"
    if chans:
      ramps = [_ramp(c.get("color")) for c in chans]
      if all(r is not None for r in ramps):
        kw["colormap"] = ramps
      windows = [c.get("window") or {} for c in chans]
      if all("start" in w and "end" in w for w in windows):
        kw["contrast_limits"] = [(float(w["start"]), float(w["end"])) for w in windows]
      kw["visible"] = [bool(c.get("active", True)) for c in chans]
  return (data, dict(kw, name=names, metadata=meta), "image")


def _labels_layer(p: Path, a: dict[str, Any], name: str) -> tuple:
  data, kw = _levels(p, a)
  voxel = kw.pop("voxel")
  kw.pop("channel_axis", None)
  classes, colours = _classes_and_colours(a.get("image-label") or {})
  _, kwargs, _ = layers.labels_layer(data, name, classes, voxel_size_um=voxel, source=p)
  kwargs.update(kw)
  if colours:
    kwargs["colormap"] = colours
  return (data, kwargs, "labels")


def _stem(p: Path) -> str:
  name = p.name
  for suffix in (".ome.zarr", ".zarr"):
    if name.endswith(suffix):
      return name[:-len(suffix)]
  return name


def read(p: Path) -> list[tuple]:
  a = _attrs(p)
  out = []
  if a.get("multiscales"):
    if "image-label" in a:
      out.append(_labels_layer(p, a, _stem(p)))
    else:
      out.append(_image_layer(p, a, _stem(p)))
  # An image's label images (or a bare labels/ group).
  group = p if a.get("labels") and not a.get("multiscales") else p / "labels"
  for label in _attrs(group).get("labels") or []:
    lp = group / label
    la = _attrs(lp)
    if la.get("multiscales"):
      out.append(_labels_layer(lp, la, f"{_stem(p)} {label}"))
  if not out:
    raise errors.UserError(f"{str(p)!r} is an OME-Zarr group without images")
  return out
