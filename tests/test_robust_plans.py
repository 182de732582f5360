"""Plans before allocation and waits that read a finished peer right (issue 26).

- Group._wait: a peer that publishes its part and exits between the wait's `ready()` and its
  liveness check completed the operation; it is not "dead" (a fake key-value store orders the
  two events deterministically).
"""

import re

import pytest

from bonejax.core import distributed, errors
from bonejax.core.distributed import Group


class _Store:
  """The coordination service's key-value store and liveness query, as Group uses them.
  `on_liveness` runs inside get_live_nodes: what a peer does between the two reads."""

  def __init__(self, live, on_liveness=None):
    self.kv, self.live, self.on_liveness = {}, list(live), on_liveness

  def key_value_set(self, key, value, allow_overwrite=False):
    self.kv[key] = value

  def key_value_dir_get(self, prefix):
    return [(k, v) for k, v in self.kv.items() if k.startswith(prefix)]

  def get_live_nodes(self, nodes):
    if self.on_liveness is not None:
      self.on_liveness(self)
    return [n for n in nodes if n in self.live]


def test_a_peer_that_published_and_left_is_not_dead(monkeypatch):
  monkeypatch.setattr(distributed, "_CHECK_EVERY_S", 0.0)  # the liveness check at once

  def peer_publishes_and_exits(store):
    store.kv["bonejax/op1/1"] = "from 1"
    store.live = [0]  # its heartbeats stopped: it is gone, its part is there

  group = Group(0, 2, _Store([0], peer_publishes_and_exits), barrier_timeout_s=30)
  assert group.allgather("gather", "from 0") == ["from 0", "from 1"]


def test_a_peer_that_died_before_publishing_is_reported(monkeypatch):
  monkeypatch.setattr(distributed, "_CHECK_EVERY_S", 0.0)
  group = Group(0, 2, _Store([0]), barrier_timeout_s=30)
  with pytest.raises(errors.UserError, match=r"process 1 of 2 stopped responding.*'gather'"):
    group.allgather("gather", "from 0")


# --- training: the patch against the scans, the step's memory floor against the devices ------

def test_a_patch_larger_than_every_scan_is_refused(tiny_dataset):
  from bonejax.data import store
  from bonejax.train import step_memory
  dataset = store.open_dataset(tiny_dataset)  # scans of 32 x 48 x 48
  step_memory.check_patch_fits_scans(48, (0, 1, 2), dataset, dataset.scans)
  with pytest.raises(errors.UserError, match=r"patch_size=8192 is larger than every training "
                                             r"scan \(the largest plane side is 48 px"):
    step_memory.check_patch_fits_scans(8192, (0,), dataset, dataset.scans)


def test_the_step_floor_is_the_largest_convolution(monkeypatch):
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from bonejax.core import memory_plan
  from bonejax.train import step_memory

  def create():
    rngs = nnx.Rngs(0)
    return nnx.Sequential(nnx.Conv(1, 3, (3, 3), rngs=rngs), nnx.Conv(3, 5, (3, 3), rngs=rngs),
                          nnx.Conv(5, 2, (1, 1), rngs=rngs))
  model = nnx.eval_shape(create)
  # by hand: the second convolution, 3 channels in and 5 out, float32
  assert step_memory.forward_floor_bytes(model, (64, 64, 1), jnp.float32) == 64 * 64 * 8 * 4
  params = (1 * 3 * 9 + 3) + (3 * 5 * 9 + 5) + (5 * 2 + 2)
  floor = step_memory.step_floor_bytes(model, 2, (64, 64, 1))
  assert floor == params * 4 * 2 + 2 * (64 * 64 * 8 + 64 * 64 * 8 * 4)
  cpu = jax.devices()[:1]
  kw = dict(abstract_model=model, batch_size=2, sample_shape=(64, 64, 1), devices=cpu,
            what="--config.batch_size=2 with patch 64")
  assert step_memory.check_step_memory(**kw) is None  # a generous guess fits: not traced
  monkeypatch.setattr(memory_plan, "available_bytes", lambda: (floor, "available"))
  assert step_memory.check_step_memory(**kw) == floor  # traced: the floor fits, just
  monkeypatch.setattr(memory_plan, "available_bytes", lambda: (floor - 1, "available"))
  with pytest.raises(errors.UserError, match=r"^--config.batch_size=2 with patch 64 needs at "
                                             r"least 321.4 KiB of device memory .* 128.0 KiB per "
                                             r"patch\), but 321.4 KiB available; use a smaller"):
    step_memory.check_step_memory(**kw)


