"""benchmarks/gpu_suite.sh runs end to end in its CPU mode (tiny shapes, a stand-in model).

Only the pipeline is checked: every job ran, every row of the headline table has its figure
(CPU mode itself fails otherwise, which the second test shows), the profiler trace is written
beside the results, and the result files are named after the machine. No timings are asserted.
The MONAI comparison is left out here (torch's import alone takes seconds, and monai is not a
test dependency); its rows are then present and say why they have no figure.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402


def _suite(tmp_path, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable, BONEJAX_MACHINE="test-cpu")
  return subprocess.run([str(REPO / "benchmarks/gpu_suite.sh"), "--cpu", "--peers=no",
                         f"--results_dir={tmp_path}", *args],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=900)


def test_gpu_suite_cpu_mode_prints_every_row(tmp_path):
  r = _suite(tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  assert summary["mode"] == "cpu" and summary["failed"] == [] and summary["missing"] == []
  result = json.loads((tmp_path / "gpu_suite_test-cpu.json").read_text())
  rows = {row["figure"]: row for row in result["rows"]}
  numeric = lambda f: isinstance(rows[f]["value"], (int, float)) and rows[f]["value"] > 0  # noqa
  # The headline: the trainer's default (device) sampler first, both samplers by name.
  assert result["rows"][0]["figure"] == ("training loader + step patches/s, device sampler "
                                         "(the trainer's default)")
  for name in ("training loader + step patches/s, device sampler (the trainer's default)",
               "training loader + step patches/s, host sampler",
               "training step alone patches/s (same step, batch already on the device)",
               "loader alone patches/s, device sampler", "loader alone patches/s, host sampler",
               "prediction 16x48x48 voxels/s (zarr in/out, warm)",
               "prediction voxels/s, inference passes", "prediction cold seconds (compiles)",
               "peak TFLOP/s, bf16 (measured matmul)",
               "peak TFLOP/s, fp32 (measured fp32 matmul)",
               "forward GFLOP per patch (jaxpr count)"):
    assert numeric(name), (name, rows.get(name))
    assert name in r.stdout  # printed, not only written
  # MFU against the measured peak beside every training throughput; a CPU has no datasheet.
  for name in ("training loader + step patches/s, device sampler (the trainer's default)",
               "training loader + step patches/s, host sampler",
               "training step alone patches/s (same step, batch already on the device)"):
    assert rows[name]["mfu_measured"] > 0 and rows[name]["mfu_datasheet"] is None
  assert rows["peak TFLOP/s, bf16 dense (datasheet)"]["value"] is None
  # The trace of training and prediction steps, beside the results.
  trace = tmp_path / rows["profiler trace (training + prediction steps)"]["value"]
  assert trace == tmp_path / "gpu_suite_test-cpu_trace"
  assert any(f.name.endswith(".xplane.pb") for f in trace.rglob("*"))
  # The peer's rows are there, without figures, saying why.
  peer = [row for f, row in rows.items() if f.startswith("peer ")]
  assert len(peer) == 7 and all(row["note"] == "--peers=no" for row in peer)
  for job in ("prepare", "loader", "profile", "predict_cold", "predict"):
    assert numeric(f"job seconds: {job}") and rows[f"job seconds: {job}"]["note"].startswith("ok")
  assert result["suite_process_imported_jax"] is False  # every JAX piece ran in a child
  assert result["machine"]["tag"] == "test-cpu"
  for job in ("train_throughput", "gpu_suite"):
    assert (tmp_path / f"{job}_test-cpu.md").exists()


def test_gpu_suite_cpu_mode_fails_on_a_missing_row(tmp_path):
  # Only the bundle is made (no job measures anything): the rows have no figures.
  r = _suite(tmp_path, "--jobs=peers")
  assert r.returncode == 1, r.stderr[-3000:]
  assert "error: CPU mode: rows without a figure: training loader + step" in r.stderr
  result = json.loads((tmp_path / "gpu_suite_test-cpu.json").read_text())
  assert "peak TFLOP/s, bf16 (measured matmul)" in result["missing"]


def test_datasheet_peaks():
  assert common.datasheet_peak("NVIDIA H100 80GB HBM3") == {
      "name": "H100 SXM", "bfloat16": 989.4, "tf32": 494.7}
  assert common.datasheet_peak("NVIDIA H100 PCIe")["bfloat16"] == 756.0
  assert common.datasheet_peak("NVIDIA H100 NVL")["name"] == "H100 NVL"
  assert common.datasheet_peak("NVIDIA H200")["name"] == "H200 SXM"
  assert common.datasheet_peak("NVIDIA H200 NVL")["bfloat16"] == 835.5
  assert common.datasheet_peak("cpu") is None and common.datasheet_peak(None) is None


def test_gpu_budget_fits_ten_minutes():
  # In a child: the suite's module defines absl flags that other tests' modules may share.
  probe = ("import json, benchmarks.gpu_suite as g; print(json.dumps([g.GPU['timeouts'], "
           "g.mfu(1000.0, 3e9, 989.4), g.mfu(None, 3e9, 989.4)]))")
  r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO,
                     timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  timeouts, mfu, none = json.loads(r.stdout.strip().splitlines()[-1])
  assert set(timeouts) == {"probe", "prepare", "loader", "profile", "predict_cold", "predict",
                           "peers"}
  assert sum(timeouts.values()) <= 570  # every job's limit within 10 minutes, with slack
  assert abs(mfu - 1000 * 3e9 / 989.4e12) < 1e-12 and none is None
