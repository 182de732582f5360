"""benchmarks/gpu_suite.sh runs end to end in its CPU mode (tiny shapes, a stand-in model).

Only the pipeline is checked: every job ran and the headline table has its figures, in result
files named after the machine. No timings are asserted. The MONAI comparison is left out here
(torch's import alone takes seconds); it runs when the suite is run by hand with torch present.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_suite_cpu_mode(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable, BONEJAX_MACHINE="test-cpu")
  r = subprocess.run([str(REPO / "benchmarks/gpu_suite.sh"), "--cpu", "--peers=no",
                      f"--results_dir={tmp_path}"],
                     capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  assert summary["mode"] == "cpu" and summary["failed"] == []
  result = json.loads((tmp_path / "gpu_suite_test-cpu.json").read_text())
  figures = {row["figure"]: row["value"] for row in result["rows"]}
  for name in ("training step patches/s", "training step MFU",
               "training loader + step patches/s", "training loader + step MFU",
               "prediction 16x48x48 voxels/s (zarr in/out, warm)",
               "prediction cold seconds (compiles)"):
    assert isinstance(figures.get(name), (int, float)) and figures[name] > 0, (name, figures)
  assert figures["peers job"] == "skipped"
  assert result["machine"]["tag"] == "test-cpu"
  for job in ("roofline", "train_throughput", "gpu_suite"):
    assert (tmp_path / f"{job}_test-cpu.md").exists()
