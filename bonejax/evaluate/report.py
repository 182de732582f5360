"""An evaluation report: scores and bone measures of a prediction against the truth.

`evaluate(...)` opens the two label volumes (any input `registry.open_volume` reads: a zarr v3
array, a scan directory's labels, a TIFF, a .npy), streams them once for the confusion matrix
and the per-slice IoU profiles, measures both (bonejax.evaluate.measures), and returns an `Evaluation`.
`write(...)` turns it into REPORT.json, REPORT.md and, optionally, PNG pictures: a per-slice
foreground IoU profile along each axis and overlays of chosen Z slices. With `middle_planes`
the evaluation also keeps the middle slice across each of the three axes (image, truth,
prediction and, when given, the uncertainty map) for the HTML report (`html_report`).

Voxel sizes are (Z, Y, X) micrometres, never collapsed: volumes use Z * Y * X, the report keeps
`voxel_size_zyx_um` beside the contract's one-number `voxel_size_um` (X's size) and says where
the size came from (`voxel_size_source`: given, metadata, or assumed at import, then warned).
`morphometry` adds the bone indices of both volumes side by side (`morph_report`). A warning
also says when the truth scan was one of the model's training scans (its model.json lists them).

`border_band` (default 2 voxels) adds IoU in the volume's outer band against the interior
(`border.section`, from the same slabs as the confusion matrix).

Sparse truth (`unlabelled`: the dataset.json's value when the truth is a dataset's scan, else
the caller's, e.g. 255): unlabelled truth voxels count nowhere. Scores, the per-slice profile
and the border band are over the labelled voxels; the report gives `unlabelled_voxels`. The
bone measures are then counted over the labelled voxels in both volumes (the prediction where
the truth is labelled: the same voxels on both sides, else BV/TV of a half-painted truth would
be compared with the whole prediction's); those needing whole neighbourhoods (implant surface,
BIC, DR, the shell ROI's BV/TV) are left out, and --morphometry is refused: thickness,
spacing, connectivity and surfaces are not defined on a truth with holes in it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import bonejax
from bonejax.core import errors, outputs
from bonejax.data import store
from bonejax.evaluate import border, measures, metrics, morph_report, provenance
from bonejax.io import colours, registry, source

UNKNOWN_CLASSES_MAX = 256  # labels are uint8 on disk


# ---------------------------------------------------------------------------------------------
# Inputs.
# ---------------------------------------------------------------------------------------------


def _dataset_of(truth: str | os.PathLike):
  scan = provenance.scan_dir_of(Path(truth))
  if scan is not None and (scan.parent / store.DATASET_JSON).exists():
    return store.open_dataset(scan.parent)
  return None


def dataset_classes(truth: str | os.PathLike) -> list[str] | None:
  """Class names of the dataset the truth scan lives in (None if it is not in one)."""
  ds = _dataset_of(truth)
  return ds.classes if ds is not None else None


def resolve_unlabelled(truth: str | os.PathLike, unlabelled: int | None,
                       classes: Sequence[str] | None) -> int | None:
  """The truth's unlabelled value: its dataset.json's, else `unlabelled` (--unlabelled for a
  bare truth file); both given must agree. None: a dense truth."""
  ds = _dataset_of(truth)
  known = ds.unlabelled if ds is not None else None
  if unlabelled is not None and known is not None and int(unlabelled) != known:
    raise errors.UserError(f"--unlabelled={unlabelled} disagrees with the truth's dataset "
                           f"(unlabelled {known})")
  value = known if unlabelled is None else unlabelled
  return store.check_unlabelled(value, list(classes or ()), "--unlabelled" if known is None
                                else "the truth's dataset.json")


def resolve_classes(truth: str | os.PathLike, classes: Sequence[str] | None,
                    num_classes: int | None) -> list[str] | None:
  """Class names from --classes, --num_classes and the dataset; None: infer from the labels."""
  ds = dataset_classes(truth)
  if classes is not None and len(classes) < 2:
    raise errors.UserError(f"--classes needs at least 2 names, got {list(classes)}")
  if num_classes is not None and num_classes < 2:
    raise errors.UserError(f"--num_classes={num_classes} must be >= 2")
  if ds is not None:
    if num_classes is not None and num_classes != len(ds):
      raise errors.UserError(f"--num_classes={num_classes} disagrees with the dataset's "
                          f"{len(ds)} classes {ds}")
    if classes is not None and len(classes) != len(ds):
      raise errors.UserError(f"--classes has {len(classes)} names but the dataset has "
                          f"{len(ds)} classes {ds}")
  if classes is not None:
    if num_classes is not None and num_classes != len(classes):
      raise errors.UserError(f"--num_classes={num_classes} disagrees with --classes "
                          f"({len(classes)} names)")
    return [str(c) for c in classes]
  if ds is not None:
    return ds
  if num_classes is not None:
    return metrics.class_names_for(num_classes)
  return None


def open_labels(path: str | os.PathLike, what: str) -> source.VolumeSource:
  p = errors.require_exists(path, what)
  if store.is_scan(p) and not (p / "labels" / "zarr.json").exists():
    raise errors.UserError(f"{what} scan {str(p)!r} has no labels")
  scan = provenance.scan_dir_of(p)
  if scan is not None:
    store.warn_missing_chunks(scan)
  src = registry.open_volume(p, array="labels")
  if 0 in src.shape:
    raise errors.UserError(f"{what} {str(path)!r} is empty (shape {src.shape})")
  return src


# ---------------------------------------------------------------------------------------------
# Per-slice profiles (streamed with the confusion matrix).
# ---------------------------------------------------------------------------------------------


class SliceProfile:
  """Per class and per slice index along Z, Y and X: intersection and union voxel counts."""

  def __init__(self, shape: Sequence[int], num_classes: int):
    self.shape = tuple(shape)
    self.inter = [np.zeros((n, num_classes), np.int64) for n in shape]
    self.union = [np.zeros((n, num_classes), np.int64) for n in shape]

  def update(self, z0: int, pred: np.ndarray, truth: np.ndarray, cm: np.ndarray,
             ignore: int | None = None) -> None:
    """Adds one Z slab; `cm` is its confusion matrix (it says which classes occur); truth
    voxels equal to `ignore` (unlabelled) count for no class."""
    z1 = z0 + truth.shape[0]
    keep = truth != ignore if ignore is not None else None
    # Only classes present in this slab: a loop over all 256 possible labels would crawl.
    for k in np.flatnonzero(cm.sum(axis=0) + cm.sum(axis=1)).tolist():
      t, p = truth == k, pred == k
      if keep is not None:
        p &= keep
      inter, union = t & p, t | p
      for axis, others in ((0, (1, 2)), (1, (0, 2)), (2, (0, 1))):
        rows = slice(z0, z1) if axis == 0 else slice(None)
        self.inter[axis][rows, k] += inter.sum(axis=others)
        self.union[axis][rows, k] += union.sum(axis=others)

  def foreground_iou(self, num_classes: int) -> list[np.ndarray]:
    """Mean IoU over classes 1.. with a non-empty union, per slice index (NaN: none)."""
    out = []
    for inter, union in zip(self.inter, self.union):
      inter, union = inter[:, 1:num_classes], union[:, 1:num_classes]
      iou = np.full(inter.shape, np.nan)
      np.divide(inter, union, out=iou, where=union > 0)
      defined = union > 0
      with np.errstate(invalid="ignore"):
        out.append(np.where(defined.any(axis=1), np.nansum(iou, axis=1) /
                            np.maximum(defined.sum(axis=1), 1), np.nan))
    return out


# ---------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Evaluation:
  result: dict[str, Any]                      # the JSON report
  profiles: list[np.ndarray] | None = None    # foreground IoU per slice along Z, Y, X
  overlays: dict[int, tuple] = dataclasses.field(default_factory=dict)  # z -> (img, truth, pred)
  pictures: bool = False                      # write() draws the PNGs
  # axis -> {"index", "image", "truth", "pred", "uncertainty"}: the middle slice across it
  middles: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)


class _Middles:
  """Collects the middle plane across each axis from Z slabs (Y and X planes piece by piece)."""

  def __init__(self, shape: Sequence[int]):
    self.shape = tuple(shape)
    self.index = [s // 2 for s in shape]
    self.planes: dict[int, dict[str, Any]] = {a: {"index": self.index[a]} for a in range(3)}

  def add(self, name: str, z0: int, slab: np.ndarray) -> None:
    z1 = z0 + slab.shape[0]
    mz, my, mx = self.index
    if z0 <= mz < z1:
      self.planes[0][name] = np.array(slab[mz - z0])
    for axis, part in ((1, slab[:, my]), (2, slab[:, :, mx])):
      if name not in self.planes[axis]:
        self.planes[axis][name] = np.zeros((self.shape[0],) + part.shape[1:], part.dtype)
      self.planes[axis][name][z0:z1] = part


def default_overlay_slices(depth: int) -> list[int]:
  return sorted({min(depth - 1, max(0, round(depth * f))) for f in (0.25, 0.5, 0.75)})


def evaluate(pred: str | os.PathLike, truth: str | os.PathLike, *,
             classes: Sequence[str] | None = None, num_classes: int | None = None,
             options: measures.Options | None = None,
             voxel_size_um: float | Sequence[float] | str | None = None,
             image: str | os.PathLike | None = None, pictures: bool = False,
             overlay_slices: Sequence[int] | None = None, slab: int = 64,
             progress: bool = True, middle_planes: bool = False,
             uncertainty: str | os.PathLike | None = None,
             morphometry: "morph_report.Request | bool | None" = None,
             border_band: int | None = border.BAND,
             unlabelled: int | None = None) -> Evaluation:
  """Scores and measures of `pred` against `truth` (paths). Raises errors.UserError on bad input.

  `voxel_size_um`: one number or (Z, Y, X) micrometres (or `"Z,Y,X"`); default the truth
  scan's, else the prediction's, else what the files record; never collapsed to one number.

  `middle_planes` keeps the middle slice across each axis for the HTML report (with the
  per-slice profile), including the uncertainty map `uncertainty` (predict.py
  --save_uncertainty) when given. `morphometry` (a `morph_report.Request`, or True for the
  defaults) adds the bone indices of both volumes side by side (`result["morphometry"]`).
  `border_band`: IoU in the outer band of this many voxels against the interior
  (`result["border_band"]`; 0 or None: not computed). `unlabelled`: the truth's unlabelled
  value for a truth outside a dataset (a dataset's scan brings its own; see the module's
  docstring for what is then counted).
  """
  start = time.perf_counter()
  options = options or measures.Options()
  options.validate()
  names = resolve_classes(truth, classes, num_classes)
  if morphometry is True:
    morphometry = morph_report.Request()
  if morphometry and names is not None:  # bad classes before any work
    morph_report.classes_to_measure(morphometry, names)
  unlabelled = resolve_unlabelled(truth, unlabelled, names)
  band = border.check_band(border_band) if border_band else None
  truth_src = open_labels(truth, "truth")
  pred_src = open_labels(pred, "prediction")
  if pred_src.shape != truth_src.shape:
    raise errors.UserError(f"prediction shape {pred_src.shape} != truth shape {truth_src.shape}")
  shape = truth_src.shape
  if voxel_size_um is not None:
    voxel, voxel_source = provenance.parse_voxel_size(voxel_size_um, "voxel size"), "given"
  else:
    # The truth scan's stored size first (import recorded where it came from), then the
    # prediction's attributes, then what the files themselves say (TIFF, OME-Zarr, ...).
    attrs = provenance.voxel_attrs(truth, pred)
    voxel = provenance.voxel_size_of(truth, pred)
    voxel_source = provenance.voxel_source(attrs)
    if voxel is None:
      voxel = truth_src.voxel_size_um or pred_src.voxel_size_um
      voxel_source = "metadata"
    if voxel is None:
      voxel_source = "assumed"
  voxel_known = voxel is not None
  voxel = tuple(voxel) if voxel_known else (1.0, 1.0, 1.0)

  image_src = unc_src = None
  slices: list[int] = []
  if pictures:
    slices = sorted(set(overlay_slices)) if overlay_slices else default_overlay_slices(shape[0])
    bad = [z for z in slices if not 0 <= z < shape[0]]
    if bad:
      raise errors.UserError(f"overlay slices {bad} are outside 0..{shape[0] - 1}")
  middles = _Middles(shape) if middle_planes else None
  if uncertainty is not None and middles is not None:
    from bonejax.evaluate import uncertainty as uncertainty_lib
    unc_src = uncertainty_lib.open_maps(errors.require_exists(uncertainty, "uncertainty map"))
    if unc_src.shape[:3] != shape:
      raise errors.UserError(f"uncertainty map shape {unc_src.shape[:3]} != label shape {shape}")
  if pictures or middle_planes:
    image_path = image if image is not None else (
        truth if provenance.scan_dir_of(Path(truth)) else None)
    if image_path is not None:
      scan = provenance.scan_dir_of(Path(image_path))
      image_src = registry.open_volume(errors.require_exists(scan or image_path, "image"))
      if image_src.shape != shape:
        raise errors.UserError(f"image shape {image_src.shape} != label shape {shape}")

  c = len(names) if names is not None else UNKNOWN_CLASSES_MAX
  profile = SliceProfile(shape, c) if pictures or middle_planes else None
  bands = border.BandCounter(shape, c, band, unlabelled) if band else None
  planes: dict[int, list] = {}

  def on_slab(z0, p, t, slab_cm):
    if profile is not None:
      profile.update(z0, p, t, slab_cm, unlabelled)
    if bands is not None:
      bands.update(z0, p, t)
    for z in slices:
      if z0 <= z < z0 + t.shape[0]:
        planes[z] = [None, t[z - z0].copy(), p[z - z0].copy()]
    if middles is not None:
      z1 = z0 + t.shape[0]
      middles.add("truth", z0, t)
      middles.add("pred", z0, p)
      if image_src is not None:
        middles.add("image", z0, image_src.read_slab(z0, z1))
      if unc_src is not None:
        middles.add("uncertainty", z0, unc_src.read_slab(z0, z1)[..., 0])

  cm = metrics.streamed_confusion(pred_src, truth_src, c, slab=slab, progress=progress,
                                  on_slab=on_slab, ignore=unlabelled)
  if names is None:  # max label + 1 across both volumes
    used = np.flatnonzero(cm.sum(axis=0) + cm.sum(axis=1))
    c = max(2, int(used.max()) + 1 if used.size else 1)
    cm = cm[:c, :c]
    names = metrics.class_names_for(c)
    store.check_unlabelled(unlabelled, names, "--unlabelled")  # a predicted label 255?
  s = metrics.scores(cm, names)
  n_unlabelled = int(np.prod(shape)) - s["voxels"]

  if n_unlabelled:
    if morphometry:
      raise errors.UserError(
          f"--morphometry needs a fully labelled truth: {str(truth)!r} has {n_unlabelled:,} "
          f"unlabelled voxels (value {unlabelled}); thickness, spacing, connectivity and "
          "surfaces are not defined on a truth with holes")
    # Over the labelled voxels, both sides: the confusion matrix's columns and rows.
    m_pred = measures.count_measures(np.asarray(cm).sum(axis=0), names, voxel)
    m_truth = measures.count_measures(np.asarray(cm).sum(axis=1), names, voxel)
  else:
    m_pred = measures.measure(pred_src, names, voxel, options, slab=slab, progress=progress)
    m_truth = measures.measure(truth_src, names, voxel, options, slab=slab, progress=progress)
  morph = (morph_report.measure_pair(pred_src, truth_src, names, voxel, morphometry,
                                     progress=progress) if morphometry else None)
  for z in slices:
    if image_src is not None:
      planes[z][0] = image_src.read_slab(z, z + 1)[0]
  result = {
      "pred": str(pred), "truth": str(truth),
      "shape": list(shape), "voxels": s["voxels"],
      "unlabelled_value": unlabelled, "unlabelled_voxels": n_unlabelled,
      "prediction_info": provenance.prediction_info(pred),
      # The contract's one number (X's size, as scans store it) and the full (Z, Y, X).
      "voxel_size_um": voxel[2] if voxel_known else None,
      "voxel_size_zyx_um": list(voxel) if voxel_known else None,
      "voxel_size_source": voxel_source,
      "classes": names, "num_classes": len(names),
      "iou": metrics.by_class(s["iou"], names),
      "dice": metrics.by_class(s["dice"], names),
      "precision": metrics.by_class(s["precision"], names),
      "recall": metrics.by_class(s["recall"], names),
      "miou_all": s["miou_all"], "miou_fg": s["miou_fg"],
      "mdice_all": s["mdice_all"], "mdice_fg": s["mdice_fg"],
      "accuracy": s["accuracy"],
      "truth_voxels": metrics.by_class(s["truth_voxels"], names),
      "pred_voxels": metrics.by_class(s["pred_voxels"], names),
      "confusion": s["confusion"],
      "measures": measures.compare(m_pred, m_truth),
      "measure_options": {k: v for k, v in dataclasses.asdict(options).items() if v is not None},
      **({"morphometry": morph} if morph is not None else {}),
      **({"border_band": border.section(bands.border, bands.inner, names, band)}
         if bands is not None else {}),
      "seconds": round(time.perf_counter() - start, 3),
  }
  warnings = []
  if not voxel_known and (result["measures"] or morph):
    warnings.append("voxel size unknown: volumes assume 1 um voxels (pass --voxel_size_um)")
  elif voxel_source == "assumed":
    warnings.append("the voxel size was assumed at import (no metadata): volumes are in "
                    "assumed micrometres (pass --voxel_size_um)")
  if n_unlabelled:
    warnings.append(f"the truth has {n_unlabelled:,} unlabelled voxels (value {unlabelled}): "
                    f"scores and measures count its {s['voxels']:,} labelled voxels only"
                    + ("; implant surface, BIC, DR and shell BV/TV need every voxel labelled "
                       "and are left out" if measures.roles(names).implant else ""))
  trained = provenance.training_scan_warning(pred, truth)
  if trained:
    warnings.append(trained)
  if warnings:
    result["warning"] = "; ".join(warnings)
    result["warnings"] = warnings
  if unc_src is not None:
    unc_src.close()
  return Evaluation(result, profile.foreground_iou(len(names)) if profile else None,
                    {z: tuple(v) for z, v in planes.items()}, pictures=pictures,
                    middles=middles.planes if middles is not None else {})


# ---------------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------------


def _num(v: Any, fmt: str = ".4f") -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "n/a"
  return format(v, fmt)


def _pct(v: Any) -> str:
  return "n/a" if v is None else f"{v * 100:+.1f} %"


def markdown(result: dict[str, Any], pictures: Sequence[str] = ()) -> str:
  names = result["classes"]
  lines = ["# Segmentation evaluation", "",
           f"- prediction: `{result['pred']}`", f"- truth: `{result['truth']}`"]
  if result.get("prediction_info"):
    lines.append(f"- made by: {provenance.prediction_text(result['prediction_info'])}")
  shape_line = f"- shape (Z, Y, X): {tuple(result['shape'])}, {result['voxels']:,} voxels"
  if result.get("unlabelled_voxels"):
    shape_line += (f" labelled, {result['unlabelled_voxels']:,} unlabelled (value "
                   f"{result['unlabelled_value']}, not scored)")
  lines += [shape_line, f"- voxel size: {provenance.voxel_text(result)}"]
  lines += [f"- **warning**: {w}" for w in result.get("warnings") or []]
  lines += ["", "## Per class", "",
           "| class | IoU | Dice | precision | recall | truth voxels | predicted voxels |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for i, n in enumerate(names):
    lines.append(f"| {i} {n} | {_num(result['iou'][n])} | {_num(result['dice'][n])} | "
                 f"{_num(result['precision'][n])} | {_num(result['recall'][n])} | "
                 f"{result['truth_voxels'][n]:,} | {result['pred_voxels'][n]:,} |")
  lines += ["", "| mean | IoU | Dice |", "|---|---:|---:|",
            f"| all classes | {_num(result['miou_all'])} | {_num(result['mdice_all'])} |",
            f"| foreground (classes > 0) | {_num(result['miou_fg'])} | "
            f"{_num(result['mdice_fg'])} |", "",
            f"Voxel accuracy {_num(result['accuracy'])}. A class absent from both truth and "
            "prediction has no IoU (n/a) and is left out of the means.", ""]
  if result.get("border_band"):
    lines += border.markdown_lines(result["border_band"], _num)
  if result["measures"]:
    lines += ["## Bone measures", "", "| measure | prediction | truth | relative difference |",
              "|---|---:|---:|---:|"]
    for k, v in result["measures"].items():
      lines.append(f"| {k} | {_num(v['pred'], '.4g')} | {_num(v['truth'], '.4g')} | "
                   f"{_pct(v['rel_diff'])} |")
    lines += ["", "Fractions (bv_tv, porosity, bic) are in [0, 1]; relative difference = "
              "(prediction - truth) / truth.", ""]
  if result.get("morphometry"):
    lines += ["## Bone morphometry", "",
              "ASBMR indices (Bouxsein et al. 2010) in micrometres on the (Z, Y, X) voxel size; "
              "relative difference = (prediction - truth) / truth.", ""]
    lines += morph_report.markdown(result["morphometry"])
  lines += ["## Confusion matrix (rows: truth, columns: prediction)", "",
            "| truth \\ pred | " + " | ".join(names) + " |",
            "|---|" + "---:|" * len(names)]
  for n, row in zip(names, result["confusion"]):
    lines.append(f"| {n} | " + " | ".join(f"{v:,}" for v in row) + " |")
  if pictures:
    lines += ["", "## Pictures", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in pictures]
  return "\n".join(lines) + "\n"


def picture_paths(out: str | os.PathLike, overlay_slices: Sequence[int]) -> list[Path]:
  out = Path(out)
  return ([out.with_name(f"{out.stem}_iou_profile.png")] +
          [out.with_name(f"{out.stem}_overlay_z{z:05d}.png") for z in overlay_slices])


def _save(fig, path: Path) -> None:
  tmp = outputs.temporary_name(path)
  try:
    # The Software tag marks the picture as bonejax's: --overwrite may replace it.
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight",
                metadata={"Software": f"bonejax {bonejax.__version__}"})
    os.replace(tmp, path)
  except BaseException:
    outputs.remove_path(tmp)
    raise


def draw_profile(ax, profiles: Sequence[np.ndarray]) -> None:
  """The per-slice foreground IoU along Z, Y and X on matplotlib axes (this report's PNG and
  the HTML report's inline picture)."""
  for name, prof in zip("ZYX", profiles):
    ax.plot(np.arange(len(prof)), prof, label=f"along {name}", lw=1.2)
  ax.set_xlabel("slice index")
  ax.set_ylabel("foreground mean IoU")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right")


def plot_profile(profiles: Sequence[np.ndarray], path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 3.5))
  draw_profile(ax, profiles)
  ax.set_title("Per-slice foreground IoU")
  _save(fig, path)
  plt.close(fig)


