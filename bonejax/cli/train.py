r"""Train a segmentation model from a config (`--config=configs/X.py --workdir=W`).

    python launch/train.py --config=configs/demo.py --workdir=/tmp/demo
    python launch/train.py --config=configs/baseline.py --workdir=/tmp/run \
        --config.dataset=DATA --config.num_steps=2000 --config.val_scans="('scan_003',)"
    python launch/train.py --config=configs/scaling_unet.py:depth=4,width=64,patch=384 ...

Writes WORKDIR/{config.json, split.json, metrics.csv, curves.png, checkpoints/, best/, model/} and
prints the result JSON (workdir, steps, best_val_miou, best_step, seconds, patches_per_second,
model_dir, ...) as the last stdout line. Running the same command again resumes from the newest
checkpoint in WORKDIR (a finished run returns its result at once); a damaged newest checkpoint
is reported, moved to WORKDIR/checkpoints.corrupt/ and the previous one resumed. WORKDIR/model is
exported from the best checkpoint (WORKDIR/best). A run that fails before its first checkpoint
removes what it created; config.json is only (re)written once the config fits the run there.

Ctrl-C (SIGINT) or SIGTERM stops cleanly: the current step finishes, a checkpoint is written at
it, one line says so, and the result JSON (`"stopped": "signal"`) ends a run that exits 0; the
same command resumes there. A second signal aborts at once (exit 130).

Several hosts (data-parallel over all their devices): run the same command on every host with
  --coordinator_address=HOST0:PORT --num_processes=N --process_id=I
or, on a cluster JAX can detect by itself (SLURM, Open MPI, Kubernetes/GKE, Cloud TPU), with
--multihost and no addresses: jax.distributed.initialize() reads them from the environment.
`batch_size` stays the global batch; each host reads its own 1/N share of every batch.
On CPU, JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo lets several local processes act as hosts.
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging
from ml_collections import config_flags


from bonejax.cli import runner
from bonejax.core import compile_cache, distributed, heap
from bonejax.train import configlib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/NAME.py[:ARG]); override fields with "
    "--config.FIELD=VALUE.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it holds "
                               "checkpoints).")
_MULTIHOST = distributed.define_flags(flags)
_COMPILATION_CACHE = compile_cache.define_flag()


def main(argv):
  configlib.check_run_flags(argv, _CONFIG.value, _WORKDIR.value)
  heap.setup()  # XLA's per-step buffers reused, not page-faulted (off: env 0)
  compile_cache.setup(_COMPILATION_CACHE.value)  # before anything compiles
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  _MULTIHOST.initialize()
  from bonejax.train import trainer
  return trainer.train(_CONFIG.value, _WORKDIR.value, stop_on_signal=True)


def run() -> None:
  configlib.check_argv(sys.argv)
  runner.run(main)


if __name__ == "__main__":
  run()
