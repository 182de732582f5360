"""Training: config -> mesh -> data -> model -> sharded jitted step -> checkpoints.

`train(config, workdir)` is three stages, each in its own module, read in this order:
  setup.py   every value checked, mesh, data and split, model graphs, compiled steps, the
             restored or initial state, best model, input feed, evaluators, metric writers
  loop.py    steps, timing (data wait vs step), evaluations, best model, stops, checkpoints
  here       the workdir's guards (one writer, not inside an input, clean-up on failure), the
             finish and the result
Pure step functions live in steps.py, evaluators in evaluators/, checkpoints in checkpoint.py,
the best model in best.py. launch/train.py, launch/demo.py and crossval.py call `train`.

Performance choices (written for GPUs, checked on CPU):
- The model is split into (graphdef, params, rest) once; the step is a pure function of a plain
  pytree, jitted with the state donated, so params and optimiser state are updated in place.
- Compute runs in `config.dtype` (bf16 on GPUs); parameters, BatchNorm statistics, the loss and
  the optimiser stay float32.
- Batches are sharded over the 'data' mesh axis, state is replicated: XLA makes the gradient and
  BatchNorm reductions global. Augmentation runs inside the step, on the device.
- The patches are cut on the devices from training scans held in their memory when the scans
  fit (config.sampler, bonejax/data/feed.py): a step then sends only 5 integers per patch.
- Exact resume: the step's augmentation key is fold_in(seed, step), the patch stream's state is
  one position, the plateau/best/early-stopping state is saved with the weights.
  Bit-exact on the same backend and jax/jaxlib version only: the keys are "rbg" (XLA's
  RngBitGenerator, `steps.rng_key`), whose bits JAX does not promise across backends or
  versions. Resuming elsewhere (a CPU run resumed on a GPU, after a jax upgrade) is a valid
  continuation with other augmentation draws and initial weights that are the checkpoint's, not
  a replay. Kept deliberately: threefry would make the draws portable but multiplies compile
  time (steps.py), and no result of bonejax depends on replaying a run across machines.
- Pretrained starts (`model.init_from`, `model.encoder_weights`) only shape the state at step 0
  (pretrained.py); `model.freeze_encoder_steps` holds the encoder still inside the step.
- 2.5D (`context_slices` = k): the model takes 2k + 1 planes as channels, stacked by the data
  path (bonejax/data/context.py) and recorded in the bundle for the predictor.
- A clean stop (`stop_on_signal`, launch/train.py): SIGINT / SIGTERM end the loop after the
  current step with a checkpoint there (stop.py).

One writer per workdir: process 0 holds a lock beside it (`.WORKDIR.lock`, as bonejax.core.outputs
claims outputs) for the whole run; a second training into the same workdir is refused with one
line, and the lock of a killed run goes with its process (a kernel flock), so the next run
takes over. A run that fails before its first checkpoint removes what it created.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections

from bonejax.core import outputs
from bonejax.core.progress import Progress
from bonejax.train import curves, rundir
from bonejax.train.loop import Meter, run_loop
from bonejax.train.setup import (Run, check_workdir, resolve_dataset, setup,  # noqa: F401
                                 training_voxel_size)
from bonejax.train.steps import (DTYPES, StepCache, make_init, make_train_step,  # noqa: F401
                                 rng_key)
from bonejax.train.stop import StopRequest

# Why a run ended, as the last progress line says it ("done" only when it reached num_steps).
_STOPPED = {"signal": "stopped by a signal", "stop_after": "stopped at stop_after",
            "early_stopping": "stopped early (no improvement)",
            "nan": "stopped: the loss is not finite"}


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, devices=None,
          stop_on_signal: bool = False, cache: StepCache | None = None) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its newest readable checkpoint; the result.

  A run that fails before its first checkpoint removes what it created in `workdir`. With
  `stop_on_signal` (main thread only), SIGINT / SIGTERM stop it cleanly after the current step
  (`"stopped": "signal"`); a second signal raises KeyboardInterrupt. `cache`: compiled steps
  shared by runs of one configuration in this process (cross-validation folds).
  """
  workdir = Path(workdir).absolute()
  check_workdir(config, workdir)  # before anything is written, the lock included
  primary = jax.process_index() == 0
  with StopRequest().installed(stop_on_signal) as stop, \
      rundir.removed_on_failure(workdir, lambda: rundir.has_checkpoint(workdir),
                                enabled=primary), \
      (outputs.claim_output(workdir, "--workdir") if primary else contextlib.nullcontext()), \
      contextlib.ExitStack() as closers:  # checkpoint writers, readers: closed first
    t_start = time.perf_counter()
    run = setup(config, workdir, devices, closers, cache if cache is not None else StepCache())
    start = int(run.host["step"])
    progress = Progress(total=max(run.s.num_steps - start, 0), desc="train", unit="steps")
    if run.primary:
      print(f"[train] patches cut by: {run.feed.kind}", file=progress.stream, flush=True)
    meter = Meter(run.s.batch_size, start)
    step, stopped = run_loop(run, stop, progress, meter)
    _finish(run, step, stopped, stop, progress)
    return _result(run, start, step, stopped, meter, time.perf_counter() - t_start)


def _finish(run: Run, step: int, stopped: str | None, stop: StopRequest, progress) -> None:
  run.ckpts.wait()
  if run.host["best_step"] is None and not run.best.steps():
    run.best.save(step, run.state, run.host.get("last_scores"))  # no finite score: last state
  run.best.sync()
  if stopped is None:
    progress.close()
  elif run.primary:
    print(f"{progress.line()} {_STOPPED.get(stopped, stopped)}", file=progress.stream,
          flush=True)
  if stopped == "signal" and run.primary:
    print(f"[train] stopped by {stop.name or 'a signal'} after step {step}, checkpoint "
          "written; the same command resumes", file=progress.stream, flush=True)
  if run.primary and (run.workdir / "metrics.csv").exists():
    metric = "_".join(run.s.best[:2])
    try:
      curves.plot(run.workdir / "metrics.csv", run.workdir / "curves.png", metric)
    except Exception as e:  # pylint: disable=broad-except  (a plot never fails a run)
      print(f"[train] could not draw curves.png: {e}", file=progress.stream)


def _result(run: Run, start: int, step: int, stopped: str | None, meter: Meter,
            seconds: float) -> dict[str, Any]:
  best_scores = run.host.get("best_scores") or {}
  return {
      "workdir": run.workdir,
      "steps": step,
      "best_val_miou": best_scores.get("miou_fg"),
      "best_step": run.host["best_step"],
      "best_metric": run.config.best_metric,
      "best_val": best_scores,
      "final_val": run.host.get("last_scores"),
      "stopped": stopped or "num_steps",
      "resumed_from": run.resumed_from,
      "steps_this_run": step - start,
      "seconds": seconds,
      "patches_per_second": meter.patches_per_second(step),
      "sampler": run.feed.kind,
      "model_dir": run.workdir / "model",
      "dataset": run.dataset_path,
      "split": {"train": run.split.train, "val": run.split.val},
      "classes": run.classes,
      "model": str(run.config.model.name),
      "params": run.num_params,
      "devices": jax.device_count(),
      "processes": jax.process_count(),
  }