def plot_overlay(z: int, image: np.ndarray | None, truth: np.ndarray, pred: np.ndarray,
                 names: Sequence[str], path: Path, aspect: float = 1.0) -> None:
  """Image, truth and prediction of Z slice `z`; `aspect`: Y size / X size of a voxel."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.colors import ListedColormap
  from matplotlib.patches import Patch
  c = len(names)
  cmap = ListedColormap([colours.colour(k) for k in range(c)])
  fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
  grey = None
  if image is not None:
    img = np.asarray(image, np.float32)
    lo, hi = np.percentile(img, (0.5, 99.5))
    grey = np.clip((img - lo) / max(hi - lo, 1e-12), 0, 1)
  for ax, title, lab in zip(axes, ("image", "truth", "prediction"), (None, truth, pred)):
    if grey is not None:
      ax.imshow(grey, cmap="gray", interpolation="nearest", aspect=aspect)
    if lab is not None:
      # Over the image, background stays see-through; without an image, it is drawn black.
      shown = np.ma.masked_equal(lab, 0) if grey is not None else lab
      shown = np.ma.masked_where(lab >= c, shown)  # a sparse truth's unlabelled voxels
      ax.imshow(shown, cmap=cmap, vmin=-0.5, vmax=c - 0.5, interpolation="nearest",
                alpha=0.5 if grey is not None else 1.0, aspect=aspect)
    elif grey is None:
      ax.text(0.5, 0.5, "no image", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"{title}, z = {z}")
    ax.set_axis_off()
  fig.legend(handles=[Patch(color=colours.colour(k), label=f"{k} {n}") for k, n in enumerate(names)],
             loc="lower center", ncol=min(c, 6), frameon=False)
  fig.subplots_adjust(bottom=0.12)
  _save(fig, path)
  plt.close(fig)


def write(ev: Evaluation, out: str | os.PathLike) -> dict[str, Any]:
  """Writes pictures, OUT.md, then OUT.json (last, so its presence means a full report)."""
  out = Path(out)
  outputs.make_parents(out)
  md = out.with_suffix(".md")
  pictures: list[Path] = []
  if ev.profiles is not None and ev.pictures:
    pictures = picture_paths(out, sorted(ev.overlays))
    plot_profile(ev.profiles, pictures[0])
    for z, p in zip(sorted(ev.overlays), pictures[1:]):
      v = ev.result.get("voxel_size_zyx_um")
      plot_overlay(z, *ev.overlays[z], ev.result["classes"], p,
                   aspect=v[1] / v[2] if v else 1.0)
  result = dict(ev.result, out=str(out), report_md=str(md),
                pictures=[str(p) for p in pictures], bonejax_version=bonejax.__version__)
  outputs.atomic_write_text(md, markdown(result, [str(p) for p in pictures]))
  outputs.atomic_write_json(out, result)
  return result
