r"""Plane voting and bone measures of one trained model on a held-out phantom scan.

    python benchmarks/voting_measures.py --bundle=RUN/model --scan=DATA/scan_004 --name=bone
    python benchmarks/voting_measures.py --bundle=RUN/model --scan=DATA/scan_004 --name=implant

Scaling the U-net's Table 2 (single axes vs 3 and 9 planes, soft vs majority voting) and its
measures table (BV/TV, BIC, DR from the predicted segmentation against the reference), on the
phantom's exact labels:

- Voting: every plane set of the 1 / 3 / 9 / 12-plane predictions (the 3 orthogonal stacks, the
  6 stacks of the 45-degree rotations, the 9 in-plane turned stacks) is predicted once
  (`predict.predict_planes`) and the label volumes of each set combination are fused with soft,
  majority and max voting (`planesets.fuse`): per-class IoU and miou_fg of each. The seconds a
  configuration costs are measured separately, end to end (`predict.predict_volume` with soft
  voting, engine compiled beforehand, median of --runs): voting rules differ only in the host-side
  fusion, timed apart in the `fuse s` column.
- Measures (`bonejax.evaluate.measures`): from the 3-plane soft-vote labels and from the exact truth,
  BV/TV and porosity on the bone phantom; BV/TV, BIC, implant volume, residual volume and the
  degradation rate on the implant phantom (DR over a nominal `--implant_years`, with the truth's
  implant volume and surface as the initial ones, so both sides use the same reference), with
  the relative error.

Writes benchmarks/results/voting_<name>_<machine>.{json,md}.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402
from bonejax.cli import runner  # noqa: E402
from bonejax.core import errors, outputs

_BUNDLE = flags.DEFINE_string("bundle", None, "Trained model bundle (a run's model/ directory).")
_SCAN = flags.DEFINE_string("scan", None, "Held-out scan directory (image + exact labels).")
_NAME = flags.DEFINE_string("name", "bone", "Result name: voting_<name>_<machine>.")
_RUNS = flags.DEFINE_integer("runs", 2, "Timed passes per plane configuration (median).")
_BATCH = flags.DEFINE_integer("batch", 8, "Planes per predictor call.")
_YEARS = flags.DEFINE_float("implant_years", 1.0, "Nominal time since implantation for DR.")
_RESULTS = flags.DEFINE_string("results_dir", str(common.RESULTS), "Where result files go.")
_TAG = flags.DEFINE_string("tag", "", "Machine tag of the result files (default: detected).")

# (row label, planes, axis) of the configurations compared; the plane sets of each come from
# predict.plane_sets, so the rows are exactly what `predict.py --planes=P` computes.
CONFIGS = (("axis 0 (Z)", 1, 0), ("axis 1 (Y)", 1, 1), ("axis 2 (X)", 1, 2),
           ("3 planes", 3, None), ("9 planes", 9, None), ("12 planes", 12, None))
VOTES = ("soft", "majority", "max")


def voting_table(probs_by_set: dict, truth, classes, num_classes: int) -> list[dict[str, Any]]:
  """Per-class IoU of every configuration x vote, from per-set probabilities computed once."""
  from bonejax.evaluate import metrics
  from bonejax.predict import planesets
  rows = []
  for label, planes, axis in CONFIGS:
    sets = planesets.plane_sets(planes, axis)
    for vote in (VOTES if len(sets) > 1 else ("soft",)):
      t0 = time.perf_counter()
      labels, _ = planesets.fuse([probs_by_set[s] for s in sets], vote)
      fuse_s = time.perf_counter() - t0
      sc = metrics.scores(metrics.confusion_matrix(labels, truth, num_classes), classes)
      rows.append({"config": label, "planes": planes, "axis": axis,
                   "vote": vote if len(sets) > 1 else "-", "sets": len(sets),
                   "iou": metrics.by_class(sc["iou"], sc["classes"]), "miou_fg": sc["miou_fg"],
                   "fuse_seconds": fuse_s})
  return rows


def time_configs(engine, image, stats, rule: str, runs: int) -> dict[str, float]:
  """Median end-to-end seconds of predict_volume per configuration (soft vote, warm engine)."""
  from bonejax import predict
  out = {}
  for label, planes, axis in CONFIGS:
    times = []
    for _ in range(max(1, runs)):
      t0 = time.perf_counter()
      predict.predict_volume(engine, image, stats=stats, rule=rule, planes=planes, axis=axis,
                             vote="soft")
      times.append(time.perf_counter() - t0)
    out[label] = common.median(times)
  return out


def measures_table(pred, truth, classes, voxel_size_um: float, years: float) -> dict[str, Any]:
  """The applicable measures of prediction and truth with relative errors."""
  from bonejax.evaluate import measures
  t = measures.measure(truth, classes, voxel_size_um)
  opts = None
  if "implant_volume_mm3" in t:
    opts = measures.Options(implant_time_years=years,
                            initial_volume_mm3=t["implant_volume_mm3"],
                            initial_surface_mm2=t["implant_surface_mm2"])
    t = measures.measure(truth, classes, voxel_size_um, opts)
  p = measures.measure(pred, classes, voxel_size_um, opts)
  return measures.compare(p, t)


def to_markdown(res: dict[str, Any], info: dict) -> str:
  classes = [c for c in res["classes"] if c != "background"]
  rows = []
  for r in res["voting"]:
    rows.append({"config": r["config"], "vote": r["vote"], "sets": r["sets"],
                 **{c: r["iou"].get(c) for c in classes}, "fg": r["miou_fg"],
                 "sec": res["seconds"].get(r["config"]), "fuse": r["fuse_seconds"]})
  vt = common.markdown_table(rows, ["config", "vote", "sets", *classes, "fg", "sec", "fuse"],
                             ["planes", "vote", "plane sets", *[f"IoU {c}" for c in classes],
                              "miou_fg", "predict s (soft, end to end)", "fuse s"])
  mrows = [{"m": k, "pred": v["pred"], "truth": v["truth"],
            "rel": None if v["rel_diff"] is None else 100 * v["rel_diff"]}
           for k, v in res["measures"].items()]
  mt = common.markdown_table(mrows, ["m", "pred", "truth", "rel"],
                             ["measure", "predicted (3-plane soft)", "exact truth",
                              "relative error (%)"])
  return "\n".join([
      f"# Voting and measures: {res['name']}, {info['tag']}", "", common.machine_line(info), "",
      f"Load average at start / end: {res['load_average']['start']} / "
      f"{res['load_average']['end']}.", "",
      f"Model `{res['model']}` ({res['bundle']}), trained step {res['train_step']}; held-out "
      f"scan `{res['scan']}` ({'x'.join(map(str, res['shape']))}, voxel "
      f"{res['voxel_size_um']} um). Per-set probabilities computed once and fused per row; "
      f"predict seconds: median of {res['runs']} end-to-end `predict_volume` passes with soft "
      "voting after compilation.", "", vt, "", "## Measures", "",
      (f"DR over a nominal {res['implant_years']} year(s); the initial implant volume and "
       "surface are the truth's (degradation layer + residual material) for both sides."
       if "dr_mm_per_year" in res["measures"] else "Bone phantom: BV/TV over the non-background "
       "volume, porosity = pores / (bone + pores)."), "", mt])


def main(argv):
  del argv
  if not _BUNDLE.value or not _SCAN.value:
    raise errors.UserError("--bundle and --scan are required")
  import jax
  from bonejax import predict
  from bonejax.data import store
  from bonejax.models import bundle
  from bonejax.predict import planesets
  load_start = common.load_average()
  b = bundle.load_bundle(_BUNDLE.value)
  scan = store.open_scan(_SCAN.value)
  image, truth = scan.read_image(), scan.read_labels()
  budget = 16.0
  engine = predict.make_engine(b.model, in_channels=b.in_channels, batch_size=_BATCH.value,
                               memory_budget_gb=budget)
  union = []
  for _, planes, axis in CONFIGS:
    for s in planesets.plane_sets(planes, axis):
      if s not in union:
        union.append(s)
  t0 = time.perf_counter()
  probs = predict.predict_planes(engine, image, stats=scan.stats, rule=b.normalization,
                                 sets=union, memory_budget_gb=budget)
  union_s = time.perf_counter() - t0
  by_set = dict(zip(union, probs))
  voting = voting_table(by_set, truth, b.classes, b.num_classes)
  soft3, _ = planesets.fuse([by_set[s] for s in planesets.plane_sets(3)], "soft")
  del probs, by_set
  seconds = time_configs(engine, image, scan.stats, b.normalization, _RUNS.value)
  meas = measures_table(soft3, truth, b.classes, scan.voxel_size_um, _YEARS.value)
  tag = _TAG.value or common.machine_tag()
  info = common.machine()
  info["tag"] = tag
  res = {"name": _NAME.value, "bundle": str(Path(_BUNDLE.value).absolute()),
         "model": b.meta.get("model"), "train_step": b.meta.get("train_step"),
         "scan": Path(_SCAN.value).name, "shape": list(image.shape),
         "voxel_size_um": scan.voxel_size_um, "classes": list(b.classes),
         "voting": voting, "seconds": seconds, "runs": _RUNS.value,
         "union_seconds": union_s, "union_sets": [s.name for s in union],
         "measures": meas, "implant_years": _YEARS.value, "backend": jax.default_backend(),
         "load_average": {"start": load_start, "end": common.load_average()}}
  md = to_markdown(res, info)
  print(md)
  paths = common.result_paths(f"voting_{_NAME.value}", tag, Path(_RESULTS.value))
  outputs.atomic_write_text(paths["md"], md + "\n")
  common.write_results(f"voting_{_NAME.value}", {**res, "machine": info}, None, tag=tag,
                       results_dir=Path(_RESULTS.value))
  best = max(voting, key=lambda r: r["miou_fg"])
  return {"md": paths["md"], "json": paths["json"], "best": f"{best['config']} {best['vote']}",
          "best_miou_fg": best["miou_fg"]}


if __name__ == "__main__":
  runner.run(main)
