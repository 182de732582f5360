"""The trainer: outputs, determinism, exact resume (stop_after, a real SIGKILL, a clean stop on
SIGINT), bad input (config values, damaged scans, labels without a class) refused with nothing
left behind, the run's record kept honest, and validation streamed from the host equal to
device-resident.

Everything runs the smoke demo config (U-Net depth 2 width 4, 32-px patches) on 3 phantom scans
of 32 x 48 x 48, sharded over the suite's 4 fake CPU devices.
"""

import csv
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

from bonejax.core import errors, jsonable
from bonejax.train import configlib, trainer
from bonejax.train.checkpoint import load_state
from train_helpers import smoke_config

REPO = Path(__file__).resolve().parents[1]
STEPS = 8


def _config(dataset_path, **overrides):
  # STEPS steps, evaluated at every checkpoint (every 4 steps).
  return smoke_config(dataset_path, **{"num_steps": STEPS, "eval_every": 4, **overrides})


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
  json.dumps(jsonable.to_jsonable(result))
  assert result["steps"] == STEPS and result["devices"] == jax.device_count()
  assert result["best_step"] in (4, 8)
  assert result["sampler"] == "device (replicated)"  # the default, auto, on scans this small
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
  # The best model is the evaluation with the highest val_miou_fg (best_metric), first on ties.
  evals = [(float(r["val_miou_fg"]), int(r["step"]))
           for r in csv.DictReader(rows) if r["val_miou_fg"]]
  assert [s for _, s in evals] == [4, 8]
  best = max(evals, key=lambda e: (e[0], -e[1]))
  assert (result["best_val_miou"], result["best_step"]) == pytest.approx(best, abs=1e-6)
  # A finished run asked again returns at once with the same answer.
  again = trainer.train(_config(json.loads((workdir / "config.json").read_text())["dataset"]),
                        workdir)
  assert again["steps_this_run"] == 0 and again["best_val_miou"] == result["best_val_miou"]


def test_stop_and_resume_equals_uninterrupted(reference, tiny_dataset, tmp_path):
  _, ref_dir = reference
  first = trainer.train(_config(tiny_dataset, stop_after=5), tmp_path)
  assert first["steps"] == 5 and first["stopped"] == "stop_after"
  again = trainer.train(_config(tiny_dataset, stop_after=5), tmp_path)  # the same preemption
  assert again["steps"] == 5 and again["steps_this_run"] == 0 and again["stopped"] == "stop_after"
  second = trainer.train(_config(tiny_dataset), tmp_path)
  assert second["resumed_from"] == 5 and second["steps"] == STEPS
  _assert_same_state(load_state(tmp_path)[1], load_state(ref_dir)[1])
  assert second["best_val_miou"] == reference[0]["best_val_miou"]
  # No duplicated or lost rows; the same validation scores. (The train loss logged at step 6
  # averages steps 5-6 in one run and step 6 alone in the other; the last two columns are
  # timings.)
  cut = lambda p: [r.split(",")[:1] + r.split(",")[4:-2] for r in p.read_text().splitlines()]
  assert cut(tmp_path / "metrics.csv") == cut(ref_dir / "metrics.csv")


def test_host_and_device_paths_train_the_same(reference, tiny_dataset, tmp_path, monkeypatch,
                                              capsys):
  # The reference ran on the device sampler. With a budget nothing fits, sampler=device is
  # refused in one line naming the sizes, and auto falls back to the host path with one warning;
  # that run, resumed on the device path, ends in the reference's state, bit for bit.
  from bonejax.data import device_sampler
  budget = device_sampler.device_budget
  monkeypatch.setattr(device_sampler, "device_budget", lambda devices, mb=0: 1000)
  with pytest.raises(errors.UserError, match=r"sampler=device: 2 training scan\(s\), [\d,]+ voxels: "
                     r"uint16 images \+ uint8 labels = .* per device replicated, .* sharded "
                     r"over 4 devices: over the budget of 1.0 KiB per device"):
    trainer.train(_config(tiny_dataset, sampler="device"), tmp_path / "refused")
  assert not (tmp_path / "refused").exists()
  capsys.readouterr()
  first = trainer.train(_config(tiny_dataset, stop_after=5), tmp_path / "run")
  warnings = [w for w in capsys.readouterr().err.splitlines() if w.startswith("warning:")]
  assert len(warnings) == 1 and warnings[0].startswith("warning: sampler=auto: ") and \
      warnings[0].endswith("training from the host patch stream"), warnings
  assert first["sampler"] == "host" and first["steps"] == 5
  monkeypatch.setattr(device_sampler, "device_budget", budget)
  second = trainer.train(_config(tiny_dataset, sampler="device"), tmp_path / "run")
  assert second["sampler"] == "device (replicated)" and second["resumed_from"] == 5
  _assert_same_state(load_state(tmp_path / "run")[1], load_state(reference[1])[1])
  assert second["best_val_miou"] == reference[0]["best_val_miou"]


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


