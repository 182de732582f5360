"""Many scans with one command (bonejax/predict/study.py): resumable, shared, summarised.

A study of 20 tiny phantom scans (two shapes) is predicted by `launch/predict.py` once without
interruption (the reference); then killed (SIGKILL) in the middle of its 8th scan and resumed
with the same command, which must give the same outputs, byte for byte in the labels; then
shared by two processes (jax.distributed on CPU). Bad scans are recorded and the others go on.
"""

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bonejax import predict
from bonejax.core import errors
from bonejax.data import store
from bonejax.predict import study
from bundle_helpers import CLASSES, make_bundle, phantom

REPO = Path(__file__).resolve().parents[1]
N = 20
ENV = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", PYTHONPATH=str(REPO))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("study")
  make_bundle(root / "model", depth=1, width=2)
  names = []
  for i in range(N):
    name = f"scan_{i:03d}"
    store.write_scan(root / "data" / name, phantom((6, 10 + 2 * (i % 2), 9), seed=i))
    names.append(name)
  store.write_dataset_json(root / "data", CLASSES, names)
  return root


def run(files, output, *args, env=None, input=None):
  return subprocess.run(
      [sys.executable, str(REPO / "launch/predict.py"), f"--model={files / 'model'}",
       f"--input={input or files / 'data'}", f"--output={output}", "--planes=3",
       "--batch_size=4",
       *map(str, args)], cwd=REPO, env=dict(ENV, **(env or {})), capture_output=True, text=True,
      timeout=600)


def labels(path: Path) -> np.ndarray:
  return store.open_array(path).read().result()


def summary(output: Path) -> list[dict]:
  return json.loads((output / "summary.json").read_text())["scans"]


def debris(d: Path) -> list[str]:
  return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def predictor(files):
  return predict.Predictor(files / "model", planes=3, batch_size=4, progress=False)


def run_here(predictor, files, output, items=None, **kw):
  """The study in this process (what launch/predict.py runs after its flags)."""
  return study.run_study(predictor, items or study.list_scans(files / "data"),
                         study.Layout(output), settings={"planes": 3}, **kw)


@pytest.fixture(scope="module")
def reference(files, predictor):
  """The uninterrupted run (one Predictor for all), checked against predict_scan."""
  out = files / "ref"
  result = run_here(predictor, files, out)
  assert result["scans"] == N and result["done"] == N and result["failed"] == 0
  rows = summary(out)
  assert [row["scan"] for row in rows] == [f"scan_{i:03d}" for i in range(N)]
  assert all(row["status"] == "done" and row["seconds"] > 0 and row["voxels_per_second"] > 0
             for row in rows)
  with open(out / "summary.csv") as f:
    table = list(csv.DictReader(f))
  assert [t["scan"] for t in table] == [row["scan"] for row in rows]
  assert table[1]["shape"] == "6x12x9" and table[1]["status"] == "done"
  for i in (0, 1):  # one Predictor for all = predict_scan for each
    one = predict.predict_scan(files / "model", files / "data" / f"scan_{i:03d}", planes=3,
                               batch_size=4, progress=False)
    np.testing.assert_array_equal(labels(out / f"scan_{i:03d}.zarr"), one["labels"])
  again = run_here(predictor, files, out)  # nothing left to do
  assert again["kept"] == N and again["done"] == 0
  return {f"scan_{i:03d}": labels(out / f"scan_{i:03d}.zarr") for i in range(N)}


