r"""Nested k-fold cross-validation by scan (`--config=configs/X.py --folds=5 --workdir=W`).

    python launch/crossval.py --config=configs/demo.py --folds=5 --workdir=/tmp/cv
    python launch/crossval.py --config=configs/baseline.py --folds=5 --workdir=/tmp/cv \
        --config.dataset=DATA --config.num_steps=20000

The dataset's scans are cut into k outer folds (bonejax.data.splits.nested_kfold with
config.seed; every scan is scored in exactly one fold; with no dataset the config's phantom is
made once in WORKDIR/data). Selection is nested: fold i picks its best model, stops early and
cuts its learning rate on inner validation scans (`val_fraction` of its training scans, at
least one, drawn with the seed), never on the scans it reports. Fold i trains in WORKDIR/fold_i
exactly as launch/train.py would (and resumes there: re-running the command continues where it
stopped); then its best model predicts each of its outer scans whole, with `--planes` soft
voting (bonejax.predict), scored on the pooled confusion matrix of those scans. So a fold needs
at least 2 scans besides its outer ones.

Writes WORKDIR/crossval.json and prints the per-fold table and mean +- std (sample std, ddof=1)
of miou_fg; the last stdout line is the result JSON: `folds` (per fold: `test_scans` scored,
`inner_val_scans` selected on, `train_scans`, `miou_fg`, `miou_all`, `iou`, `best_step`,
`inner_val_miou_fg`; `val_scans` repeats `test_scans` for scripts written before nesting),
`mean_miou_fg`, `std_miou_fg`, `mean_miou_all`, `std_miou_all` and `selection` (how models were
selected). A run that fails before any fold has a checkpoint removes what it created.
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging
from ml_collections import config_flags


from bonejax.cli import runner
from bonejax.core import compile_cache, errors, heap
from bonejax.train import configlib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/NAME.py[:ARG]); override fields with "
    "--config.FIELD=VALUE.", lock_config=True)
_FOLDS = flags.DEFINE_integer("folds", 5, "Number of outer folds (by scan).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for fold_i/ runs and crossval.json.")
_PLANES = flags.DEFINE_integer("planes", 3, "Plane sets voted over when scoring: 1, 3, 9 or 12.")
_VOTE = flags.DEFINE_enum("vote", "soft", ["soft", "majority"], "Voting rule when scoring.")
_COMPILATION_CACHE = compile_cache.define_flag()


def main(argv):
  configlib.check_run_flags(argv, _CONFIG.value, _WORKDIR.value)
  heap.setup()  # XLA's per-step buffers reused, not page-faulted (off: env 0)
  compile_cache.setup(_COMPILATION_CACHE.value)  # before anything compiles
  if _PLANES.value not in (1, 3, 9, 12):
    raise errors.UserError(f"--planes={_PLANES.value} must be 1, 3, 9 or 12")
  logging.set_verbosity(logging.WARNING)
  from bonejax.train import crossval
  return crossval.run(_CONFIG.value, _FOLDS.value, _WORKDIR.value, planes=_PLANES.value,
                      vote=_VOTE.value)


def run() -> None:
  configlib.check_argv(sys.argv)
  runner.run(main)


if __name__ == "__main__":
  run()
