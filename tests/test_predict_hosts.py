"""Several processes predict one volume: 2 processes (jax.distributed on CPU) == 1 process.

Each process runs `launch/predict.py` with one CPU device and predicts its own, uneven share of
the planes (70 x 40 x 48 with 32-plane scratch chunks and 64-plane output chunks) into the
shared files; the labels and mean probabilities must equal a single-process run's. Then the
failures: a process killed mid-run and an output directory that is not shared end every
process with one `error:` line and leave no output and no debris. A 3D bundle the same way
(3D windows, each process its Z range, resampled to the bundle's voxel size).
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
from bonejax.core.distributed import Group
from bonejax.predict import hosts
from test_predict_scan import make_bundle, phantom

REPO = Path(__file__).resolve().parents[1]
SHAPE = (70, 40, 48)
# A small host budget: 32-plane scratch chunks, so every pass is split between the processes.
BUDGET = ["--memory_budget_gb=0.008", "--device_memory_gb=0.5", "--batch_size=8"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("hosts")
  make_bundle(root / "model")
  np.save(root / "vol.npy", phantom(SHAPE, seed=3))
  return root


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(files, outputs, *args, env=None, timeout=300, model="model", input="vol.npy"):
  """Runs predict.py as len(outputs) processes; outputs[i] is process i's (output, probs)."""
  port = _free_port()
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1",
                  PYTHONPATH=str(REPO), **(env or {}))
  procs = [subprocess.Popen(
      [sys.executable, str(REPO / "launch/predict.py"), f"--model={files / model}",
       f"--input={files / input}", f"--output={out}", f"--save_probs={probs}", *BUDGET,
       f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={len(outputs)}",
       f"--process_id={i}", *args],
      cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i, (out, probs) in enumerate(outputs)]
  try:
    results = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [(p.returncode, out, err) for p, (out, err) in zip(procs, results)]


def test_shares_are_contiguous_chunk_aligned_and_cover_the_axis():
  for n, unit, size in [(70, 32, 2), (40, 16, 3), (5, 32, 2), (100, 8, 7), (64, 64, 1)]:
    shares = [hosts.share(n, unit, Group(i, size)) for i in range(size)]
    assert shares[0][0] == 0 and shares[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))  # disjoint, no gap
    assert all(lo % unit == 0 and (hi % unit == 0 or hi == n) for lo, hi in shares)


def single(files, tmp_path, planes, vote, out_of_core):
  """One process, one device: the reference (run first, so the two processes below find its
  compiled functions in the persistent compilation cache)."""
  res = predict.predict_scan(files / "model", files / "vol.npy", output=tmp_path / "one.zarr",
                             save_probs=tmp_path / "one_probs.zarr", planes=planes, vote=vote,
                             memory_budget_gb=0.008, device_memory_gb=0.5, batch_size=8,
                             out_of_core=out_of_core, progress=False, devices=1)
  assert res["devices"] == 1 and res["processes"] == 1
  return (store.open_array(tmp_path / "one.zarr").read().result(),
          store.open_array(tmp_path / "one_probs.zarr").read().result())


def debris(path: Path) -> list[str]:
  return [p.name for p in path.iterdir() if ".tmp-" in p.name or "bonejax-predict" in p.name
          or p.name.endswith(".lock")]


@pytest.mark.parametrize("planes,vote,ooc", [(3, "soft", "no"), (9, "majority", "yes")])
def test_two_processes_equal_one(files, tmp_path, planes, vote, ooc):
  labels, mean = single(files, tmp_path, planes, vote, ooc == "yes")
  out, probs = tmp_path / "two.zarr", tmp_path / "two_probs.zarr"
  runs = launch(files, [(out, probs)] * 2, f"--planes={planes}", f"--vote={vote}",
                f"--out_of_core={ooc}")
  for rc, _, err in runs:
    assert rc == 0, err[-3000:]
  result = json.loads(runs[0][1].strip().splitlines()[-1])
  assert result["processes"] == 2 and result["devices"] == 2
  assert result["mode"] == ("out_of_core" if ooc == "yes" else "in_memory")
  assert (store.open_array(out).read().result() == labels).all()
  np.testing.assert_allclose(store.open_array(probs).read().result(), mean, atol=1e-6)
  assert store.array_attrs(out)["vote"] == vote  # process 0 wrote the attributes
  assert not debris(tmp_path)


