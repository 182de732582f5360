"""The volume evaluator with two processes (gloo on CPU): both predict the validation scan,
process 0's confusion matrix is broadcast, and the run ends with the same score the exported
bundle gives when predicted whole in this process; only process 0 holds the workdir lock.

One training step of the smoke config (U-Net depth 2 width 4), one fake CPU device per process.

A 3D model the same way (configs/unet3d.py:smoke, unet3d depth 2 width 4, 16^3 patches, 3D
augmentation on): two processes drawing their shares of each batch with the 3D device sampler
give the loss curve, validation score and weights of one process over two devices drawing the
same global batches from the host stream.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from bonejax import predict
from bonejax.data import store
from bonejax.evaluate import metrics
from bonejax.models import bundle
from bonejax.train import configlib, curves, trainer
from bonejax.train.checkpoint import load_state

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train_two_processes(config: str, workdir, overrides) -> list[dict]:
  """launch/train.py as 2 processes of one CPU device each (gloo); their result lines."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", PYTHONPATH=str(REPO))
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, str(REPO / "launch/train.py"), f"--config={config}",
       f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}", *overrides],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  try:
    outs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def test_two_processes_agree_on_the_volume_score(tiny_dataset, tmp_path):
  workdir = tmp_path / "multi"
  overrides = [f"--config.dataset={tiny_dataset}", "--config.num_steps=1",
               "--config.batch_size=4", "--config.checkpoint_every=1", "--config.log_every=1",
               "--config.evaluators.val.type=volume", "--config.augment.enabled=False"]
  results = _train_two_processes("configs/demo.py:smoke", workdir, overrides)
  assert [r["processes"] for r in results] == [2, 2]
  assert results[0]["best_val"] == results[1]["best_val"]  # one decision for both
  assert not list(tmp_path.glob(".multi.lock"))  # released at the end

  b = bundle.load_bundle(workdir / "model")
  dataset = store.open_dataset(tiny_dataset)
  k = len(b.classes)
  cm = np.zeros((k, k), np.int64)
  for name in results[0]["split"]["val"]:
    scan = dataset.open_scan(name)
    labels = predict.predict_volume(b, scan, stats=scan.stats, rule=b.normalization, planes=3,
                                    vote="soft")
    cm += metrics.confusion_matrix(labels, scan.read_labels(), k)
  # Another batch layout (4 devices here, 1 per process there): a voxel may flip.
  assert results[0]["best_val"]["miou_fg"] == pytest.approx(
      metrics.scores(cm, b.classes)["miou_fg"], abs=1e-3)


def test_3d_two_processes_equal_one(tiny_dataset, tmp_path):
  """3D: each process draws its half of every batch (device sampler), augmented in 3D on the
  sharded batch; one process over 2 devices from the host stream is the reference."""
  steps = 3
  fields = dict(dataset=str(tiny_dataset), num_steps=steps, batch_size=4, val_batch_size=2,
                eval_every=steps, checkpoint_every=steps, log_every=1, val_max_crops=2)
  # Mirrors and intensity draws per example; rotations and axis orders off (their branches
  # cost compile time, not coverage of the sharded draws).
  augment = {"augment.rot90": False, "augment.permute_axes": False}
  results = _train_two_processes(
      "configs/unet3d.py:smoke", tmp_path / "multi",
      [f"--config.{k}={v}" for k, v in {**fields, **augment}.items()]
      + ["--config.sampler=device"])
  assert [(r["processes"], r["devices"], r["steps"]) for r in results] == [(2, 2, steps)] * 2
  assert results[0]["sampler"].startswith("device") and results[0]["model"] == "unet3d"

  c = configlib.load_config_file(str(REPO / "configs/unet3d.py") + ":smoke")
  c.update(fields)
  c.augment.rot90 = c.augment.permute_axes = False
  c.sampler = "host"
  single = trainer.train(c, tmp_path / "single", devices=jax.devices()[:2])
  assert single["sampler"] == "host"
  multi_rows = curves.read_rows(tmp_path / "multi" / "metrics.csv")
  single_rows = curves.read_rows(tmp_path / "single" / "metrics.csv")
  losses = lambda rows: [float(r["loss"]) for r in rows if r.get("loss")]  # noqa: E731
  assert len(losses(single_rows)) == steps
  np.testing.assert_allclose(losses(multi_rows), losses(single_rows), rtol=1e-5)
  assert results[0]["best_val"]["miou_fg"] == pytest.approx(single["best_val"]["miou_fg"],
                                                            abs=1e-5)
  _, multi_state = load_state(tmp_path / "multi")
  _, single_state = load_state(tmp_path / "single")
  for a, b in zip(jax.tree.leaves(multi_state), jax.tree.leaves(single_state)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
