r"""Scores a predicted segmentation against the truth and measures bone in both.

  python launch/evaluate.py --pred=/tmp/pred.zarr --truth=DATA/scan_003 --out=/tmp/report.json \
      --pictures

  python launch/evaluate.py --pred=/tmp/pred.ome.zarr --truth=DATA/scan_003 \
      --out=/tmp/report.json --html=/tmp/report.html --uncertainty=/tmp/unc.zarr

--pred and --truth: a zarr v3 labels array (what predict.py writes), an OME-Zarr, a scan
directory (its labels), a multi-page TIFF, a .npy, or any other volume format open_volume reads. Class names come from --classes, else from the
dataset.json beside the truth scan, else --num_classes, else max label + 1 (class_0, ...).
Writes REPORT.json and REPORT.md (per-class IoU / Dice / precision / recall, means, bone
measures of prediction and truth with relative differences) and with --pictures a per-slice IoU
profile and overlays of Z slices as PNGs beside them. --html writes one self-contained page
(scores, confusion matrix, per-slice IoU, training curves when the prediction's bundle has a
metrics.csv beside it, middle slices across Z, Y and X with errors and, with --uncertainty, the
uncertainty map). Streams the volumes slab by slab.
--voxel_size_um takes one number or Z,Y,X; volumes use the full (Z, Y, X) voxel and the report
says where the size came from (voxel_size_source: given, metadata, or assumed at import).
--morphometry adds the ASBMR bone indices of prediction and truth with relative differences
(see bonejax.evaluate.morph_report). A warning goes to stderr (and into the report) when the
voxel size was assumed or the truth scan was one of the model's training scans.
--border_band=N (default 2, 0: off) adds per-class IoU in the outer N voxels of the volume
against the interior, and their difference (bonejax.evaluate.border).
Sparse truth: voxels of the truth's unlabelled value (its dataset.json's "unlabelled", or
--unlabelled for a truth outside a dataset) are not scored; the report counts them
(unlabelled_voxels), measures are counted over the labelled voxels only and --morphometry is
refused (see bonejax.evaluate.report).
The last stdout line is the JSON report: iou and dice per class, miou_all, miou_fg, measures.
"""

import contextlib
import sys
from pathlib import Path


from absl import flags

from bonejax.cli import runner  # (no jax: start-up stays fast)
from bonejax.core import errors, outputs, placement
from bonejax.evaluate import measures, morph_report, provenance, report

_PRED = flags.DEFINE_string("pred", None, "Predicted labels: zarr v3 array, scan directory, "
                            "TIFF or .npy.", required=True)
_TRUTH = flags.DEFINE_string("truth", None, "True labels: scan directory (its labels), zarr "
                             "v3 array, TIFF or .npy.", required=True)
_OUT = flags.DEFINE_string("out", None, "REPORT.json path; REPORT.md (and pictures) are "
                           "written beside it.", required=True)
_CLASSES = flags.DEFINE_string("classes", None, "Comma-separated class names, class 0 first "
                               "(default: the truth's dataset.json).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", None, "Number of classes; must agree with "
                                    "the dataset and --classes when those are known.")
_PICTURES = flags.DEFINE_bool("pictures", False, "Also write PNGs: per-slice IoU profile and "
                              "overlays of Z slices.")
_IMAGE = flags.DEFINE_string("image", None, "Scan or volume shown under the overlays "
                             "(default: the truth scan's image).")
_SLICES = flags.DEFINE_string("overlay_slices", None, "Comma-separated Z indices for the "
                              "overlays (default: at 1/4, 1/2 and 3/4 of the depth).")
_VOXEL = flags.DEFINE_string("voxel_size_um", None, "Voxel size in um: one number or Z,Y,X "
                             "(default: the truth scan's, else the prediction's, else what the "
                             "files record).")
_ROI = flags.DEFINE_float("roi_distance_um", None, "Implants: BV/TV in a shell this far "
                          "around the implant (default: everything outside the implant).")
_TIME = flags.DEFINE_float("implant_time_years", None, "Implants: time since implantation, "
                           "needed for the degradation rate.")
_VI = flags.DEFINE_float("initial_volume_mm3", None, "Implants: initial implant volume "
                         "(default: volume of degradation layer + residual material).")
