"""The training loop: steps, timing, evaluations, the best model, stops, checkpoints.

`run_loop(run, stop, progress)` trains from the run's restored step to `num_steps` (or a stop)
and returns (last step, why it stopped or None). Nothing is fetched from the device per step:
the loss every `log_every` steps, each evaluation's scores once. The host runs at most two steps
ahead (it waits on the loss of step s-2, without transferring it).

Each log line and metrics.csv row splits the interval's wall time per step (`step_ms`) from the
part the host spent waiting for the next batch (`data_ms`): a data-bound run shows data_ms close
to step_ms. Evaluations and checkpoint saves are left out of both, and of patches/s; so is the
first step (its compilation). `config.profile_steps` 'A:B' traces the steps after step A up to
step B with `jax.profiler` into WORKDIR/profile/ (open it with TensorBoard's profile plugin or
Perfetto).
"""

from __future__ import annotations

import collections
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bonejax.train import evaluators as evaluators_lib
from bonejax.train import mesh as mesh_lib
from bonejax.train.setup import Run
from bonejax.train.stop import StopRequest


class Meter:
  """The losses, step count and times of one logging interval, and of the whole run."""

  def __init__(self, batch_size: int, start: int):
    self.batch_size = batch_size
    self.pending: list[jax.Array] = []
    self.in_flight: collections.deque = collections.deque()
    self.last_lr = None
    self.t_first: float | None = None  # after the first step: compilation is not throughput
    self.steps_at_first = start
    self.t_log = time.perf_counter()
    self.excluded = self.excluded_total = 0.0  # evaluations and saves
    self.timed, self.data_s = 0, 0.0

  def waited_for_data(self, seconds: float) -> None:
    self.data_s += seconds

  def exclude(self, seconds: float) -> None:
    self.excluded += seconds
    self.excluded_total += seconds

  def stepped(self, out: dict[str, jax.Array], step: int) -> None:
    self.pending.append(out["loss"])
    self.last_lr = out.get("lr")
    self.in_flight.append(out["loss"])
    if len(self.in_flight) > 2:  # bound how far the host runs ahead, without a transfer
      self.in_flight.popleft().block_until_ready()
    self.timed += 1
    if self.t_first is None:
      jax.block_until_ready(out["loss"])
      self.t_first = self.t_log = time.perf_counter()
      self.excluded, self.timed, self.steps_at_first, self.data_s = 0.0, 0, step, 0.0

  def interval(self, step: int) -> dict[str, Any]:
    """The interval's row (fetches its losses), then starts the next interval."""
    fetched, lr = jax.device_get((self.pending, self.last_lr))
    now = time.perf_counter()
    dt = now - self.t_log - self.excluded
    row = {"step": step, "loss": float(np.mean(fetched)),
           "lr": float(lr) if lr is not None else None}
    if self.timed and dt > 0:  # none right after the compiling first step (e.g. at a resume)
      row.update(patches_per_s=self.timed * self.batch_size / dt,
                 step_ms=1e3 * dt / self.timed, data_ms=1e3 * self.data_s / self.timed)
    self.pending, self.t_log, self.excluded, self.timed, self.data_s = [], now, 0.0, 0, 0.0
    return row

  def patches_per_second(self, step: int) -> float | None:
    if self.t_first is None or step <= self.steps_at_first:
      return None
    loop_s = time.perf_counter() - self.t_first - self.excluded_total
    return (step - self.steps_at_first) * self.batch_size / loop_s if loop_s > 0 else None


def describe(row: dict[str, Any]) -> str:
  """The progress line's training part: loss, lr and, when measured, the speed and its split."""
  text = f"loss {row['loss']:.4f}"
  if row.get("lr") is not None:
    text += f" lr {row['lr']:.3g}"
  if row.get("patches_per_s") is not None:
    text += (f" {row['patches_per_s']:.1f} patches/s {row['step_ms']:.1f} ms/step "
             f"(data wait {row['data_ms']:.1f} ms)")
  return text