def assert_failed_cleanly(runs, tmp_path, out, probs, match):
  for rc, _, err in runs:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == 2 and lines[-1].startswith("error:"), err[-3000:]
    assert "Traceback" not in err
  assert match in runs[0][2].strip().splitlines()[-1], runs[0][2][-2000:]
  assert not out.exists() and not probs.exists()
  assert not debris(tmp_path)


def test_a_dying_process_fails_the_others_with_one_line(files, tmp_path):
  out, probs = tmp_path / "dead.zarr", tmp_path / "dead_probs.zarr"
  # Process 1 is killed (SIGKILL) on reaching the barrier after the Z planes.
  runs = launch(files, [(out, probs)] * 2, "--planes=3", "--heartbeat_timeout_s=10",
                env={"BONEJAX_TEST_KILL_AT": "1:set z"})
  assert runs[1][0] == -9
  rc, _, err = runs[0]
  lines = [line for line in err.strip().splitlines() if line.strip()]
  assert rc == 2 and lines[-1].startswith("error:"), err[-3000:]
  assert "process 1 of 2 stopped responding" in lines[-1], lines[-1]
  assert not out.exists() and not probs.exists()
  assert not debris(tmp_path)


def test_an_output_directory_that_is_not_shared(files, tmp_path):
  # Process 1 sees another directory where process 0 sees its own: as two hosts whose
  # "shared" path is a local disk on each.
  here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
  runs = launch(files, [(here / "pred.zarr", here / "probs.zarr"),
                        (elsewhere / "pred.zarr", elsewhere / "probs.zarr")], "--planes=1")
  for rc, _, err in runs:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == 2 and lines[-1].startswith("error:"), err[-3000:]
    assert "Traceback" not in err
  assert "not visible here" in runs[1][2].strip().splitlines()[-1]
  assert "process 1 of 2 failed" in runs[0][2].strip().splitlines()[-1]
  for d in (here, elsewhere):
    assert not (d / "pred.zarr").exists() and not (d / "probs.zarr").exists()
    assert not d.exists() or not debris(d)


def test_two_processes_ome_zarr_max_vote_and_resampling(files, tmp_path):
  """The issue-14 paths shared by two processes: OME-Zarr labels and probabilities (process 0
  builds the pyramids), the max vote, and an input resampled to the bundle's voxel size (each
  process maps back its own share)."""
  import shutil
  from bonejax.io import ome_zarr
  model = tmp_path / "model_1um"
  shutil.copytree(files / "model", model)
  meta = json.loads((model / "model.json").read_text())
  (model / "model.json").write_text(json.dumps({**meta, "voxel_size_um": [1.0, 1.0, 1.0]}))
  store.write_scan(tmp_path / "scan", phantom((36, 40, 48), seed=5),
                   attrs={"voxel_size_um": 1.5})
  kw = dict(planes=3, vote="max", memory_budget_gb=0.008, device_memory_gb=0.5, batch_size=8,
            progress=False)
  ref = predict.predict_scan(model, tmp_path / "scan", output=tmp_path / "one.ome.zarr",
                             save_probs=tmp_path / "one_probs.ome.zarr", devices=1, **kw)
  assert ref["resampled"] is not None  # 1.5 um input, 1 um bundle
  out, probs = tmp_path / "two.ome.zarr", tmp_path / "two_probs.ome.zarr"
  runs = launch(tmp_path, [(out, probs)] * 2, "--planes=3", "--vote=max", model="model_1um",
                input="scan")
  for rc, _, err in runs:
    assert rc == 0, err[-3000:]
  result = json.loads(runs[0][1].strip().splitlines()[-1])
  assert result["processes"] == 2 and result["resampled"] == ref["resampled"]
  for one, two in ((tmp_path / "one.ome.zarr", out), (tmp_path / "one_probs.ome.zarr", probs)):
    levels = sorted(p.name for p in one.iterdir() if p.name.isdigit())
    assert levels == sorted(p.name for p in two.iterdir() if p.name.isdigit()) and levels
    for level in levels:  # every pyramid level, written by process 0 from the shared level 0
      np.testing.assert_allclose(store.open_array(two / level).read().result(),
                                 store.open_array(one / level).read().result(), atol=1e-6)
  assert ome_zarr.is_ome_zarr_path(out)
  assert not debris(tmp_path)


