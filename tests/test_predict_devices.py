"""Every local device: batches spread over 4 fake CPU devices give what 1 device gives.

The engine runs the same per-device program on every device (shard_map, no communication), so
the probabilities must agree to float rounding (1e-6) and the labels exactly, in memory and out
of core, for 3 and 9 planes, soft and majority voting, with the probabilities saved. Sizes are
not multiples of the 4 x 8 planes of a call, so last batches are padded.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from bonejax import predict
from bonejax.core import errors
from bonejax.data import store
from bonejax.predict import memory
from test_predict_scan import make_bundle, phantom

REPO = Path(__file__).resolve().parents[1]
SHAPE = (33, 40, 47)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("devices")
  make_bundle(root / "model")
  np.save(root / "vol.npy", phantom(SHAPE, seed=1))
  return root


def run(files, tmp_path, devices, **kw):
  out, probs = tmp_path / f"d{devices}.zarr", tmp_path / f"d{devices}_probs.zarr"
  res = predict.predict_scan(files / "model", files / "vol.npy", output=out, save_probs=probs,
                             batch_size=8, device_memory_gb=0.5, progress=False,
                             devices=devices, **kw)
  assert res["devices"] == devices and res["processes"] == 1
  assert all(p["devices"] == devices for p in res["plans"])
  return (store.open_array(out).read().result(), store.open_array(probs).read().result(),
          res)


@pytest.mark.parametrize("planes,vote,out_of_core", [
    (3, "soft", False), (3, "majority", True), (9, "majority", True), (9, "soft", False)])
def test_four_devices_equal_one(files, tmp_path, planes, vote, out_of_core):
  assert jax.local_device_count() >= 4, "conftest sets jax_num_cpu_devices=4"
  kw = dict(planes=planes, vote=vote, out_of_core=out_of_core, memory_budget_gb=0.01)
  labels1, probs1, _ = run(files, tmp_path, 1, **kw)
  labels4, probs4, res = run(files, tmp_path, 4, **kw)
  assert res["mode"] == ("out_of_core" if out_of_core else "in_memory")
  assert (labels4 == labels1).all()
  np.testing.assert_allclose(probs4, probs1, atol=1e-6)


def test_engine_replicates_weights_once_and_budgets_per_device():
  from flax import nnx
  from bonejax import models
  abstract = nnx.eval_shape(lambda: models.create("unet", num_classes=3, in_channels=1,
                                                  rngs=nnx.Rngs(0), depth=2, width=4))
  net = models.fill_from_numpy(abstract, 0)
  one = predict.make_engine(net, batch_size=2, device_memory_gb=0.5, devices=1)
  four = predict.make_engine(net, batch_size=2, device_memory_gb=0.5)  # default: all local
  assert four.num_devices == jax.local_device_count() == 4
  for leaf in jax.tree.leaves(four.state):
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4
  planes = phantom((11, 24, 40))
  for e in (one, four):
    e.set_normalization({"p0_5": 500.0, "p99_9": 3500.0}, "percentile")
  np.testing.assert_allclose(four.infer(planes), one.infer(planes), atol=1e-6)
  # The plan is per device: the same batch and per-device memory whatever the device count,
  # and a call takes batch x devices planes.
  p1, p4 = one.plan((24, 40), np.uint16), four.plan((24, 40), np.uint16)
  assert p1.batch == p4.batch == 2 and p1.device_bytes == p4.device_bytes
  assert four.global_batch(p4) == 8
  # On CPU the devices share the host's memory: the default budget is split between them.
  assert memory.device_budget_bytes(None, 4.0, jax.local_devices()[:4]) * 4 == \
      memory.device_budget_bytes(None, 4.0, jax.local_devices()[:1])


@pytest.mark.parametrize("devices", [0, 5])
def test_bad_device_counts(files, tmp_path, devices):
  with pytest.raises(errors.UserError, match=f"devices={devices}"):
    predict.predict_scan(files / "model", files / "vol.npy", output=tmp_path / "bad.zarr",
                         progress=False, devices=devices)
  assert not (tmp_path / "bad.zarr").exists()
  assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or "bonejax" in p.name]


@pytest.mark.parametrize("args,match", [
    (["--devices=0"], "--devices=0 must be at least 1"),
    (["--devices=2"], "devices=2 but this process has only 1 cpu device"),
    (["--num_processes=2"], "multi-host needs all of"),
    (["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"],
     "--process_id=2 not in [0, 2)"),
])
def test_cli_bad_devices_and_hosts(files, tmp_path, args, match):
  out = tmp_path / "cli.zarr"
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
  r = subprocess.run([sys.executable, str(REPO / "launch/predict.py"),
                      f"--model={files / 'model'}", f"--input={files / 'vol.npy'}",
                      f"--output={out}", "--planes=1", *args],
                     capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
  assert r.returncode == 2 and lines[-1].startswith("error:"), r.stderr[-2000:]
  assert match in lines[-1] and "Traceback" not in r.stderr
  assert not out.exists()
