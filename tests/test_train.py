"""The trainer: outputs, determinism, exact resume (stop_after and a real SIGKILL), bad input.

Everything runs the smoke demo config (U-Net depth 2 width 4, 32-px patches) on 3 phantom scans
of 32 x 48 x 48, sharded over the suite's 4 fake CPU devices.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from bonejax import cli
from bonejax.train import configlib, trainer
from bonejax.train.checkpoint import load_state

REPO = Path(__file__).resolve().parents[1]
STEPS = 8


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
  from bonejax import phantom
  path = tmp_path_factory.mktemp("tiny") / "data"
  phantom.make_dataset(path, num_scans=3, shape=(32, 48, 48), seed=0, progress=False)
  return path


def _config(dataset_path, **overrides):
  c = configlib.load_config_file(str(REPO / "configs/demo.py") + ":smoke")
  c.dataset = str(dataset_path)
  c.num_steps, c.batch_size, c.val_batch_size = STEPS, 8, 4
  c.eval_every, c.checkpoint_every, c.log_every = 4, 4, 2
  for k, v in overrides.items():
    c[k] = v
  return c


def _assert_same_state(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)  # bitwise: same program, same inputs


def _subprocess_env(tmp_root):
  # A shared persistent compilation cache: the resumed process reuses the killed one's
  # executables instead of compiling them again.
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4", PYTHONPATH=str(REPO),
              JAX_COMPILATION_CACHE_DIR=str(tmp_root / "jax_cache"))


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory):
  """One uninterrupted run: (result, workdir)."""
  workdir = tmp_path_factory.mktemp("reference")
  return trainer.train(_config(tiny_dataset), workdir), workdir


def test_outputs(reference):
  result, workdir = reference
  json.dumps(cli.to_jsonable(result))
  assert result["steps"] == STEPS and result["devices"] == jax.device_count()
  assert 0.0 <= result["best_val_miou"] <= 1.0 and result["best_step"] in (4, 8)
  assert result["patches_per_second"] > 0 and result["seconds"] > 0
  for name in ("config.json", "split.json", "metrics.csv", "curves.png", "model/model.json"):
    assert (workdir / name).exists(), name
  meta = json.loads((workdir / "model/model.json").read_text())
  assert meta["model"] == "unet" and meta["classes"] == ["background", "bone", "pore"]
  assert meta["model_kwargs"] == {"depth": 2, "width": 4} and meta["patch_size"] == 32
  split = json.loads((workdir / "split.json").read_text())
  assert not set(split["train"]) & set(split["val"])
  rows = (workdir / "metrics.csv").read_text().splitlines()
  assert rows[0].startswith("step,loss,lr,patches_per_s,val_loss,val_miou_all,val_miou_fg")
  assert [int(r.split(",")[0]) for r in rows[1:]] == [2, 4, 6, 8]
  # A finished run asked again returns at once with the same answer.
  again = trainer.train(_config(json.loads((workdir / "config.json").read_text())["dataset"]),
                        workdir)
  assert again["steps_this_run"] == 0 and again["best_val_miou"] == result["best_val_miou"]


def test_stop_and_resume_equals_uninterrupted(reference, tiny_dataset, tmp_path):
  _, ref_dir = reference
  first = trainer.train(_config(tiny_dataset, stop_after=5), tmp_path)
  assert first["steps"] == 5 and first["stopped"] == "stop_after"
  second = trainer.train(_config(tiny_dataset), tmp_path)
  assert second["resumed_from"] == 5 and second["steps"] == STEPS
  _assert_same_state(load_state(tmp_path)[1], load_state(ref_dir)[1])
  assert second["best_val_miou"] == reference[0]["best_val_miou"]
  # No duplicated or lost rows; the same validation scores. (The train loss logged at step 6
  # averages steps 5-6 in one run and step 6 alone in the other.)
  cut = lambda p: [r.split(",")[:1] + r.split(",")[4:] for r in p.read_text().splitlines()]
  assert cut(tmp_path / "metrics.csv") == cut(ref_dir / "metrics.csv")


def test_sigkill_and_resume_equals_uninterrupted(reference, tiny_dataset, tmp_path):
  _, ref_dir = reference
  workdir = tmp_path / "run"
  cmd = [sys.executable, str(REPO / "launch/train.py"), "--config=configs/demo.py:smoke",
         f"--workdir={workdir}", f"--config.dataset={tiny_dataset}",
         f"--config.num_steps={STEPS}", "--config.batch_size=8", "--config.val_batch_size=4",
         "--config.eval_every=4", "--config.log_every=2", "--config.checkpoint_every=1"]
  env = _subprocess_env(tmp_path)
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if (workdir / "checkpoints" / "2").exists():  # a finished checkpoint (renamed when done)
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.01)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  killed_at = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert killed_at < STEPS
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["resumed_from"] is not None and result["steps"] == STEPS
  _assert_same_state(load_state(workdir)[1], load_state(ref_dir)[1])


@pytest.mark.parametrize("overrides, message", [
    (dict(train_scans=("scan_000", "scan_001"), val_scans=("scan_001",)), "leaks"),
    (dict(batch_size=6), "multiple of the 4 devices"),
    (dict(model=dict(name="vgg", kwargs={})), "unknown model"),
    (dict(dataset="/nonexistent/data"), "does not exist"),
    (dict(loss={"hinge": 1.0}), "unknown loss"),
])
def test_bad_input_is_refused(tiny_dataset, tmp_path, overrides, message):
  with pytest.raises(cli.UserError, match=message):
    trainer.train(_config(tiny_dataset, **overrides), tmp_path)
  assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_cli_one_line_errors(tiny_dataset, tmp_path):
  base = [sys.executable, str(REPO / "launch/train.py"), f"--workdir={tmp_path}"]
  env = _subprocess_env(tmp_path)
  for args, message in [
      (["--config=configs/demo.py:smoke", "--config.bogus=1"], "unknown config key 'bogus'"),
      (["--config=configs/nope.py"], "does not exist"),
      (["--config=configs/demo.py:smoke", "--config.dataset=/nonexistent"], "does not exist"),
  ]:
    out = subprocess.run(base + args, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], out.stderr
    assert "Traceback" not in out.stderr