class _Client:
  """The coordination service's key-value store, as far as Group.fail uses it."""

  def __init__(self):
    self.kv = {}

  def key_value_set(self, key, value, allow_overwrite=False):
    self.kv[key] = value


def test_a_failure_before_the_engine_is_told_to_the_others(tmp_path):
  """predict_scan(group=...) tells the group of an error raised before its engine exists (here:
  no bundle), so the other processes do not wait for it at a barrier."""
  from bonejax.core import errors
  client = _Client()
  group = Group(1, 2, client)  # process 1 of 2: reports and leaves (process 0 would wait)
  with pytest.raises(errors.UserError):
    predict.predict_scan(tmp_path / "no_model", tmp_path / "no_scan", output=tmp_path / "p.zarr",
                         progress=False, group=group)
  failed = {k: v for k, v in client.kv.items() if "/failed/" in k}
  assert list(failed) == [f"{group.ns}/failed/1"] and "no_model" in failed[f"{group.ns}/failed/1"]


def test_3d_two_processes_equal_one(tmp_path):
  """A 3D bundle and an input resampled to its voxel size (the bundle's voxels 1.5 um along X,
  the input's 1.5 um along Y): each process runs the windows reaching its Z range of the
  bundle's grid (32-plane scratch chunks) and stages their probabilities there; after a barrier
  each maps back its share of the input grid (64-plane output chunks: planes 0-63, 64-69). The
  labels and probabilities are those of one process. (Without resampling each process writes
  its Z range straight into the outputs: the same `predict_volume_3d(z_range=...)`, tested
  range by range in test_predict3d.py.)"""
  from test_resample import unet3d_bundle
  from bonejax.io import voxel
  unet3d_bundle(tmp_path / "model3d", (1.0, 1.0, 1.5))
  store.write_scan(tmp_path / "scan", phantom((70, 12, 14), seed=6),
                   attrs=voxel.voxel_attrs((1.0, 1.5, 1.0)))
  ref = predict.predict_scan(tmp_path / "model3d", tmp_path / "scan",
                             output=tmp_path / "one.zarr",
                             save_probs=tmp_path / "one_probs.zarr", memory_budget_gb=0.008,
                             device_memory_gb=0.5, batch_size=8, progress=False, devices=1)
  assert ref["mode"] == "3d_windows" and ref["resampled"]["shape"] == [70, 18, 9]
  out, probs = tmp_path / "two.zarr", tmp_path / "two_probs.zarr"
  runs = launch(tmp_path, [(out, probs)] * 2, model="model3d", input="scan")
  for rc, _, err in runs:
    assert rc == 0, err[-3000:]
  results = [json.loads(run[1].strip().splitlines()[-1]) for run in runs]
  assert results[0]["processes"] == 2 and results[0]["resampled"] == ref["resampled"]
  # Each ran its own windows, the halo ones twice: more than one process's, fewer than two.
  assert ref["windows"] < sum(r["windows"] for r in results) < 2 * ref["windows"]
  np.testing.assert_array_equal(store.open_array(out).read().result(),
                                store.open_array(tmp_path / "one.zarr").read().result())
  np.testing.assert_allclose(store.open_array(probs).read().result(),
                             store.open_array(tmp_path / "one_probs.zarr").read().result(),
                             atol=1e-6)
  assert store.array_attrs(out)["mode"] == "3d_windows"  # process 0 wrote the attributes
  assert not debris(tmp_path)
