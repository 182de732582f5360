"""The workdir's guards and the honest messages of a training run (issue 26, items 4, 5, 9, 10):

- one writer per workdir: a second training into a workdir a live run holds is refused with one
  line; the lock of a killed run is taken over;
- a workdir equal to or inside the dataset, a scan or a scan's image is refused before anything
  is written (the dataset is unchanged);
- the first progress line after a resume has no rate rather than `nan patches/s`;
- checkpoint fallback only for damage: a device OOM or a transient I/O error while reading the
  newest step is raised and nothing is set aside, and process 0's decision is everyone's.

Trains the smoke config (U-Net depth 2 width 4) for 2 steps at most; most checks stop before
the first step.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bonejax.core import errors
from bonejax.train import checkpoint, loop, trainer
from train_helpers import smoke_config

REPO = Path(__file__).resolve().parents[1]


def _tree(path: Path) -> dict[str, int]:
  return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


# -- one writer per workdir -----------------------------------------------------------------------


def _hold_lock(workdir: Path, tmp_path: Path) -> subprocess.Popen:
  """Another process holding the workdir as a training does (until killed)."""
  code = ("import sys, time\nfrom bonejax.core import outputs\n"
          "with outputs.claim_output(sys.argv[1], '--workdir'):\n"
          "  print('held', flush=True)\n  time.sleep(600)\n")
  proc = subprocess.Popen([sys.executable, "-c", code, str(workdir)], cwd=REPO,
                          stdout=subprocess.PIPE, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_second_writer_is_refused_and_a_dead_ones_lock_taken_over(tiny_dataset, tmp_path):
  workdir = tmp_path / "run"
  holder = _hold_lock(workdir, tmp_path)
  try:
    with pytest.raises(errors.UserError, match=rf"--workdir .*run.* is being written by another "
                       rf"bonejax run \(process {holder.pid}\)"):
      trainer.train(smoke_config(tiny_dataset, num_steps=1), workdir)
    assert not workdir.exists()  # refused before anything was written
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # The killed holder's lock file may stay; its flock went with the process: taken over.
  result = trainer.train(smoke_config(tiny_dataset, num_steps=1, eval_every=1), workdir)
  assert result["steps"] == 1


# -- no workdir inside an input -------------------------------------------------------------------


@pytest.mark.parametrize("where", ["dataset", "scan", "image", "below"])
def test_a_workdir_inside_the_dataset_is_refused(tiny_dataset, where):
  scan = sorted(p for p in tiny_dataset.iterdir() if p.is_dir())[0]
  workdir = {"dataset": tiny_dataset, "scan": scan, "image": scan / "image",
             "below": scan / "image" / "new" / "run"}[where]
  before = _tree(tiny_dataset)
  with pytest.raises(errors.UserError, match="is inside the dataset .*a run never writes into "
                     "its inputs"):
    trainer.train(smoke_config(tiny_dataset, num_steps=1), workdir)
  assert _tree(tiny_dataset) == before  # nothing written, no lock beside it either


def test_a_symlinked_workdir_into_the_dataset_is_refused(tiny_dataset, tmp_path):
  link = tmp_path / "link"
  link.symlink_to(tiny_dataset)
  with pytest.raises(errors.UserError, match="is inside the dataset"):
    trainer.train(smoke_config(tiny_dataset, num_steps=1), link / "run")


# -- messages -------------------------------------------------------------------------------------


def test_the_first_interval_after_a_resume_has_no_rate():
  # A resumed run's first step compiles and is left out of the timing: its log row has no
  # rate, and the line says nothing about one (it said "nan patches/s").
  meter = loop.Meter(batch_size=8, start=5)
  meter.stepped({"loss": jnp.float32(0.5), "lr": jnp.float32(1e-3)}, 6)
  row = meter.interval(6)
  assert row["loss"] == 0.5 and "patches_per_s" not in row and "step_ms" not in row
  line = loop.describe(row)
  assert "nan" not in line and "patches/s" not in line and line.startswith("loss 0.5000")
  # The next interval is measured, its data wait a part of its step time.
  meter.waited_for_data(0.0)
  meter.stepped({"loss": jnp.float32(0.25), "lr": jnp.float32(1e-3)}, 7)
  time.sleep(0.01)
  row = meter.interval(7)
  assert row["patches_per_s"] > 0 and 0 <= row["data_ms"] <= row["step_ms"]
  assert "patches/s" in loop.describe(row)


# -- checkpoint fallback only for damage ----------------------------------------------------------


class _Oom(RuntimeError):
  pass


@pytest.mark.parametrize("error, damage", [
    (json.JSONDecodeError("Expecting value", "", 0), True),
    (ValueError("DATA_LOSS: Error reading ...: truncated"), True),
    (FileNotFoundError(errno.ENOENT, "No such file", "manifest.ocdbt"), True),
    (_Oom("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB"), False),
    (ValueError("UNAVAILABLE: Error reading: Connection reset"), False),
    (OSError(errno.EIO, "Input/output error"), False),
    (TimeoutError(errno.ETIMEDOUT, "timed out"), False),
    (PermissionError(errno.EACCES, "Permission denied"), False),
    (MemoryError(), False),
    (RuntimeError("something else"), False),
])
def test_what_counts_as_damage(error, damage):
  assert checkpoint.is_damage(error) is damage


@pytest.fixture(scope="module")
def run2(tiny_dataset, tmp_path_factory):
  """Two steps, a checkpoint after each: (workdir, config)."""
  workdir = tmp_path_factory.mktemp("run2") / "run"
  c = smoke_config(tiny_dataset, num_steps=2, eval_every=1, checkpoint_every=1,
                   keep_checkpoints=5)
  trainer.train(c, workdir)
  return workdir, c


@pytest.mark.parametrize("error", [_Oom("RESOURCE_EXHAUSTED: out of memory"),
                                   OSError(errno.EIO, "Input/output error")])
def test_an_oom_or_io_error_sets_nothing_aside(run2, monkeypatch, capfd, error):
  workdir, c = run2
  steps = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  real = checkpoint.Checkpoints.restore

  def failing(self, step, like):
    if self.directory.name == "checkpoints":
      raise error
    return real(self, step, like)

  monkeypatch.setattr(checkpoint.Checkpoints, "restore", failing)
  with pytest.raises(type(error)):
    trainer.train(c, workdir)
  err = capfd.readouterr().err
  assert "not damage, so nothing was moved aside" in err and "bound method" not in err
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == steps
  assert not (workdir / "checkpoints.corrupt").exists()


def test_process_0_decides_for_all(monkeypatch):
  # Two processes, faked: process 0 read the step, process 1 found it damaged. Process 0
  # decides from both outcomes (the worst: fall back) and broadcasts; process 1 takes that.
  from jax.experimental import multihost_utils
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: np.asarray([checkpoint._OK, checkpoint._DAMAGE], np.int32))
  sent = []
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: sent.append(x) or x)
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  assert checkpoint._agree(checkpoint._OK) == checkpoint._DAMAGE
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: sent[0])
  assert checkpoint._agree(checkpoint._DAMAGE) == checkpoint._DAMAGE
  assert len(sent) == 1  # only process 0's value was sent


def test_fallback_messages_name_no_bound_methods():
  e = ValueError("DATA_LOSS: reading <bound method pybind11_object.read of <ts.TensorStore at "
                 "0x7f>> failed: truncated")
  assert checkpoint._reason(e) == "ValueError: DATA_LOSS: reading failed: truncated"


def test_an_absurd_batch_is_refused_before_anything_is_allocated():
  from bonejax.core import errors
  from bonejax.train import setup
  with pytest.raises(errors.UserError, match=r"batch_size=100000000 .* needs .* of memory"):
    setup._check_batch_memory(100000000, 32, 1)
  with pytest.raises(errors.UserError, match=r"patch_size=1048576"):
    setup._check_batch_memory(4, 1048576, 1)
  setup._check_batch_memory(8, 64, 1)  # an ordinary batch passes
