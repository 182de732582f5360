"""Where the volumes of an evaluation come from: their voxel size and how it was known, the
model that made the prediction, and whether the truth scan was one it trained on.

Voxel sizes are (Z, Y, X) micrometres, never collapsed to one number: a scan stores
`voxel_size_zyx_um` (beside the contract's one-number `voxel_size_um`, X's size) and
`voxel_size_source` (given / metadata / assumed, as import recorded it); `--voxel_size_um` takes
one number or `Z,Y,X`. predict.py records the model, planes and vote in its outputs' attributes,
and the bundle's model.json lists its training scans.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bonejax.core import errors
from bonejax.data import store
from bonejax.evaluate import measures


def zarr_attrs(path: Path) -> dict[str, Any]:
  try:
    return dict(json.loads((path / "zarr.json").read_text()).get("attributes", {}))
  except (OSError, ValueError):
    return {}


def scan_dir_of(path: Path) -> Path | None:
  """The scan a labels path belongs to: the scan dir itself or SCAN/labels."""
  if store.is_scan(path):
    return path
  if path.name == "labels" and store.is_scan(path.parent):
    return path.parent
  return None


def voxel_attrs(*paths: str | os.PathLike | None) -> dict[str, Any] | None:
  """The attributes that give a voxel size: of the first scan, or array with one, in `paths`."""
  for p in paths:
    if p is None:
      continue
    p = Path(p)
    for d in (scan_dir_of(p), p if p.is_dir() else None):
      if d is not None:
        attrs = zarr_attrs(d)
        if attrs.get("voxel_size_zyx_um") is not None or attrs.get("voxel_size_um") is not None:
          return attrs
  return None


def voxel_size_of(*paths: str | os.PathLike | None) -> tuple[float, float, float] | None:
  """(Z, Y, X) micrometres from the first scan (or array with a voxel size) among `paths`."""
  attrs = voxel_attrs(*paths)
  if attrs is None:
    return None
  try:
    return measures.voxel_zyx(attrs.get("voxel_size_zyx_um", attrs.get("voxel_size_um")))
  except errors.UserError:
    return None


def parse_voxel_size(value: Any, what: str = "--voxel_size_um") -> tuple[float, float, float]:
  """One number or `Z,Y,X` (text or a sequence) as (Z, Y, X) micrometres; zero, negative, NaN
  or another count of numbers is a UserError naming `what`."""
  v = value
  if isinstance(v, str):
    parts = [x.strip() for x in v.split(",")]
    try:
      v = [float(x) for x in parts]
    except ValueError:
      raise errors.UserError(f"{what}={value!r} is not one number or Z,Y,X") from None
    v = v[0] if len(v) == 1 else v
  try:
    return measures.voxel_zyx(v)
  except errors.UserError:
    raise errors.UserError(f"{what}={value!r} must be one or three (Z,Y,X) positive finite "
                           f"numbers of micrometres") from None


def voxel_source(attrs: dict[str, Any] | None) -> str:
  """How a stored voxel size was known (import records it: given / metadata / assumed)."""
  return str((attrs or {}).get("voxel_size_source") or "metadata")


PREDICTION_KEYS = ("model", "architecture", "planes", "plane_sets", "vote",
                   "predicted_at_voxel_size_um")


def prediction_info(pred: str | os.PathLike) -> dict[str, Any]:
  """What predict.py recorded about how the prediction was made (model, planes, vote, ...)."""
  p = Path(pred)
  attrs = zarr_attrs(p) if p.is_dir() else {}
  return {k: attrs[k] for k in PREDICTION_KEYS if attrs.get(k) is not None}


def training_scan_warning(pred: str | os.PathLike,
                          truth: str | os.PathLike) -> str | None:
  """A warning when the truth scan was one of the model's training scans: the prediction's
  attributes name its bundle (`model`), whose model.json lists `train_scans`. A scan of the same
  name in another dataset than the one the workdir's config.json trained on is not one."""
  scan = scan_dir_of(Path(truth))
  p = Path(pred)
  if scan is None or not p.is_dir():
    return None
  model = zarr_attrs(p).get("model")
  if not isinstance(model, str) or not model:
    return None
  bundle = Path(model)
  if not (bundle / "model.json").exists() and (bundle / "model" / "model.json").exists():
    bundle = bundle / "model"
  try:
    meta = json.loads((bundle / "model.json").read_text())
  except (OSError, ValueError):
    return None
  if scan.name not in [str(s) for s in meta.get("train_scans") or []]:
    return None
  try:
    dataset = json.loads((bundle.parent / "config.json").read_text()).get("dataset")
  except (OSError, ValueError, AttributeError):
    dataset = None
  if dataset and Path(dataset).resolve() != scan.parent.resolve():
    return None
  return (f"the truth scan {scan.name!r} was one of the model's training scans ({bundle}): "
          f"these scores do not measure generalisation")


def prediction_text(info: dict[str, Any]) -> str:
  """'unet_resnet18 (MODEL), 3 planes, soft vote' from `prediction_info`."""
  parts = []
  if info.get("architecture") or info.get("model"):
    arch, model = info.get("architecture"), info.get("model")
    parts.append(f"{arch} ({model})" if arch and model else str(arch or model))
  if info.get("planes") is not None:
    parts.append(f"{info['planes']} plane{'s' if info['planes'] != 1 else ''}"
                 + (f" ({', '.join(info['plane_sets'])})" if info.get("plane_sets") else ""))
  if info.get("vote"):
    parts.append(f"{info['vote']} vote")
  return ", ".join(parts)


def voxel_text(result: dict[str, Any]) -> str:
  """'8 x 6.24 x 6.24 um (Z, Y, X)' or '6.24 um', with how it was known when not metadata."""
  v = result.get("voxel_size_zyx_um")
  if not v:
    return "unknown (1 um assumed)"
  text = (f"{v[0]:g} um" if max(v) - min(v) <= 1e-9 * max(v)
          else " x ".join(f"{x:g}" for x in v) + " um (Z, Y, X)")
  src = result.get("voxel_size_source")
  return text + {"assumed": " (assumed: no metadata)", "given": " (given)"}.get(src, "")
