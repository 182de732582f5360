"""launch/demo.py: a run that fails before training has checkpointed leaves nothing behind."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_failed_demo_removes_its_workdir(tmp_path):
  # The phantom is made first, then training refuses the model: data/ and the new directories go.
  workdir = tmp_path / "new" / "demo"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  out = subprocess.run([sys.executable, str(REPO / "launch/demo.py"), f"--workdir={workdir}",
                        "--config=configs/demo.py:smoke", "--num_scans=3", "--shape=32,32,32",
                        "--config.model.name=vgg"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 2, out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith("error: model: unknown model 'vgg'")
  assert not (tmp_path / "new").exists()


def test_demo_success_path_on_a_smoke_budget(tmp_path):
  """The README's first command, shrunk (configs/demo.py:smoke, 3 small scans): exit 0, the
  contract's JSON, and its soft-vote score equal to the written prediction scored here."""
  import json

  import numpy as np

  from bonejax.data import store
  workdir = tmp_path / "demo"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  out = subprocess.run([sys.executable, str(REPO / "launch/demo.py"), f"--workdir={workdir}",
                        "--config=configs/demo.py:smoke", "--num_scans=3", "--shape=32,32,32",
                        "--config.num_steps=2", "--nopictures"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["train"]["steps"] == 2 and result["test_scan"] == "scan_002"
  # The prediction on disk, scored with numpy against the phantom's exact labels.
  pred = store.open_array(workdir / "prediction.zarr").read().result()
  truth = store.open_dataset(workdir / "data").open_scan("scan_002").read_labels()
  ious = [((pred == c) & (truth == c)).sum() / max(((pred == c) | (truth == c)).sum(), 1)
          for c in range(3)]
  np.testing.assert_allclose([result["iou"][c] for c in result["classes"]], ious, atol=1e-9)
  np.testing.assert_allclose(result["miou_fg"], np.mean(ious[1:]), atol=1e-9)
  assert result["voting"]["3-plane soft vote"] == result["miou_fg"]
  assert result["gain_over_baseline"] == result["miou_fg"] - result["baseline_miou_fg"]
  report = json.loads((workdir / "report.json").read_text())
  np.testing.assert_allclose(report["miou_fg"], result["miou_fg"], atol=1e-9)
  assert (workdir / "report.html").read_text().lstrip().lower().startswith("<!doctype html")
  assert (workdir / "model" / "model.json").is_file()