def test_sigint_stops_cleanly_and_resumes(reference, tiny_dataset, tmp_path):
  # Ctrl-C (as napari's Stop sends it): the step in progress finishes, a checkpoint is written
  # at it, one line says so, the result JSON says "stopped": "signal" and the exit code is 0.
  # The same run resumed ends in the uninterrupted run's state, bit for bit.
  _, ref_dir = reference
  workdir = tmp_path / "run"
  cmd = [sys.executable, str(REPO / "launch/train.py"), "--config=configs/demo.py:smoke",
         f"--workdir={workdir}", f"--config.dataset={tiny_dataset}",
         f"--config.num_steps={STEPS}", "--config.batch_size=8", "--config.val_batch_size=4",
         "--config.eval_every=2", "--config.log_every=1", "--config.checkpoint_every=0"]
  err = open(tmp_path / "stderr", "w")
  proc = subprocess.Popen(cmd, cwd=REPO, env=_subprocess_env(tmp_path), stdout=subprocess.PIPE,
                          stderr=err, text=True)
  deadline = time.time() + 300
  metrics = workdir / "metrics.csv"
  while time.time() < deadline and proc.poll() is None:  # after step 1 (the eval at 2 compiles)
    if metrics.exists() and any(r.startswith("1,") for r in metrics.read_text().splitlines()):
      proc.send_signal(signal.SIGINT)
      break
    time.sleep(0.01)
  out, _ = proc.communicate(timeout=300)
  err.close()
  log = (tmp_path / "stderr").read_text()
  assert proc.returncode == 0, log[-2000:]
  result = json.loads(out.strip().splitlines()[-1])
  stopped_at = result["steps"]
  assert result["stopped"] == "signal" and 1 <= stopped_at < STEPS, result
  assert (workdir / "checkpoints" / str(stopped_at)).is_dir()
  assert log.count("[train] stopped by SIGINT") == 1 and \
      f"after step {stopped_at}, checkpoint written" in log
  # The progress line says it stopped, never "done" (it did not reach num_steps).
  assert not [l for l in log.splitlines() if l.endswith(" done")], log[-2000:]
  assert f"{stopped_at}/{STEPS} steps" in log and "stopped by a signal" in log
  second = trainer.train(_config(tiny_dataset), workdir)
  assert second["resumed_from"] == stopped_at and second["steps"] == STEPS
  _assert_same_state(load_state(workdir)[1], load_state(ref_dir)[1])