# --- evaluate: a header claiming 100000^3 -------------------------------------------------------

def _claimed(path, shape):
  from bonejax.data import store
  store.create_array(path, shape, "uint8", (64, 64, 64))  # metadata only: no chunk written
  return path


def test_evaluate_refuses_a_claimed_shape_that_cannot_fit(tmp_path):
  import subprocess
  import sys
  from pathlib import Path
  repo = Path(__file__).resolve().parents[1]
  huge = _claimed(tmp_path / "huge.zarr", (100000, 100000, 100000))
  for extra in (["--morphometry"],):  # (its blocks count too; the slab alone is far over)
    r = subprocess.run([sys.executable, str(repo / "launch" / "evaluate.py"), f"--pred={huge}",
                        f"--truth={huge}", f"--out={tmp_path / 'r.json'}",
                        "--memory_budget_gb=1"] + extra,
                       capture_output=True, text=True, cwd=repo, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert re.match(r"error: evaluating .* of shape \(100000, 100000, 100000\): one slice needs "
                    r"3\d\.\d GiB of memory, but --memory_budget_gb=1 allows 1.0 GiB; crop",
                    lines[0]), lines[0]
    assert not (tmp_path / "r.json").exists()


def test_a_slab_shrinks_to_the_budget(monkeypatch):
  from bonejax.core import memory_plan
  monkeypatch.setattr(memory_plan, "available_bytes", lambda: (1000 + 10 * 400, "available"))
  assert memory_plan.plan_slab("v", 400, 1000, 64) == 10
  assert memory_plan.plan_slab("v", 400, 1000, 8) == 8
  with pytest.raises(errors.UserError, match=r"^v: one slice needs 5.3 KiB of memory, but 4.9 "
                                             r"KiB available; crop it"):
    memory_plan.plan_slab("v", 5000, 400, 8, hint="crop it")


# --- disk: what import and predict write, against the free space -------------------------------

def test_import_refuses_an_output_the_disk_cannot_hold(tmp_path, monkeypatch):
  import collections
  import numpy as np
  from bonejax.core import memory_plan
  from bonejax.data import importer
  np.save(tmp_path / "im.npy", np.zeros((8, 64, 64), np.uint16))  # 64 KiB raw
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(memory_plan.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000))
  with pytest.raises(errors.UserError, match=r"scan 's0' \(8, 64, 64\) uint16 \(at least a quarter "
                                             r"of its 64.0 KiB, compressed\) need\(s\) 16.0 KiB "
                                             r"of disk, 1000 B free on .*data"):
    importer.import_volume(tmp_path / "im.npy", tmp_path / "data", "s0", progress_every_s=1e9)
  assert not (tmp_path / "data" / "s0").exists()
  monkeypatch.setattr(memory_plan.shutil, "disk_usage", lambda p: usage(10**9, 0, 10**9))
  importer.import_volume(tmp_path / "im.npy", tmp_path / "data", "s0", progress_every_s=1e9)


def test_predict_counts_scratch_tiff_and_probabilities_on_their_disk(tmp_path, monkeypatch):
  import collections
  import types
  from bonejax.core import memory_plan
  from bonejax.predict import plan
  seen = []
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(memory_plan.shutil, "disk_usage",
                      lambda p: seen.append(p) or usage(10**12, 0, 10**6))
  job = types.SimpleNamespace(model_shape=(10, 100, 100), shape=(10, 100, 100), out_of_core=True,
                              scratch_parent=tmp_path)
  outs = plan.Outputs(output=tmp_path / "p.tif", save_probs=tmp_path / "probs.zarr")
  # scratch 10^5 voxels x 3 classes x 4 bytes + the TIFF 10^5 + the probabilities 3 x 10^5:
  # 1.6e6 bytes, 1.5 MiB
  with pytest.raises(errors.UserError, match=r"the out-of-core scratch and --output=.*p.tif and "
                                             r"--save_probs=.*probs.zarr need\(s\) 1.5 MiB of "
                                             r"disk, 976.6 KiB free on " + str(tmp_path)):
    plan._require_disk(job, outs, 3)
  job.out_of_core = False
  plan._require_disk(job, plan.Outputs(output=tmp_path / "p.zarr"), 3)  # compressed labels: 0
  plan._require_disk(job, outs, 3)  # 4 x 10^5 bytes fit
