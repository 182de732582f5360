"""The bone indices of the prediction and the truth, side by side, for the evaluation report.

`evaluate.py --morphometry` runs `bonejax.evaluate.morphometry` (BV/TV, BS/BV, Tb.Th, Tb.Sp,
Tb.N, Conn.D, DA, SMI; Ct.Th and Ct.Ar/Tt.Ar for a cortical class) on both label volumes with
the same classes, region of interest and (Z, Y, X) voxel size, and puts the two tables and
their relative differences into the report as today's measures are. This module only chooses
what to measure and words bad input; the indices are morphometry's.

- Classes: names or indices (`--morphometry_classes=bone` or `1`); default the class the
  measures take as bone (a class named like "bone"). A cortical class (`--cortical_classes`,
  default any class named like "cortical" / "cortex") gets Ct.Th and Ct.Ar/Tt.Ar as well.
- ROI: `auto` (default): `truth` when the classes have a foreground class besides the measured
  ones (bone and pore: the envelope the measures' BV/TV uses), else `all`; `truth`: the
  truth's non-background voxels, the same envelope for both volumes (so TV is the same, and the
  marrow spaces are measured inside the bone, not out into the empty field of view); `all`: the
  whole volume (as BoneJ measures a cropped volume of interest); a box `z0,y0,x0,z1,y1,x1`
  (voxel indices, end exclusive); or a mask volume of the labels' shape.
The volumes are read block by block through their `read_slab` (no whole volume in memory).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bonejax.core import errors
from bonejax.evaluate import measures
from bonejax.io import registry

_CORTICAL_WORDS = ("cortical", "cortex")


@dataclasses.dataclass(frozen=True)
class Request:
  """What to measure: class names or indices (None: the bone class), the cortical classes
  (None: those named like cortical), the ROI ("auto", "all", "truth", a box or a mask path)."""
  classes: tuple[str, ...] | None = None
  cortical: tuple[str, ...] | None = None
  roi: str = "auto"


class SlabArray:
  """A VolumeSource as the numpy-like array morphometry reads: `[z, y, x]` slices read the Z
  range with `read_slab` and crop; `nonzero=True` gives a boolean mask (label != 0)."""

  def __init__(self, src: Any, nonzero: bool = False):
    self.src, self.nonzero = src, nonzero
    self.shape = tuple(src.shape[:3])
    self.dtype = np.dtype(bool) if nonzero else np.dtype(src.dtype)
    self.ndim = 3

  def __getitem__(self, index) -> np.ndarray:
    index = index if isinstance(index, tuple) else (index,)
    index = index + (slice(None),) * (3 - len(index))
    z = index[0]
    if not isinstance(z, slice) or z.step not in (None, 1):
      raise IndexError("SlabArray takes slices with step 1")
    z0, z1, _ = z.indices(self.shape[0])
    store = getattr(self.src, "tensorstore", None)
    if store is not None:  # a zarr array: read only the block (blocks split Y and X too)
      block = np.asarray(store[(slice(z0, z1),) + tuple(index[1:])].read().result())
    else:
      block = self.src.read_slab(z0, z1)[(slice(None),) + tuple(index[1:])]
    return block != 0 if self.nonzero else block


def _class_index(item: str, names: Sequence[str], flag: str) -> int:
  item = str(item).strip()
  if item.lstrip("-").isdigit():
    k = int(item)
    if not 0 <= k < len(names):
      raise errors.UserError(f"{flag}: class index {k} is not among the labels' classes "
                             f"0..{len(names) - 1} {list(names)}")
    return k
  lower = [n.lower() for n in names]
  if item.lower() not in lower:
    raise errors.UserError(f"{flag}: no class named {item!r} among {list(names)}")
  return lower.index(item.lower())


def classes_to_measure(request: Request, names: Sequence[str]) -> tuple[list[int], list[int]]:
  """(trabecular class indices, cortical class indices); class 0 (background) is refused."""
  if request.classes:
    trab = [_class_index(c, names, "--morphometry_classes") for c in request.classes]
  else:
    bone = measures.roles(names).bone
    if bone is None:
      raise errors.UserError(f"--morphometry: no class named like 'bone' among {list(names)}; "
                             f"name the classes to measure with --morphometry_classes")
    trab = [bone]
  if request.cortical:
    cort = [_class_index(c, names, "--cortical_classes") for c in request.cortical]
  else:
    cort = [k for k, n in enumerate(names)
            if k > 0 and any(w in str(n).lower() for w in _CORTICAL_WORDS)]
  for k in trab + cort:
    if k == 0:
      raise errors.UserError(f"--morphometry: class 0 ({names[0]!r}) is the background, not a "
                             f"phase to measure")
  return list(dict.fromkeys(trab)), list(dict.fromkeys(cort))


def auto_roi(names: Sequence[str], measured: Sequence[int]) -> str:
  """`truth` when a foreground class is left besides the measured ones (pore, marrow), else
  `all` (background and bone only: the envelope would be the bone itself)."""
  others = [k for k in range(1, len(names)) if k not in measured]
  return "truth" if others else "all"


def parse_roi(text: str | None, shape: Sequence[int], truth_src: Any) -> tuple[Any, str, Any]:
  """(ROI for morphometry, its description, a source to close or None)."""
  from bonejax.evaluate import morphometry
  text = (text or "all").strip()
  if text in ("all", "none", ""):
    return None, "whole volume", None
  if text == "truth":
    return SlabArray(truth_src, nonzero=True), "truth foreground (label != 0)", None
  parts = [p.strip() for p in text.split(",")]
  if len(parts) == 6 and all(p.lstrip("-").isdigit() for p in parts):
    v = [int(p) for p in parts]
    box = morphometry.Box(tuple(v[:3]), tuple(v[3:]))
    if any(not 0 <= a < b <= n for a, b, n in zip(box.start, box.stop, shape)):
      raise errors.UserError(f"--morphometry_roi={text!r}: box {box.start}..{box.stop} is empty "
                             f"or outside the volume of shape {tuple(shape)}")
    return box, f"box {box.start}..{box.stop}", None
  path = Path(text)
  if not path.exists():
    raise errors.UserError(f"--morphometry_roi={text!r} is not 'auto', 'all', 'truth', a box "
                           f"z0,y0,x0,z1,y1,x1 or an existing mask volume")
  src = registry.open_volume(path, array="labels")
  if tuple(src.shape) != tuple(shape):
    src.close()
    raise errors.UserError(f"--morphometry_roi mask {text!r} has shape {tuple(src.shape)}, "
                           f"the labels {tuple(shape)}")
  return SlabArray(src, nonzero=True), f"mask {text}", src


def _rows(pred: Any, truth: Any) -> dict[str, dict[str, Any]]:
  """ASBMR name -> {pred, truth, rel_diff, unit} (the measures' row shape)."""
  from bonejax.evaluate import morphometry
  rows = {}
  for name, r in morphometry.compare(pred, truth).items():
    rows[name] = {"pred": r["prediction"], "truth": r["truth"],
                  "rel_diff": r["relative_difference"],
                  "unit": morphometry.ASBMR.get(name, (None, ""))[1]}
  return rows


def _measure(fn, what: str, labels: Any, k: int, name: str, **kw):
  try:
    return fn(labels, classes=k, **kw)
  except errors.UserError as e:
    raise errors.UserError(f"--morphometry, {what} class {k} ({name}): {errors.one_line(e)}") \
        from None


def measure_pair(pred_src: Any, truth_src: Any, names: Sequence[str],
                 voxel_size_um: Sequence[float], request: Request | None = None,
                 progress: bool = False) -> dict[str, Any]:
  """{class name: {"kind", "roi", "indices": {ASBMR name: {pred, truth, rel_diff, unit}},
  "prediction", "truth" (every field)}} for each requested class. `progress`: a stderr line
  per volume measured (each can take a minute on a large scan)."""
  from bonejax.core.progress import Progress
  from bonejax.evaluate import morphometry
  request = request or Request()
  voxel = measures.voxel_zyx(voxel_size_um)
  shape = tuple(truth_src.shape[:3])
  trab, cort = classes_to_measure(request, names)
  roi_text = request.roi if request.roi not in ("auto", "", None) else auto_roi(names,
                                                                               trab + cort)
  roi, roi_text, roi_src = parse_roi(roi_text, shape, truth_src)
  pred, truth = SlabArray(pred_src), SlabArray(truth_src)
  out: dict[str, Any] = {}
  bar = Progress(total=2 * (len(trab) + len(cort)), desc="morphometry", unit="volumes",
                 every_s=0.0) if progress else None
  try:
    for kind, ks, fn in (("trabecular", trab, morphometry.measure),
                         ("cortical", cort, morphometry.cortical)):
      for k in ks:
        kw = dict(voxel_size_um=voxel, roi=roi)
        mp = _measure(fn, "prediction", pred, k, names[k], **kw)
        if bar is not None:
          bar.update(1, f"prediction {names[k]} ({kind})")
        mt = _measure(fn, "truth", truth, k, names[k], **kw)
        if bar is not None:
          bar.update(1, f"truth {names[k]} ({kind})")
        key = names[k] if kind == "trabecular" else f"{names[k]} (cortical)"
        out[key] = {"class": k, "kind": kind, "roi": roi_text,
                    "indices": _rows(mp, mt), "prediction": mp.as_dict(),
                    "truth": mt.as_dict()}
  finally:
    if roi_src is not None:
      roi_src.close()
  if bar is not None:
    bar.close()
  return out


def fmt_value(v: Any, unit: str) -> str:
  """A morphometry value for tables: lengths in um, fractions plain, NaN as n/a."""
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "n/a"
  return format(v, ".4g")


def label(name: str, unit: str) -> str:
  return f"{name} ({unit})" if unit and unit != "1" else name


def markdown(morph: dict[str, Any]) -> list[str]:
  lines: list[str] = []
  for key, m in morph.items():
    lines += [f"### {key}, {m['roi']}", "",
              "| index | prediction | truth | relative difference |", "|---|---:|---:|---:|"]
    for name, r in m["indices"].items():
      rel = "n/a" if r["rel_diff"] is None else f"{r['rel_diff'] * 100:+.1f} %"
      lines.append(f"| {label(name, r['unit'])} | {fmt_value(r['pred'], r['unit'])} | "
                   f"{fmt_value(r['truth'], r['unit'])} | {rel} |")
    lines.append("")
  return lines


def parse_names(text: str | None) -> tuple[str, ...] | None:
  if not text:
    return None
  items = tuple(t.strip() for t in text.split(",") if t.strip())
  return items or None


def request_from_flags(classes: str | None, cortical: str | None,
                       roi: str | os.PathLike | None) -> Request:
  return Request(classes=parse_names(classes), cortical=parse_names(cortical),
                 roi=str(roi) if roi else "auto")
