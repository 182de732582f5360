r"""k-fold cross-validation by scan (`--config=configs/X.py --folds=5 --workdir=W`).

    python launch/crossval.py --config=configs/demo.py --folds=5 --workdir=/tmp/cv
    python launch/crossval.py --config=configs/baseline.py --folds=5 --workdir=/tmp/cv \
        --config.dataset=DATA --config.num_steps=20000

The dataset's scans are cut into k folds (bonejax.data.splits.kfold with config.seed; every
scan is validation in exactly one fold; with no dataset the config's phantom is made once in
WORKDIR/data). Fold i trains in WORKDIR/fold_i exactly as launch/train.py would (and resumes
there: re-running the command continues where it stopped), then its best model predicts each of
its validation scans whole, with `--planes` soft voting (bonejax.predict), and is scored on the
pooled confusion matrix of those scans. Writes WORKDIR/crossval.json and prints the per-fold
table and mean +- std (sample std, ddof=1) of miou_fg; the last stdout line is the result JSON
(`folds`, `mean_miou_fg`, `std_miou_fg`, ...).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

from absl import flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bonejax import cli  # noqa: E402
from bonejax.train import configlib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/NAME.py[:ARG]); override fields with "
    "--config.FIELD=VALUE.", lock_config=True)
_FOLDS = flags.DEFINE_integer("folds", 5, "Number of folds (by scan).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for fold_i/ runs and crossval.json.")
_PLANES = flags.DEFINE_integer("planes", 3, "Plane sets voted over when scoring: 1, 3, 9 or 12.")
_VOTE = flags.DEFINE_enum("vote", "soft", ["soft", "majority"], "Voting rule when scoring.")


def score_fold(model_dir: Path, dataset, scans, planes: int, vote: str) -> dict:
  """Whole-scan predictions of the fold's validation scans, scored on the pooled matrix."""
  import numpy as np
  from bonejax import bundle, metrics, predict

  b = bundle.load_bundle(model_dir)
  engine = predict.make_engine(b.model, in_channels=b.in_channels)  # compiled once per fold
  total = np.zeros((b.num_classes, b.num_classes), np.int64)
  per_scan = {}
  for name in scans:
    scan = dataset.open_scan(name)
    labels = predict.predict_volume(engine, scan, stats=scan.stats, rule=b.normalization,
                                    planes=planes, vote=vote)
    cm = metrics.confusion_matrix(labels, scan.read_labels(), b.num_classes)
    per_scan[name] = metrics.scores(cm, b.classes)["miou_fg"]
    total += cm
  s = metrics.scores(total, b.classes)
  return {"miou_fg": s["miou_fg"], "miou_all": s["miou_all"],
          "iou": dict(zip(b.classes, s["iou"])), "per_scan_miou_fg": per_scan,
          "model_step": b.meta.get("train_step"), "planes": planes, "vote": vote}


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _WORKDIR.value:
    raise cli.UserError("--workdir is required")
  if _CONFIG.value is None:
    raise cli.UserError("--config is required (e.g. --config=configs/demo.py)")
  if _PLANES.value not in (1, 3, 9, 12):
    raise cli.UserError(f"--planes={_PLANES.value} must be 1, 3, 9 or 12")
  logging.set_verbosity(logging.WARNING)
  import numpy as np
  from bonejax import store
  from bonejax.data import splits
  from bonejax.train import trainer

  start = time.perf_counter()
  workdir = Path(_WORKDIR.value).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  base = _CONFIG.value
  if configlib.names(base.train_scans) or configlib.names(base.val_scans):
    raise cli.UserError("cross-validation makes its own splits: leave train_scans and "
                        "val_scans empty")
  dataset_path = trainer._dataset_path(base, workdir)  # the phantom, once, for every fold
  dataset = store.open_dataset(dataset_path)
  folds = splits.kfold(dataset.scans, _FOLDS.value, int(base.seed))

  rows = []
  for i, split in enumerate(folds):
    fold_dir = workdir / f"fold_{i}"
    print(f"[crossval] fold {i + 1}/{len(folds)}: val {', '.join(split.val)}", file=sys.stderr,
          flush=True)
    config = copy.deepcopy(base)
    with config.unlocked():
      config.dataset = str(dataset_path)
      config.train_scans, config.val_scans = tuple(split.train), tuple(split.val)
    result = trainer.train(config, fold_dir)
    cache = fold_dir / "scores.json"
    scores = json.loads(cache.read_text()) if cache.exists() else None
    if not scores or (scores.get("model_step"), scores.get("planes"), scores.get("vote")) != (
        result["best_step"], _PLANES.value, _VOTE.value):
      scores = score_fold(fold_dir / "model", dataset, split.val, _PLANES.value, _VOTE.value)
      cli.atomic_write_json(cache, scores)
    rows.append({"fold": i, "val_scans": split.val, "train_scans": split.train,
                 "steps": result["steps"], "best_step": result["best_step"],
                 "val_planes_miou_fg": result["best_val_miou"], **scores})

  values = np.array([r["miou_fg"] for r in rows], np.float64)
  out = {"workdir": workdir, "dataset": dataset_path, "folds": rows,
         "mean_miou_fg": float(values.mean()),
         "std_miou_fg": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
         "mean_miou_all": float(np.mean([r["miou_all"] for r in rows])),
         "std_miou_all": float(np.std([r["miou_all"] for r in rows], ddof=1)),
         "planes": _PLANES.value, "vote": _VOTE.value,
         "seconds": time.perf_counter() - start}
  cli.atomic_write_json(workdir / "crossval.json", out)
  print(f"{'fold':>4}  {'val scans':<24} {'best step':>9}  {'miou_fg':>7}  {'miou_all':>8}",
        file=sys.stderr)
  for r in rows:
    print(f"{r['fold']:>4}  {','.join(r['val_scans']):<24} {str(r['best_step']):>9}  "
          f"{r['miou_fg']:7.4f}  {r['miou_all']:8.4f}", file=sys.stderr)
  print(f"mean miou_fg {out['mean_miou_fg']:.4f} +- {out['std_miou_fg']:.4f} (std, ddof=1)",
        file=sys.stderr, flush=True)
  return out


if __name__ == "__main__":
  configlib.check_argv(sys.argv)
  cli.run(main)