class Profile:
  """A jax.profiler trace of the steps after step A up to step B (`span` = (A, B))."""

  def __init__(self, directory: Path, span: tuple[int, int] | None, stream):
    self.directory, self.span, self.stream = directory, span, stream
    self.active = False

  def before(self, step: int) -> bool:
    """Starts the trace when the next step is the first to trace; whether it did."""
    if self.span and not self.active and self.span[0] <= step < self.span[1]:
      self.directory.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self.directory))
      self.active, self.first = True, step + 1
      return True
    return False

  def after(self, step: int, out: Any) -> bool:
    """Ends the trace after its last step (once that step has run); whether it did."""
    if self.active and step >= self.span[1]:
      jax.block_until_ready(out)
      self.close()
      self.span = None  # once per run
      print(f"[train] profile of steps {self.first}-{step} written to {self.directory}",
            file=self.stream, flush=True)
      return True
    return False

  def close(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()


def _better(value: float | None, best: float | None, mode: str) -> bool:
  if value is None or not math.isfinite(value):
    return False
  if best is None:
    return True
  return value > best if mode == "max" else value < best


def evaluate(run: Run, step: int, final: bool, meter: Meter, stream) -> tuple[dict, bool, bool]:
  """Runs the evaluators due at `step`: (their row, a new best?, the lr scale changed?)."""
  host, s = run.host, run.s
  best_name, best_metric, mode = s.best
  row: dict[str, Any] = {}
  improved = rescaled = False
  for ev in run.evaluators:
    if not (final or (ev.every_steps and step % ev.every_steps == 0)):
      continue
    t0 = time.perf_counter()
    scores = ev(run.state)
    row.update(evaluators_lib.row(ev.name, scores, run.classes))
    if ev.name == best_name:
      host["last_eval_step"], host["last_scores"] = step, scores
      if _better(scores.get(best_metric), host["best"], mode):
        host["best"], host["best_step"], host["best_scores"] = scores[best_metric], step, scores
        host["bad_evals"], improved = 0, True
      else:
        host["bad_evals"] += 1
    if ev.name == run.plateau_from and s.plateau.update(scores["loss"]):
      rescaled = True
      print(f"[train] step {step}: validation loss plateaued, lr x{s.plateau.scale:g}",
            file=stream, flush=True)
    dt = time.perf_counter() - t0
    meter.exclude(dt)
    shown = " ".join(f"{k} {scores[k]:.4f}" for k in ev.METRICS if scores.get(k) is not None)
    print(f"[eval] step {step}: {ev.name} {shown} ({dt:.1f}s)", file=stream, flush=True)
  return row, improved, rescaled


def _initial_stop(run: Run, start: int) -> str | None:
  stopped = run.host.get("stopped")
  if stopped in ("stop_after", "signal"):
    stopped = None  # a preempted or interrupted run continues ...
  if run.s.stop_after and start >= run.s.stop_after:
    stopped = "stop_after"  # ... unless this call stops there too
  return stopped


def run_loop(run: Run, stop: StopRequest, progress, meter: Meter) -> tuple[int, str | None]:
  s, host = run.s, run.host
  repl = mesh_lib.replicated(run.mesh)
  lr_scale = jax.device_put(np.float32(s.plateau.scale), repl)
  step = int(host["step"])
  stopped = _initial_stop(run, step)
  profile = Profile(run.workdir / "profile", s.profile, progress.stream)
  extra = ""
  try:
    while step < s.num_steps and stopped is None:
      t0 = time.perf_counter()
      if profile.before(step):
        meter.exclude(time.perf_counter() - t0)  # starting a trace is not step time
        t0 = time.perf_counter()
      batch = next(run.feed)
      meter.waited_for_data(time.perf_counter() - t0)
      with jax.transfer_guard("disallow"):  # the step never moves data to or from the host
        run.state, out = run.train_step(run.state, batch, lr_scale)
      step += 1
      meter.stepped(out, step)
      t0 = time.perf_counter()
      if profile.after(step, out["loss"]):
        meter.exclude(time.perf_counter() - t0)  # nor writing it

      row: dict[str, Any] = {}
      if step % s.log_every == 0 or step == s.num_steps:
        row = meter.interval(step)
        extra = describe(row)
        if not math.isfinite(row["loss"]):
          stopped = "nan"
      final = step == s.num_steps or stopped == "nan"
      evals, improved, rescaled = evaluate(run, step, final, meter, progress.stream)
      if evals:
        row.update(evals, step=step)
      if rescaled:
        lr_scale = jax.device_put(np.float32(s.plateau.scale), repl)
      patience = int(run.config.early_stopping_patience)
      if patience > 0 and host["bad_evals"] >= patience and stopped is None:
        stopped = "early_stopping"
      if s.stop_after and step >= s.stop_after and stopped is None:
        stopped = "stop_after"
      if stopped is None and stop.should_stop(step, s.log_every, jax.process_count()):
        stopped = "signal"  # a checkpoint at this step follows
      host.update(step=step, data=run.feed.get_state(), plateau=s.plateau.get_state(),
                  stopped=stopped)
      run.csv.append(row)
      run.tensorboard.scalars(step, {k: v for k, v in row.items() if k != "step"})
      if (s.checkpoint_every and step % s.checkpoint_every == 0) or step == s.num_steps or \
          stopped or improved:
        t0 = time.perf_counter()
        run.ckpts.save(step, run.state, host)  # returns once the arrays are on the host
        if improved:  # the latest checkpoint that names this step best exists before the best
          run.ckpts.wait()
          run.best.save(step, run.state, host["best_scores"])
        meter.exclude(time.perf_counter() - t0)
      progress.update(1, extra)
  finally:
    profile.close()
  return step, stopped