def test_a_second_signal_aborts_at_once():
  from bonejax.train.stop import StopRequest
  before = signal.getsignal(signal.SIGINT)
  stop = StopRequest()
  with pytest.raises(KeyboardInterrupt):
    with stop.installed():
      os.kill(os.getpid(), signal.SIGINT)
      for _ in range(100):  # the handler runs between bytecodes of the main thread
        if stop.requested:
          break
        time.sleep(0.01)
      assert stop.name == "SIGINT"
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(5)  # interrupted
  assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("overrides, message", [
    (dict(train_scans=("scan_000", "scan_001"), val_scans=("scan_001",)), "leaks"),
    (dict(batch_size=6), "multiple of the 4 devices"),
    (dict(model=dict(name="vgg", kwargs={})), "unknown model"),
    (dict(dataset="/nonexistent/data"), "does not exist"),
    (dict(loss={"hinge": 1.0}), "unknown loss"),
    # Absurd values, each refused naming its field (issue 13.9/13.10).
    (dict(seed=-1), r"config.seed=-1 must be in \[0, "),
    (dict(checkpoint_every=-1), "config.checkpoint_every=-1 must be >= 0"),
    (dict(eval_every=-5), "config.eval_every=-5 must be >= 0"),
    (dict(log_every=-1), "config.log_every=-1 must be >= 0"),
    (dict(batch_size=0), "config.batch_size=0 must be >= 1"),
    (dict(patches_per_plane=0), "config.patches_per_plane=0 must be >= 1"),
    (dict(val_stride=0), "config.val_stride=0 must be >= 1"),
    (dict(keep_checkpoints=0), "config.keep_checkpoints=0 must be >= 1"),
    (dict(stop_after=-2), "config.stop_after=-2 must be >= 0"),
    (dict(val_fraction=1.5), r"config.val_fraction=1.5 must be in \(0.0, 1.0\)"),
    (dict(axes=(0, 3)), "config.axes=.* must be distinct axes"),
    (dict(sampler="gpu"), "config.sampler='gpu' must be auto, device or host"),
    (dict(sampler_device_mb=-1), "config.sampler_device_mb=-1 must be >= 0"),
    (dict(optimizer=dict(configlib.default_config().optimizer.to_dict(), weight_decay=1e-4)),
     "adam does not use weight_decay"),
    (dict(optimizer=dict(name="adam")), "config lacks field.*optimizer.lr"),
])
def test_bad_input_is_refused(tiny_dataset, tmp_path, overrides, message):
  workdir = tmp_path / "new" / "run"
  with pytest.raises(errors.UserError, match=message):
    trainer.train(_config(tiny_dataset, **overrides), workdir)
  assert not (tmp_path / "new").exists()  # nothing left behind, not even the directories