def test_killed_half_way_and_resumed_equals_uninterrupted(files, reference, tmp_path):
  out = tmp_path / "pred"
  killed = run(files, out, env={study.KILL_AFTER_ENV: "7"})
  assert killed.returncode == -9, killed.stderr[-3000:]
  done = sorted(p.name for p in out.glob("scan_*.zarr"))
  assert done == [f"scan_{i:03d}.zarr" for i in range(7)]  # the 8th was under way
  assert any(".tmp-" in name for name in debris(out))      # its temporary is left behind
  rows = {row["scan"]: row["status"] for row in summary(out)}
  assert [rows[f"scan_{i:03d}"] for i in range(8)] == ["done"] * 7 + ["pending"]

  resumed = run(files, out)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  result = json.loads(resumed.stdout.strip().splitlines()[-1])
  assert result["kept"] == 7 and result["done"] == N - 7
  assert "7 of 20 scans already complete" in resumed.stderr
  for name, want in reference.items():
    np.testing.assert_array_equal(labels(out / f"{name}.zarr"), want, err_msg=name)
  statuses = [row["status"] for row in summary(out)]
  assert statuses == ["kept"] * 7 + ["done"] * (N - 7)
  assert debris(out) == []  # the killed run's temporary, lock and summary lock are gone


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_share_the_study(files, reference, tmp_path):
  out = tmp_path / "pred"
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, str(REPO / "launch/predict.py"), f"--model={files / 'model'}",
       f"--input={files / 'data'}", f"--output={out}", "--planes=3", "--batch_size=4",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  try:
    runs = [p.communicate(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, runs):
    assert p.returncode == 0, "\n---\n".join(e[-2500:] for _, e in runs)
  result = json.loads(runs[0][0].strip().splitlines()[-1])
  assert result["processes"] == 2 and result["done"] == N and result["devices"] == 2
  rows = summary(out)
  by = [row["process"] for row in rows]
  assert sorted(set(by)) == [0, 1]  # both took scans (each its own first), each scan once
  assert all(row["status"] == "done" for row in rows)
  for name, want in reference.items():
    np.testing.assert_array_equal(labels(out / f"{name}.zarr"), want, err_msg=name)
  assert debris(out) == []


def test_a_bad_scan_is_recorded_and_the_others_go_on(files, reference, predictor, tmp_path):
  (tmp_path / "broken.npy").write_bytes(b"not a numpy file")
  lst = tmp_path / "scans.txt"
  lst.write_text("# two good scans around a broken one\n"
                 f"{files / 'data' / 'scan_000'}\nbroken.npy\n{files / 'data' / 'scan_001'}\n")
  out = tmp_path / "pred"
  r = run(files, out, "--output_format=tif", input=lst)
  assert r.returncode == 2, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error: 1 of 3 scans failed") and "broken" in last, last
  rows = {row["scan"]: row for row in summary(out)}
  assert rows["broken"]["status"] == "failed" and "broken.npy" in rows["broken"]["error"]
  assert rows["scan_000"]["status"] == rows["scan_001"]["status"] == "done"
  from bonejax.io import registry
  for name in ("scan_000", "scan_001"):
    with registry.open_volume(out / f"{name}.tif", "labels") as src:
      np.testing.assert_array_equal(src.read_slab(0, src.shape[0]), reference[name])
  assert not (out / "broken.tif").exists() and debris(out) == []

  fast = tmp_path / "fast"
  with pytest.raises(errors.UserError, match="scan broken .*broken.npy"):
    run_here(predictor, files, fast, study.list_scans(lst), fail_fast=True)
  statuses = {row["scan"]: row["status"] for row in summary(fast)}
  assert statuses == {"scan_000": "done", "broken": "failed", "scan_001": "pending"}


def test_what_a_study_is(files, tmp_path):
  assert study.is_study(files / "data")                      # a dataset
  assert not study.is_study(files / "data" / "scan_000")     # a scan
  np.save(tmp_path / "a.npy", phantom((4, 5, 6)))
  np.save(tmp_path / "b.npy", phantom((4, 5, 6), 1))
  assert study.is_study(tmp_path)                            # a folder of volumes
  assert [it.name for it in study.list_scans(tmp_path)] == ["a", "b"]
  assert study.is_study(str(tmp_path / "*.npy"))             # a glob
  assert [it.name for it in study.list_scans(str(tmp_path / "*.npy"))] == ["a", "b"]
  slices = tmp_path / "slices"
  slices.mkdir()
  import tifffile
  for z in range(3):
    tifffile.imwrite(slices / f"s{z}.tif", np.zeros((5, 6), np.uint16))
  assert not study.is_study(slices)                          # one volume of 2D slices
  (tmp_path / "list.txt").write_text(f"a.npy\n{tmp_path / 'sub' / 'a.npy'}\n")
  with pytest.raises(errors.UserError, match="would both be written as 'a'"):
    study.list_scans(tmp_path / "list.txt")
  with pytest.raises(errors.UserError, match="names no scans"):
    study.list_scans(str(tmp_path / "*.nothing"))
