"""DLFit's checkpoint metadata (and bonejax's own .safetensors metadata) read into model.json terms.

DLFit's source is not public, so its exact metadata keys are an assumption, read tolerantly:
keys match case-insensitively and ignoring `_`, `-` and spaces, nested dicts are searched too,
and each field has a few common spellings (below). What is read:
- architecture + encoder (e.g. "Unet" / "resnet18"): cross-checked against the weights' keys;
- classes: a count or a list of names;
- input channels, and the 2.5D depth (the number of adjacent slices fed as channels, odd):
  bonejax stores `in_channels` = depth and `context_slices` = (depth - 1) / 2;
- normalisation: "ZScore" -> bonejax `zscore_nonzero` (BONe computes its z-score statistics
  over the voxels > 0, leaving out the zero padding of reconstructed scans); "minMax" ->
  `percentile` (bonejax has no plain min-max rule; its percentile rule is min-max scaling
  between robust percentiles, clipped to [0, 1]; the original name is kept as
  `normalization_source`);
- patch size (an int or [h, w]) and the training axes.
Everything read is also kept verbatim under `source.metadata` in model.json.
"""

from __future__ import annotations

import re
from typing import Any

from bonejax.core import errors
from bonejax.io import intensity

ALIASES = {
    "arch": ("architecture", "arch", "modelarchitecture", "modeltype", "modelname", "smpclass",
             "network", "model"),
    "encoder": ("encoder", "encodername", "backbone", "encoderbackbone"),
    "classes": ("classnames", "classes", "labels", "labelnames", "numclasses", "nclasses",
                "numlabels", "outchannels"),
    "in_channels": ("inchannels", "numchannels", "inputchannels", "channels", "nchannels"),
    "depth": ("slices", "numslices", "nslices", "slicedepth", "depth25d", "25ddepth",
              "stackdepth", "inputdepth", "zdepth", "slabsize", "slab"),
    "context_slices": ("contextslices",),
    "mode": ("mode", "dimension", "dimensionality", "dim", "inputmode"),
    "normalization": ("normalization", "normalisation", "norm", "normtype", "normalizationtype",
                      "intensitynormalization", "scaling"),
    "patch_size": ("patchsize", "tilesize", "patch", "cropsize", "inputsize"),
    "train_axes": ("trainaxes", "axes", "trainingaxes"),
    "bonejax_model": ("bonejaxmodel",),
}
ARCH_NAMES = {"unet": "Unet", "unetplusplus": "UnetPlusPlus", "deeplabv3plus": "DeepLabV3Plus",
              "segformer": "Segformer"}
NORMALIZATION = {"zscore": "zscore_nonzero", "standard": "zscore_nonzero",
                 "standardize": "zscore_nonzero", "standardization": "zscore_nonzero", "percentile": "percentile", "minmax": "percentile",
                 "zscorenonzero": "zscore_nonzero"}


def _norm_key(k: str) -> str:
  return re.sub(r"[\s_\-.]", "", str(k)).lower()


def _flatten(meta: dict[str, Any], out: dict[str, Any] | None = None) -> dict[str, Any]:
  """{normalised key: first value seen}, nested dicts included (outer keys win)."""
  out = {} if out is None else out
  nested = []
  for k, v in meta.items():
    if isinstance(v, dict):
      nested.append(v)
    out.setdefault(_norm_key(k), v)
  for v in nested:
    _flatten(v, out)
  return out


def _get(flat: dict[str, Any], field: str) -> Any:
  for alias in ALIASES[field]:
    v = flat.get(alias)
    if v is not None and not isinstance(v, dict):
      return v
  return None


def _int(v: Any, what: str) -> int:
  try:
    i = int(v)
    if i != float(v):
      raise ValueError
    return i
  except (TypeError, ValueError):
    raise errors.UserError(f"metadata {what}={v!r} is not an integer") from None


def arch_from(flat: dict[str, Any]) -> tuple[str, str] | None:
  """(smp class, encoder) named by the metadata, or None when it names none we know."""
  arch, encoder = _get(flat, "arch"), _get(flat, "encoder")
  if not isinstance(arch, str):
    return None
  key = _norm_key(arch).replace("++", "plusplus").replace("+", "plus")
  smp_class = ARCH_NAMES.get(key)
  if smp_class is None or not isinstance(encoder, str):
    return None
  return smp_class, _norm_key(encoder).replace("mitb", "mit_b")


def interpret(meta: dict[str, Any]) -> dict[str, Any]:
  """The fields above, each only when the metadata has it."""
  flat = _flatten(meta or {})
  out: dict[str, Any] = {}
  if isinstance(_get(flat, "bonejax_model"), str):
    out["bonejax_model"] = _get(flat, "bonejax_model")
  arch = arch_from(flat)
  if arch:
    out["arch"] = arch
  classes = _get(flat, "classes")
  if isinstance(classes, (list, tuple)) and classes and all(isinstance(c, str) for c in classes):
    out["class_names"] = [str(c) for c in classes]
    out["num_classes"] = len(classes)
  elif classes is not None and not isinstance(classes, (list, tuple)):
    out["num_classes"] = _int(classes, "classes")
  if _get(flat, "in_channels") is not None:
    out["in_channels"] = _int(_get(flat, "in_channels"), "in_channels")
  if _get(flat, "context_slices") is not None:
    out["context_slices"] = _int(_get(flat, "context_slices"), "context_slices")
  depth = _get(flat, "depth")
  if depth is not None:
    depth = _int(depth, "2.5D depth")
    if depth < 1 or depth % 2 == 0:
      raise errors.UserError(f"metadata 2.5D depth {depth} must be a positive odd number of slices")
    out.setdefault("context_slices", (depth - 1) // 2)
    out.setdefault("in_channels", depth)
  mode = _get(flat, "mode")
  if "context_slices" not in out and isinstance(mode, str) and "2.5" in mode:
    out["mode_25d"] = True
  norm = _get(flat, "normalization")
  if isinstance(norm, str):
    rule = NORMALIZATION.get(_norm_key(norm))
    if rule is None:
      raise errors.UserError(f"metadata normalisation {norm!r} has no bonejax counterpart (known: "
                          f"ZScore, minMax, {', '.join(intensity.RULES)}); give --normalization")
    out["normalization"] = rule
    if _norm_key(norm) not in {_norm_key(r) for r in intensity.RULES}:
      out["normalization_source"] = norm
  patch = _get(flat, "patch_size")
  if patch is not None:
    sides = patch if isinstance(patch, (list, tuple)) else [patch]
    sides = [_int(s, "patch_size") for s in sides]
    if not sides or min(sides) < 1:
      raise errors.UserError(f"metadata patch_size={patch!r} is not a positive size")
    out["patch_size"] = max(sides)
  axes = _get(flat, "train_axes")
  if isinstance(axes, (list, tuple)) and all(isinstance(a, int) and 0 <= a <= 2 for a in axes):
    out["train_axes"] = [int(a) for a in axes]
  return out