_AI = flags.DEFINE_float("initial_surface_mm2", None, "Implants: initial implant surface "
                         "(default: estimated from degradation layer + residual material).")
_HTML = flags.DEFINE_string("html", None, "Also write a self-contained HTML report here.")
_UNCERTAINTY = flags.DEFINE_string("uncertainty", None, "Uncertainty map from predict.py "
                                   "--save_uncertainty, shown in the HTML report.")
_CURVES = flags.DEFINE_string("curves", None, "Training workdir, bundle or metrics.csv whose "
                              "curves the HTML report shows (default: the prediction's bundle).")
_MORPH = flags.DEFINE_bool("morphometry", False, "Also the standard bone indices (BV/TV, BS/BV, "
                           "Tb.Th, Tb.Sp, Tb.N, Conn.D, DA, SMI; Ct.Th, Ct.Ar/Tt.Ar for a "
                           "cortical class) of prediction and truth, side by side.")
_MORPH_CLASSES = flags.DEFINE_string("morphometry_classes", None, "Classes (names or indices, "
                                     "comma-separated) to measure (default: the bone class).")
_CORTICAL = flags.DEFINE_string("cortical_classes", None, "Cortical classes for Ct.Th and "
                                "Ct.Ar/Tt.Ar (default: classes named like cortical/cortex).")
_MORPH_ROI = flags.DEFINE_string("morphometry_roi", None, "Region of interest: 'auto' "
                                 "(default: 'truth' when a class such as pore is left besides "
                                 "the measured ones, else 'all'), 'truth' (the truth's "
                                 "non-background voxels), 'all', a box z0,y0,x0,z1,y1,x1 or a "
                                 "mask volume of the labels' shape.")
_BAND = flags.DEFINE_integer("border_band", 2, "Also score the outer band of this many voxels "
                             "(within N of a face) against the interior (0: off).",
                             lower_bound=0)
_UNLABELLED = flags.DEFINE_integer("unlabelled", None, "Sparse truth outside a dataset: the "
                                   "label value of unpainted voxels (e.g. 255), not scored "
                                   "(a dataset's scan: its dataset.json's value).")
_SLAB = flags.DEFINE_integer("slab", 64, "Z slices read at a time.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing report.")
_BUDGET = flags.DEFINE_float("memory_budget_gb", None, "Host memory the evaluation may use "
                             "(default: what the machine has free); --slab shrinks to fit.")


def _plan_slab(slab: int, html: bool, morph: bool, num_classes: int | None) -> int:
  """The Z slab that fits the memory, from the volumes' headers (a zarr.json may claim any
  shape): one `error:` line naming the bytes when not even one Z slice fits."""
  import numpy as np

  from bonejax.core import memory_plan
  from bonejax.evaluate import metrics
  from bonejax.io import registry
  srcs = []
  try:
    for path in (_PRED.value, _TRUTH.value):
      srcs.append(registry.open_volume(errors.require_exists(path, "labels"), array="labels"))
  except errors.UserError:
    return slab  # report.evaluate names what is wrong with the inputs
  finally:
    for src in srcs:
      with contextlib.suppress(Exception):
        src.close()
  z, y, x = (int(n) for n in srcs[1].shape[:3])
  # Per Z slice: both slabs as read and the copies the measures make of them.
  per_slice = 2 * y * x * sum(np.dtype(s.dtype).itemsize for s in srcs)
  c = num_classes or report.UNKNOWN_CLASSES_MAX
  voxels = z * y * x
  piece = metrics._PIECE  # voxels per bincount  # pylint: disable=protected-access
  fixed = 2 * min(piece, voxels) * 8  # its int64 index, and the slab's ravel
  if _PICTURES.value or html:  # per-slice profiles, and middle planes across Y and X
    fixed += 2 * (z + y + x) * c * 8 + (4 * z * (y + x) * 4 if html else 0)
  if morph:  # morphometry's padded blocks (2^24 voxels: distance maps, labels), two threads
    fixed += 2 * min(1 << 24, voxels) * 24
  fits = memory_plan.plan_slab(
      f"evaluating {str(_PRED.value)!r} against {str(_TRUTH.value)!r} of shape {(z, y, x)}",
      per_slice, fixed, slab, _BUDGET.value, hint="crop the volumes, or raise --memory_budget_gb")
  if fits < min(slab, z):
    print(f"[evaluate] --slab={slab} -> {fits} Z slices at a time, to fit the memory",
          file=sys.stderr, flush=True)
  return min(slab, fits)