def test_failed_run_removes_only_what_it_created(tiny_dataset, tmp_path):
  # An unknown model fails after the split: config.json and split.json used to stay behind.
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(errors.UserError, match="unknown model"):
    trainer.train(_config(tiny_dataset, model=dict(name="vgg", kwargs={})), tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
  # A phantom made for the run goes too when the run fails before its first checkpoint.
  c = _config("", model=dict(name="vgg", kwargs={}))
  c.phantom.num_scans, c.phantom.shape = 3, (32, 32, 32)
  with pytest.raises(errors.UserError, match="unknown model"):
    trainer.train(c, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_refused_config_change_leaves_the_record_alone(tiny_dataset, tmp_path):
  trainer.train(_config(tiny_dataset, stop_after=1), tmp_path)
  record = (tmp_path / "config.json").read_text()
  with pytest.raises(errors.UserError, match="loss differ"):
    trainer.train(_config(tiny_dataset, loss={"ce": 1.0}), tmp_path)
  assert (tmp_path / "config.json").read_text() == record


def _damaged_copy(tiny_dataset, tmp_path, how):
  import shutil
  from bonejax.data import store
  root = tmp_path / "data"
  shutil.copytree(tiny_dataset, root)
  if how == "labels":
    arr = store.open_array(root / "scan_001" / "labels", write=True)
    arr[:, :, :].write(np.full(arr.shape, 7, np.uint8)).result()
  elif how == "chunk":
    for chunk in (root / "scan_000" / "image" / "c").rglob("*"):
      if chunk.is_file():
        chunk.write_bytes(b"garbage")
  else:
    (root / "scan_000" / "image" / "zarr.json").write_text('{"zarr_format": 3, "node_ty')
  return root


@pytest.mark.parametrize("how, message", [
    ("labels", "scan 'scan_001' has label value 7, but its dataset has 3 classes"),
    ("chunk", "cannot read the image of scan 'scan_000'"),
    ("zarr_json", "scan_000/image"),
])
def test_bad_scans_are_bad_input(tiny_dataset, tmp_path, how, message):
  # Labels beyond the classes used to train silently; a damaged chunk crashed (exit 3).
  data = _damaged_copy(tiny_dataset, tmp_path, how)
  with pytest.raises(errors.UserError, match=message):
    trainer.train(_config(data, train_scans=("scan_000", "scan_001"), val_scans=("scan_002",)),
                  tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_streamed_validation_equals_device_resident(reference, tiny_dataset, tmp_path,
                                                    monkeypatch):
  from bonejax.data import validation
  calls = []
  original = validation.validation_batches
  monkeypatch.setattr(validation, "validation_batches",
                      lambda *a, **k: calls.append(1) or original(*a, **k))
  result = trainer.train(_config(tiny_dataset, val_device_limit_mb=0), tmp_path)
  assert len(calls) == 2  # read again at each of the 2 evaluations: nothing kept on the device
  ref, ref_dir = reference
  assert result["best_val"] == ref["best_val"] and result["final_val"] == ref["final_val"]
  val = lambda p: [r.split(",")[4:-2] for r in p.read_text().splitlines()]  # noqa: E731
  assert val(tmp_path / "metrics.csv") == val(ref_dir / "metrics.csv")


def test_cli_one_line_errors(tiny_dataset, tmp_path):
  base = [sys.executable, str(REPO / "launch/train.py"), f"--workdir={tmp_path}"]
  env = _subprocess_env(tmp_path)
  for args, message in [
      (["--config=configs/demo.py:smoke", "--config.bogus=1"], "unknown config key 'bogus'"),
      (["--config=configs/nope.py"], "does not exist"),
      (["--config=configs/demo.py:smoke", "--config.dataset=/nonexistent"], "does not exist"),
      (["--config=configs/demo.py:smoke", f"--config.dataset={tiny_dataset}",
        "--config.seed=-1"], "config.seed=-1 must be in"),
  ]:
    out = subprocess.run(base + args, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], out.stderr
    assert "Traceback" not in out.stderr
  assert {p.name for p in tmp_path.iterdir()} <= {"jax_cache"}  # the refused runs left nothing


def test_bone_recipe_config_and_older_fingerprints():
  from bonejax.train import augment, optim
  c = configlib.load_config_file(str(REPO / "configs/bone_dlfit.py"))
  configlib.check(c)
  assert (c.model.name, c.patch_size, c.patches_per_plane, c.batch_size) == (
      "unet_resnet18", 256, 4, 32)
  assert (c.optimizer.name, c.optimizer.lr, c.schedule.name) == ("adam", 1e-3, "cosine")
  assert np.isclose(float(optim.make_schedule(c.schedule, 1e-3, 100)(100)), 1e-6)
  assert dict(c.loss) == {"jaccard": 1.0} and c.dtype == "bfloat16"
  assert (c.normalization, c.best_metric) == ("zscore_nonzero", "miou_all")
  a = augment.resolve_config(c.augment)
  assert set(a.one_of) == {"none", "flip_h", "flip_v", "rot90", "rot180", "rot270"}
  assert not (a.crop or a.flip_h or a.rotate_degrees or a.elastic_prob or a.contrast)
  assert (a.brightness, a.brightness_prob, a.scale, a.scale_prob, a.clip) == (
      0.15, 0.4, (0.75, 1.25), 0.4, (-5.0, 5.0))
  assert configlib.load_config_file(str(REPO / "configs/bone_dlfit.py") + ":context=2"
                                    ).context_slices == 2
  # A run written before context_slices, the pretrained fields and the BONe augment options
  # existed resumes under today's config: its fingerprint lacks them, at their old meaning.
  d = configlib.default_config().to_dict()
  del d["context_slices"]
  for k in ("init_from", "encoder_weights", "freeze_encoder_steps"):
    del d["model"][k]
  for k in augment.ADDED_DEFAULTS:
    del d["augment"][k]
  old = configlib.normalize_fingerprint({k: jsonable.to_jsonable(d[k])
                                         for k in configlib.TRAJECTORY_KEYS if k in d})
  assert old == configlib.fingerprint(configlib.default_config())
  changed = configlib.default_config()
  changed.context_slices = 1
  assert configlib.fingerprint(changed) != old
  with pytest.raises(errors.UserError, match="in_channels=2 does not fit context_slices=1"):
    changed.in_channels = 2
    configlib.check(changed)
