"""The volume evaluator with two processes (gloo on CPU): both predict the validation scan,
process 0's confusion matrix is broadcast, and the run ends with the same score the exported
bundle gives when predicted whole in this process; only process 0 holds the workdir lock.

One training step of the smoke config (U-Net depth 2 width 4), one fake CPU device per process.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bonejax import predict
from bonejax.data import store
from bonejax.evaluate import metrics
from bonejax.models import bundle

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_agree_on_the_volume_score(tiny_dataset, tmp_path):
  workdir = tmp_path / "multi"
  overrides = [f"--config.dataset={tiny_dataset}", "--config.num_steps=1",
               "--config.batch_size=4", "--config.checkpoint_every=1", "--config.log_every=1",
               "--config.evaluators.val.type=volume", "--config.augment.enabled=False"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", PYTHONPATH=str(REPO))
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, str(REPO / "launch/train.py"), "--config=configs/demo.py:smoke",
       f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}", *overrides],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
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