def _parse_slices(text):
  try:
    return [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise errors.UserError(f"--overlay_slices={text!r} is not a comma-separated list of "
                        f"integers") from None


def _check_outputs(paths):
  """Refuses outputs that exist (without --overwrite), are not bonejax's, or are an input."""
  for p in paths:
    outputs.check_output(p, _OVERWRITE.value, inputs=(_PRED.value, _TRUTH.value, _IMAGE.value,
                                                   _UNCERTAINTY.value))


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _SLAB.value < 1:
    raise errors.UserError(f"--slab={_SLAB.value} must be >= 1")
  out = Path(_OUT.value)
  if out.suffix.lower() != ".json":
    raise errors.UserError(f"--out={str(out)!r} must end in .json")
  if out.exists() and out.is_dir():
    raise errors.UserError(f"--out={str(out)!r} is a directory")
  classes = None
  if _CLASSES.value is not None:
    classes = [c.strip() for c in _CLASSES.value.split(",")]
    if any(not c for c in classes) or len(set(classes)) != len(classes):
      raise errors.UserError(f"--classes={_CLASSES.value!r} needs distinct, non-empty names")
  slices = _parse_slices(_SLICES.value) if _SLICES.value else None
  voxel = provenance.parse_voxel_size(_VOXEL.value) if _VOXEL.value is not None else None
  morph = None
  if _MORPH.value:
    morph = morph_report.request_from_flags(_MORPH_CLASSES.value, _CORTICAL.value,
                                            _MORPH_ROI.value)
  elif _MORPH_CLASSES.value or _CORTICAL.value or _MORPH_ROI.value:
    raise errors.UserError("--morphometry_classes, --cortical_classes and --morphometry_roi go "
                           "with --morphometry")
  # Fail on an existing output before any work; a folder made for the report goes again if the
  # run fails. The claim refuses a second run writing the same report meanwhile.
  html_path = Path(_HTML.value) if _HTML.value else None
  if html_path is not None and html_path.suffix.lower() not in (".html", ".htm"):
    raise errors.UserError(f"--html={str(html_path)!r} must end in .html")
  if _UNCERTAINTY.value and html_path is None:
    raise errors.UserError("--uncertainty is shown in the HTML report: give --html too")
  inputs = (_PRED.value, _TRUTH.value, _IMAGE.value, _UNCERTAINTY.value)
  for path, flag in ((out, "--out"), (html_path, "--html")):
    placement.refuse_inside(path, inputs, flag)  # before a claim's lock file lands inside
  slab = _plan_slab(_SLAB.value, html_path is not None, bool(morph),
                    len(classes) if classes else _NUM_CLASSES.value)
  with outputs.claim_output(out), contextlib.ExitStack() as claims:
    if html_path is not None:
      claims.enter_context(outputs.claim_output(html_path))
    _check_outputs([out, out.with_suffix(".md")] + ([html_path] if html_path else []))
    ev = report.evaluate(
        _PRED.value, _TRUTH.value, classes=classes, num_classes=_NUM_CLASSES.value,
        options=measures.Options(
            roi_distance_um=_ROI.value, implant_time_years=_TIME.value,
            initial_volume_mm3=_VI.value, initial_surface_mm2=_AI.value),
        voxel_size_um=voxel, image=_IMAGE.value, pictures=_PICTURES.value,
        overlay_slices=slices, slab=slab, middle_planes=html_path is not None,
        uncertainty=_UNCERTAINTY.value, morphometry=morph, border_band=_BAND.value,
        unlabelled=_UNLABELLED.value)
    for w in ev.result.get("warnings") or []:
      errors.warn(w)
    if _PICTURES.value:
      _check_outputs(report.picture_paths(out, sorted(ev.overlays)))
    if html_path is not None:
      from bonejax.data import store
      from bonejax.evaluate import html_report
      model = store.array_attrs(_PRED.value).get("model") if Path(_PRED.value).is_dir() else None
      html_report.write(ev, html_path,
                        metrics_csv=html_report.find_metrics_csv(_CURVES.value, model))
      ev.result["html"] = str(html_path)
    return report.write(ev, out)


def run() -> None:
  runner.run(main)


if __name__ == "__main__":
  run()
