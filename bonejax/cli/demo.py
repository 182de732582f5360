"""The whole job on the embedded default: phantom -> train -> 3-plane prediction -> evaluation.

    python launch/demo.py --workdir=/tmp/bonejax-demo

1. makes a synthetic bone micro-CT dataset (background / bone / pore, exact labels) in
   WORKDIR/data, unless one is there;
2. trains configs/demo.py with a scan-level split: the last scan is the held-out test scan, the
   one before it validates, the rest train (WORKDIR/model is the best bundle);
3. predicts the test scan along each axis, fuses the three plane sets by soft, majority and
   max-probability voting (the Scaling paper's Table 2 on our data) and writes the soft-vote
   labels to WORKDIR/prediction.zarr;
4. evaluates it against the exact labels (WORKDIR/report.{json,md,html} and pictures) and
   against an Otsu-threshold baseline fitted on the training scans.

The last stdout line is JSON with miou_all, miou_fg, baseline_miou_fg, seconds, per-class IoU
and the voting table. Running it again reuses the dataset and resumes (or reuses) training.
Any config field can be overridden: --config.num_steps=300. A run that fails before training
has written a checkpoint removes what it created in WORKDIR (and WORKDIR itself if it made it).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from absl import flags, logging
from ml_collections import config_flags

REPO = Path(__file__).resolve().parents[2]

from bonejax.cli import runner
from bonejax.core import compile_cache, errors, heap, outputs
from bonejax.train import configlib

# A default config file is parsed when the flag is defined: check overrides first (one line).
configlib.check_argv(sys.argv, default=str(REPO / "configs" / "demo.py"))
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for data, run, prediction, report.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", str(REPO / "configs" / "demo.py"), "Training config (override fields with "
    "--config.FIELD=VALUE).", lock_config=True)
_NUM_SCANS = flags.DEFINE_integer("num_scans", 6, "Phantom scans: N-2 train, 1 val, 1 test.")
_SHAPE = flags.DEFINE_string("shape", "96,128,128", "Phantom scan shape Z,Y,X.")
_SEED = flags.DEFINE_integer("seed", 0, "Phantom seed.")
_PICTURES = flags.DEFINE_bool("pictures", True, "Write the IoU profile and overlay PNGs.")
_COMPILATION_CACHE = compile_cache.define_flag()


def make_or_open_dataset(data: Path, num_scans: int, shape: tuple[int, ...], seed: int):
  from bonejax import phantom
  from bonejax.data import store
  if (data / store.DATASET_JSON).exists():
    ds = store.open_dataset(data)
    print(f"[demo] reusing dataset {data} ({len(ds.scans)} scans)", file=sys.stderr)
    return ds
  t = time.perf_counter()
  ds = phantom.make_dataset(data, num_scans=num_scans, shape=shape, seed=seed, kind="bone")
  print(f"[demo] phantom dataset: {num_scans} scans of {shape} in {time.perf_counter() - t:.1f} s",
        file=sys.stderr)
  return ds


def table(rows: list[tuple[str, dict]], classes: list[str]) -> str:
  head = f"{'method':<22}" + "".join(f"{c:>12}" for c in classes) + f"{'miou_fg':>10}"
  lines = [head, "-" * len(head)]
  for name, s in rows:
    ious = "".join(f"{v:>12.4f}" if v is not None else f"{'-':>12}" for v in s["iou"])
    lines.append(f"{name:<22}{ious}{s['miou_fg']:>10.4f}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _WORKDIR.value:
    raise errors.UserError("--workdir is required")
  if _NUM_SCANS.value < 3:
    raise errors.UserError(f"--num_scans={_NUM_SCANS.value}: the demo needs at least 3 scans "
                        "(train, validation, test)")
  shape = errors.parse_ints(_SHAPE.value, 3, "shape")
  heap.setup()  # XLA's per-step buffers reused, not page-faulted (off: env 0)
  compile_cache.setup(_COMPILATION_CACHE.value)  # before anything compiles
  workdir = Path(_WORKDIR.value).absolute()
  if workdir.exists() and not workdir.is_dir():
    raise errors.UserError(f"--workdir={str(workdir)!r} exists and is not a directory")
  workdir.mkdir(parents=True, exist_ok=True)
  logging.set_verbosity(logging.WARNING)
  start = time.perf_counter()

  import numpy as np
  from bonejax import predict
  from bonejax.data import store
  from bonejax.evaluate import baseline, metrics, report
  from bonejax.models import bundle
  from bonejax.train import trainer

  # ---- Data: a scan-level split, the last scan never seen in training or model selection. ----
  ds = make_or_open_dataset(workdir / "data", _NUM_SCANS.value, shape, _SEED.value)
  if len(ds.scans) < 3:
    raise errors.UserError(f"dataset {str(ds.path)!r} has {len(ds.scans)} scans; need >= 3")
  train_scans, val_scans, test_scan = ds.scans[:-2], ds.scans[-2:-1], ds.scans[-1]
  config = _CONFIG.value
  with config.unlocked():
    config.dataset = str(ds.path)
    config.train_scans = tuple(train_scans)
    config.val_scans = tuple(val_scans)

  # ---- Train. --------------------------------------------------------------------------------
  print(f"[demo] training {config.model.name} on {', '.join(train_scans)}; validating on "
        f"{val_scans[0]}; testing on {test_scan}", file=sys.stderr)
  t = time.perf_counter()
  run = trainer.train(config, workdir)
  train_s = time.perf_counter() - t

  # ---- Predict the held-out scan along each axis; fuse by soft and majority vote. ------------
  t = time.perf_counter()
  b = bundle.load_bundle(run.get("model_dir", workdir / "model"))
  scan = ds.open_scan(test_scan)
  per_axis = predict.predict_planes(b.model, scan.image, stats=scan.stats, rule=b.normalization,
                                    planes=3, progress=True)
  sets = predict.plane_sets(3)  # fused as predict.py fuses them (face taper on the soft vote)
  soft_labels, _ = predict.fuse(per_axis, "soft", sets, predict.DEFAULT_FACE_TAPER)
  untapered_labels, _ = predict.fuse(per_axis, "soft")
  majority_labels, _ = predict.fuse(per_axis, "majority")
  max_labels, _ = predict.fuse(per_axis, "max")
  predict_s = time.perf_counter() - t
  voxels = int(np.prod(scan.shape))

  pred_path = workdir / "prediction.zarr"
  with outputs.atomic_output(pred_path, overwrite=True) as tmp:
    arr = store.create_array(tmp, scan.shape, "uint8")
    arr.write(soft_labels).result()
    store.set_array_attrs(tmp, {"model": str(workdir / "model"), "planes": 3,
                                      "vote": "soft", "face_taper": predict.DEFAULT_FACE_TAPER,
                                      "classes": b.classes, "scan": test_scan})

  # ---- Evaluate: the model's votes and the threshold baseline against the exact labels. ------
  truth = scan.read_labels()
  k = ds.num_classes

  def score(labels):
    return metrics.scores(metrics.confusion_matrix(labels, truth, k), ds.classes)

  rows = [(f"axis {a} only", score(np.argmax(p, axis=-1).astype(np.uint8)))
          for a, p in enumerate(per_axis)]
  rows.append(("3-plane majority vote", score(majority_labels)))
  rows.append(("3-plane max-probability", score(max_labels)))
  rows.append(("3-plane soft vote, no face taper", score(untapered_labels)))
  rows.append(("3-plane soft vote", score(soft_labels)))
  base = baseline.fit_scans([ds.open_scan(s) for s in train_scans], k, rule=b.normalization)
  base_scores = score(baseline.predict_scan(base, scan, rule=b.normalization))
  rows.append(("Otsu baseline", base_scores))

  ev = report.evaluate(pred_path, ds.scan_path(test_scan), classes=ds.classes,
                       pictures=_PICTURES.value, progress=False, middle_planes=True)
  rep = report.write(ev, workdir / "report.json")
  from bonejax.evaluate import html_report
  html_path = html_report.write(
      ev, workdir / "report.html", title=f"bonejax demo: held-out scan {test_scan}",
      voting=rows, metrics_csv=html_report.find_metrics_csv(workdir))
  soft = rows[-2][1]

  print("\n" + table(rows, ds.classes) + "\n", file=sys.stderr)
  seconds = time.perf_counter() - start
  return {
      "workdir": workdir, "test_scan": test_scan, "classes": ds.classes,
      "iou": metrics.by_class(soft["iou"], ds.classes),
      "dice": metrics.by_class(soft["dice"], ds.classes),
      "miou_all": soft["miou_all"], "miou_fg": soft["miou_fg"],
      "baseline_miou_fg": base_scores["miou_fg"],
      "baseline_iou": metrics.by_class(base_scores["iou"], ds.classes),
      "gain_over_baseline": soft["miou_fg"] - base_scores["miou_fg"],
      "voting": {name: s["miou_fg"] for name, s in rows},
      "measures": rep.get("measures"),
      "train": {"steps": run.get("steps"), "best_val_miou": run.get("best_val_miou"),
                "best_step": run.get("best_step"), "seconds": round(train_s, 1)},
      "predict_seconds": round(predict_s, 2),
      "predict_voxels_per_second": voxels * 1.0 / max(predict_s, 1e-9),
      "report": workdir / "report.json", "report_html": html_path, "prediction": pred_path,
      "seconds": round(seconds, 1),
  }


def main_removing_failed_runs(argv):
  """main(), removing what it created in --workdir if it fails before training checkpoints."""
  from bonejax.train import rundir
  workdir = Path(_WORKDIR.value).absolute() if _WORKDIR.value else None
  if workdir is None or (workdir.exists() and not workdir.is_dir()):
    return main(argv)
  with rundir.removed_on_failure(workdir, lambda: rundir.has_checkpoint(workdir)):
    return main(argv)


def run() -> None:
  runner.run(main_removing_failed_runs)


if __name__ == "__main__":
  run()
