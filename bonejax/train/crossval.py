"""Nested k-fold cross-validation by scan: train, select and stop on inner scans, score outer ones.

The dataset's scans are cut into k outer folds (splits.nested_kfold with config.seed; every scan
is scored in exactly one fold). Fold i's remaining scans are split again: an inner validation
part (`val_fraction` of them, at least one) picks the best model, decides early stopping and
drives the plateau schedule; the rest train. The outer fold's scans reach neither training nor
any of those choices: they are only predicted whole, with `planes` voting (bonejax.predict), and
scored on the pooled confusion matrix of the fold. Selecting on the scans one then reports (what
a plain k-fold loop does) would make the reported score optimistic.

Fold i trains in WORKDIR/fold_i exactly as launch/train.py would, and resumes there. With no
dataset the config's phantom is made once in WORKDIR/data.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from bonejax.core import errors, outputs
from bonejax.data import store
from bonejax.data import splits
from bonejax.train import configlib, rundir, trainer

SELECTION = ("nested: each fold's model selection, early stopping and plateau schedule use "
             "inner validation scans taken from its training scans; the outer fold's scans "
             "are only scored")


def score_fold(model_dir: Path, dataset: store.Dataset, scans, planes: int,
               vote: str) -> dict[str, Any]:
  """Whole-scan predictions of the fold's outer scans, scored on the pooled matrix."""
  from bonejax import predict
  from bonejax.evaluate import metrics
  from bonejax.models import bundle

  b = bundle.load_bundle(model_dir)
  # Compiled once per fold; a 2.5D bundle stacks its planes.
  predictor = predict.Predictor(b, planes=planes, vote=vote, progress=False)
  total = np.zeros((b.num_classes, b.num_classes), np.int64)
  per_scan = {}
  for name in scans:
    scan = dataset.open_scan(name)
    labels, _, _ = predictor.predict_volume(scan, stats=scan.stats)
    cm = metrics.confusion_matrix(labels, scan.read_labels(), b.num_classes)
    per_scan[name] = metrics.scores(cm, b.classes)["miou_fg"]
    total += cm
  s = metrics.scores(total, b.classes)
  return {"miou_fg": s["miou_fg"], "miou_all": s["miou_all"],
          "iou": dict(zip(b.classes, s["iou"])), "per_scan_miou_fg": per_scan,
          "model_step": b.meta.get("train_step"), "checkpoint_id": b.meta.get("checkpoint_id"),
          "scored_scans": list(scans), "planes": planes, "vote": vote}


def run(base: ml_collections.ConfigDict, folds: int, workdir: str | Path, *, planes: int = 3,
        vote: str = "soft") -> dict[str, Any]:
  """Runs (or resumes) every fold; the result that launch/crossval.py prints."""
  if planes not in (1, 3, 9, 12):
    raise errors.UserError(f"--planes={planes} must be 1, 3, 9 or 12")
  if configlib.names(base.train_scans) or configlib.names(base.val_scans):
    raise errors.UserError("cross-validation makes its own splits: leave train_scans and "
                        "val_scans empty")
  workdir = Path(workdir).absolute()
  fold_dirs = [workdir / f"fold_{i}" for i in range(max(int(folds), 0))]
  with rundir.removed_on_failure(workdir,
                                 lambda: any(rundir.has_checkpoint(d) for d in fold_dirs),
                                 names=("data", "fold_*", "crossval.json")):
    return _run(base, int(folds), workdir, planes, vote)


def _run(base, k: int, workdir: Path, planes: int, vote: str) -> dict[str, Any]:
  start = time.perf_counter()
  configlib.check(base)
  dataset_path = trainer.resolve_dataset(base, workdir)  # the phantom, once, for every fold
  dataset = store.open_dataset(dataset_path)
  folds = splits.nested_kfold(dataset.scans, k, int(base.seed), float(base.val_fraction))

  rows = []
  cache = trainer.StepCache()  # the folds share one configuration: compiled once
  for i, fold in enumerate(folds):
    fold_dir = workdir / f"fold_{i}"
    print(f"[crossval] fold {i + 1}/{len(folds)}: train {', '.join(fold.train)}; select on "
          f"{', '.join(fold.val)}; score {', '.join(fold.test)}", file=sys.stderr, flush=True)
    config = copy.deepcopy(base)
    with config.unlocked():
      config.dataset = str(dataset_path)
      config.train_scans, config.val_scans = tuple(fold.train), tuple(fold.val)
    result = trainer.train(config, fold_dir, cache=cache)
    scores_file = fold_dir / "scores.json"
    scores = json.loads(scores_file.read_text()) if scores_file.exists() else None
    model_id = json.loads((fold_dir / "model" / "model.json").read_text()).get("checkpoint_id")
    if not scores or [scores.get(k) for k in ("checkpoint_id", "scored_scans", "planes",
                                              "vote")] != [model_id, fold.test, planes, vote]:
      scores = score_fold(fold_dir / "model", dataset, fold.test, planes, vote)
      outputs.atomic_write_json(scores_file, scores)
    rows.append({"fold": i, "test_scans": fold.test, "inner_val_scans": fold.val,
                 "train_scans": fold.train,
                 "val_scans": fold.test,  # the scored scans, as this field meant before nesting
                 "steps": result["steps"], "best_step": result["best_step"],
                 "inner_val_miou_fg": result["best_val_miou"], **scores})

  values = np.array([r["miou_fg"] for r in rows], np.float64)
  alls = np.array([r["miou_all"] for r in rows], np.float64)
  out = {"workdir": workdir, "dataset": dataset_path, "selection": SELECTION, "folds": rows,
         "mean_miou_fg": float(values.mean()),
         "std_miou_fg": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
         "mean_miou_all": float(alls.mean()),
         "std_miou_all": float(alls.std(ddof=1)) if len(alls) > 1 else 0.0,
         "planes": planes, "vote": vote, "seconds": time.perf_counter() - start}
  outputs.atomic_write_json(workdir / "crossval.json", out)
  print(f"{'fold':>4}  {'scored scans':<24} {'selected on':<16} {'best step':>9}  "
        f"{'miou_fg':>7}  {'miou_all':>8}", file=sys.stderr)
  for r in rows:
    print(f"{r['fold']:>4}  {','.join(r['test_scans']):<24} {','.join(r['inner_val_scans']):<16} "
          f"{str(r['best_step']):>9}  {r['miou_fg']:7.4f}  {r['miou_all']:8.4f}",
          file=sys.stderr)
  print(f"mean miou_fg {out['mean_miou_fg']:.4f} +- {out['std_miou_fg']:.4f} (std, ddof=1; "
        "nested selection)", file=sys.stderr, flush=True)
  return out
