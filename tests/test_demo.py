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
