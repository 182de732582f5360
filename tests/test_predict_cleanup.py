"""Nothing lost, nothing left behind by predict (issue 26, items 3 and 7; issue 23, item 6).

- An output that a crash between the two renames left only as `.NAME.old-HOST-PID-RAND` is
  restored, and then is an existing output like any other: without --overwrite the run stops
  (it used to be replaced: data loss), for TIFF and zarr outputs, in the library too.
- SIGTERM during predict ends it as Ctrl-C does (cli.runner): one line, exit 143, and no
  scratch folder, temporary or lock left.
- After a kill -9 of an out-of-core run, the next run of the same output in memory removes the
  killed run's scratch folder.
- A process of a multi-process prediction that fails before the engine is built tells the
  others at once (they fail with its line, not with a time-out).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bonejax.core import errors, outputs
from bonejax.data import store
from bundle_helpers import make_bundle, phantom

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", PYTHONPATH=str(REPO))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("cleanup")
  make_bundle(root / "model", depth=1, width=2)
  np.save(root / "vol.npy", phantom((24, 20, 18), seed=1))
  return root


def dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def predict_cli(files, output, *args, env=None, **popen):
  cmd = [sys.executable, str(REPO / "launch/predict.py"), f"--model={files / 'model'}",
         f"--input={files / 'vol.npy'}", f"--output={output}", "--planes=1", *map(str, args)]
  if popen:
    return subprocess.Popen(cmd, cwd=REPO, env=dict(ENV, **(env or {})), text=True, **popen)
  return subprocess.run(cmd, cwd=REPO, env=dict(ENV, **(env or {})), capture_output=True,
                        text=True, timeout=600)


def hidden(d: Path) -> list[str]:
  return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def leave_old(final: Path, make) -> Path:
  """`final` as a crash between the two renames leaves it: only its `.old` copy."""
  old = final.with_name(f".{final.name}.old-{outputs.HOST}-{dead_pid()}-89abcdef")
  make(old)
  return old


@pytest.mark.parametrize("name", ["p.tif", "p.zarr"])
def test_a_restored_output_is_kept_and_the_run_stops(files, tmp_path, name):
  final = tmp_path / name
  if name.endswith(".tif"):
    make = lambda p: p.write_bytes(b"the user's previous prediction")  # noqa: E731
  else:
    def make(p):
      store.create_array(p, (2, 3, 4), np.uint8).write(np.full((2, 3, 4), 7, np.uint8)).result()
  leave_old(final, make)
  r = predict_cli(files, final)
  assert r.returncode == 2, r.stderr[-2000:]
  lines = r.stderr.strip().splitlines()
  assert lines[-1].startswith("error:") and "exists; pass --overwrite" in lines[-1], r.stderr
  note = [line for line in lines if line.startswith("note:")]
  assert len(note) == 1 and "restored the previous output" in note[0], r.stderr
  assert "removed 0" not in note[0] and ": ;" not in note[0]
  if name.endswith(".tif"):
    assert final.read_bytes() == b"the user's previous prediction"
  else:
    assert (store.open_array(final).read().result() == 7).all()
  assert hidden(tmp_path) == []


def test_atomic_output_keeps_a_restored_output(tmp_path, capsys):
  final = tmp_path / "report.json"
  leave_old(final, lambda p: p.write_text('{"bonejax_version": "old"}'))
  with pytest.raises(errors.UserError, match="exists; pass --overwrite"):
    with outputs.atomic_output(final) as tmp:
      tmp.write_text("new")
  assert final.read_text() == '{"bonejax_version": "old"}'
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("note: restored the previous output"), err
  # With --overwrite the restored output is replaced as any other.
  leave_old(final.with_name("b.json"), lambda p: p.write_text('{"bonejax_version": "old"}'))
  with outputs.atomic_output(tmp_path / "b.json", overwrite=True) as tmp:
    tmp.write_text("new")
  assert (tmp_path / "b.json").read_text() == "new" and hidden(tmp_path) == []


def test_sigterm_is_handled_as_ctrl_c(files, tmp_path):
  out = tmp_path / "p.zarr"
  proc = predict_cli(files, out, "--out_of_core=yes", "--memory_budget_gb=0.002",
                     "--planes=12", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    # Frozen once its scratch folder exists (mid-run: it goes only at the end), then SIGTERM:
    # the signal is taken when it runs again, whatever it was doing.
    deadline = time.monotonic() + 300
    while not any(n.startswith(".bonejax-predict-") for n in hidden(tmp_path)):
      assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
      time.sleep(0.01)
    proc.send_signal(signal.SIGSTOP)
    assert any(n.startswith(".bonejax-predict-") for n in hidden(tmp_path))
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 143, err[-2000:]
  lines = err.strip().splitlines()
  assert lines[-1] == "error: terminated" and "Traceback" not in err, err[-2000:]
  assert not out.exists() and hidden(tmp_path) == []  # no scratch, temporary or lock


def test_in_memory_rerun_removes_a_killed_out_of_core_runs_scratch(files, tmp_path):
  out = tmp_path / "p.zarr"
  killed = predict_cli(files, out, "--out_of_core=yes", "--memory_budget_gb=0.002",
                       env={"BONEJAX_TEST_KILL_AT": "0:set z"})
  assert killed.returncode == -9
  left = [n for n in hidden(tmp_path) if n.startswith(".bonejax-predict-")]
  assert len(left) == 1
  r = predict_cli(files, out, "--out_of_core=no", "--planes=3")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "scratch directory" in r.stderr and left[0] in r.stderr
  assert store.array_attrs(out)["planes"] == 3 and hidden(tmp_path) == []


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_a_failure_before_the_engine_reaches_the_other_process_at_once(files, tmp_path):
  """Process 1 has no bundle; process 0 (library call, no CLI guard) must fail with process
  1's line, not wait for its heartbeat to stop (120 s here: longer than the test allows)."""
  port = _free_port()
  code = ("import sys, jax\n"
          "from bonejax.core import distributed, errors\n"
          "from bonejax import predict\n"
          "i = int(sys.argv[1])\n"
          f"distributed.initialize('127.0.0.1:{port}', 2, i, recoverable=True, "
          "heartbeat_timeout_s=120)\n"
          "group = distributed.Group.from_jax(600, namespace='t')\n"
          "model = sys.argv[2] if i == 0 else sys.argv[2] + '-missing'\n"
          "try:\n"
          "  predict.predict_scan(model, sys.argv[3], output=sys.argv[4], planes=1, "
          "progress=False, group=group)\n"
          "except errors.UserError as e:\n"
          "  print('error:', e, file=sys.stderr); group.finish(); sys.exit(2)\n")
  procs = [subprocess.Popen([sys.executable, "-c", code, str(i), str(files / "model"),
                             str(files / "vol.npy"), str(tmp_path / "p.zarr")], cwd=REPO,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    errs = [p.communicate(timeout=100)[1] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [2, 2], errs
  assert "model-missing" in errs[1].strip().splitlines()[-1]
  last = errs[0].strip().splitlines()[-1]
  assert "process 1 of 2 failed" in last and "model-missing" in last, errs[0][-2000:]
  assert not (tmp_path / "p.zarr").exists()


def test_a_scan_claiming_an_absurd_shape_is_refused_before_allocation(files, tmp_path):
  import tensorstore as ts
  big = tmp_path / "big.zarr"
  ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(big)}, "create": True,
           "metadata": {"shape": [100000, 100000, 100000], "data_type": "uint8",
                        "chunk_grid": {"name": "regular",
                                       "configuration": {"chunk_shape": [64, 64, 64]}}}}).result()
  out = tmp_path / "pred.zarr"
  cmd = [sys.executable, str(REPO / "launch/predict.py"), f"--model={files / 'model'}",
         f"--input={big}", f"--output={out}", "--planes=1", "--memory_budget_gb=1"]
  # Under a 3 GiB address-space limit: a failing check cannot take the machine down.
  r = subprocess.run(["bash", "-c", 'ulimit -v 3145728; exec "$@"', "_", *cmd], cwd=REPO, env=ENV,
                     capture_output=True, text=True, timeout=600)
  errs = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert r.returncode == 2 and len(errs) == 1, r.stderr[-2000:]
  assert "one plane of its (100000, 100000, 100000) voxels needs" in errs[0]
  assert "--memory_budget_gb=1" in errs[0]
  assert not out.exists() and hidden(tmp_path) == []
