"""Checkpoints under damage and crashes: fallback past a damaged newest step, and a best bundle
that always equals the best checkpoint (WORKDIR/best), whatever point a run died at.

Runs the smoke demo config (U-Net depth 2 width 4, 32-px patches) for 8 steps on 3 phantom scans
of 32 x 48 x 48, evaluating every 2 steps with the validation loss as the best metric (so the
best model changes at most evaluations), sharded over the suite's 4 fake CPU devices.
"""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from bonejax.core import errors
from bonejax.models import bundle
from bonejax.train import trainer
from bonejax.train.checkpoint import load_state, read_state
from train_helpers import smoke_config


def _config(dataset_path, **overrides):
  # 8 steps; every checkpoint kept and the validation loss as the best metric, so the best model
  # changes at most evaluations.
  return smoke_config(dataset_path, **{"num_steps": 8, "keep_checkpoints": 10,
                                       "best_metric": "loss", **overrides})


@pytest.fixture(scope="module")
def run8(tiny_dataset, tmp_path_factory):
  """One uninterrupted run: (result, workdir)."""
  workdir = tmp_path_factory.mktemp("run8")
  return trainer.train(_config(tiny_dataset), workdir), workdir


def _flat(tree) -> dict[str, np.ndarray]:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    out["/".join(k for k in keys if k != "value")] = np.asarray(leaf)
  return out


def _assert_bundle_is_best(workdir, best_step):
  """WORKDIR/model holds exactly the weights of the best checkpoint and of the train state at
  the best step."""
  b = bundle.load_bundle(workdir / "model")
  assert b.meta["train_step"] == best_step
  got = _flat(nnx.state(b.model, bundle.WEIGHT_FILTER))
  best = read_state(workdir / "best" / str(best_step) / "state")
  want = {**_flat(best["params"]), **_flat(best["batch_stats"])}
  _, latest = load_state(workdir, best_step)  # the train state, in the latest checkpoints
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    lk = _flat(latest["params"]).get(k)
    np.testing.assert_array_equal(got[k], lk if lk is not None else _flat(latest["rest"])[k])


def test_run_keeps_best_and_latest_in_step(run8):
  result, workdir = run8
  assert result["best_step"] is not None
  assert int(sorted((workdir / "best").iterdir(), key=lambda p: int(p.name))[-1].name) == \
      result["best_step"]
  _assert_bundle_is_best(workdir, result["best_step"])


def _copy(run, tmp_path) -> Path:
  shutil.copytree(run[1], tmp_path / "w")
  return tmp_path / "w"


def _newest(workdir) -> int:
  return max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _truncate(path: Path) -> None:
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("damaged", ["host/metadata", "state/_METADATA", "state/d"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(run8, tiny_dataset, tmp_path,
                                                              capfd, damaged):
  workdir = _copy(run8, tmp_path)
  newest = _newest(workdir)
  target = workdir / "checkpoints" / str(newest) / damaged
  _truncate(next(p for p in sorted(target.rglob("*")) if p.is_file()) if target.is_dir()
            else target)
  result = trainer.train(_config(tiny_dataset), workdir)
  err = capfd.readouterr().err
  assert f"{workdir / 'checkpoints' / str(newest)} is unreadable" in err
  assert result["resumed_from"] < newest and result["steps"] == 8
  assert len(list((workdir / "checkpoints.corrupt").iterdir())) == 1
  # The replay from the previous checkpoint is exact: the same final state, best and bundle.
  for a, b in zip(jax.tree.leaves(load_state(workdir)[1]), jax.tree.leaves(load_state(run8[1])[1])):
    np.testing.assert_array_equal(a, b)
  assert result["best_step"] == run8[0]["best_step"]
  _assert_bundle_is_best(workdir, result["best_step"])


def test_no_readable_checkpoint_is_one_line(run8, tiny_dataset, tmp_path):
  workdir = _copy(run8, tmp_path)
  for step in (workdir / "checkpoints").iterdir():
    if step.name.isdigit():
      _truncate(step / "host" / "metadata")
  with pytest.raises(errors.UserError, match=rf"no readable checkpoint in .*the newest, "
                     rf".*checkpoints/{_newest(workdir)}, fails"):
    trainer.train(_config(tiny_dataset), workdir)
  assert not (workdir / "checkpoints.corrupt").exists()  # nothing moved when nothing restores


class Killed(BaseException):
  """Stands in for a kill at a chosen point (raised where the process would have died)."""


@pytest.mark.parametrize("when", ["before_export", "after_export"])
def test_crash_around_the_export_still_ends_with_the_best_bundle(tiny_dataset, tmp_path,
                                                                 monkeypatch, when):
  # Dies at the first new best after step 4, just before (or just after) writing the bundle;
  # the rerun stops at step 5 (it does not replay past the crash to repair it by chance).
  save = bundle.save_weights
  killed = []

  def dying_save(path, weights, meta):
    if meta["train_step"] > 4 and not killed:
      killed.append(meta["train_step"])
      if when == "after_export":
        save(path, weights, meta)
      raise Killed()
    return save(path, weights, meta)

  monkeypatch.setattr(bundle, "save_weights", dying_save)
  with pytest.raises(Killed):
    trainer.train(_config(tiny_dataset), tmp_path)
  assert killed, "no new best after step 4: the crash never happened"
  result = trainer.train(_config(tiny_dataset, stop_after=5), tmp_path)
  _assert_bundle_is_best(tmp_path, result["best_step"])
  assert bundle.read_meta(tmp_path / "model")["checkpoint_id"] == json.loads(
      (tmp_path / "best" / str(result["best_step"]) / "host" / "metadata").read_text())["id"]


def test_missing_or_stale_bundle_is_exported_again(run8, tiny_dataset, tmp_path):
  workdir = _copy(run8, tmp_path)
  shutil.rmtree(workdir / "model")
  result = trainer.train(_config(tiny_dataset), workdir)
  assert result["steps_this_run"] == 0
  _assert_bundle_is_best(workdir, result["best_step"])
  # A bundle that is not the best checkpoint's (here: from another step) is replaced.
  meta = json.loads((workdir / "model" / "model.json").read_text())
  (workdir / "model" / "model.json").write_text(json.dumps({**meta, "checkpoint_id": "other"}))
  trainer.train(_config(tiny_dataset), workdir)
  _assert_bundle_is_best(workdir, result["best_step"])


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])  # rbg: the trainer's keys
def test_a_dropout_stream_survives_save_and_restore(tmp_path, impl):
  # orbax stores a typed PRNG key as its raw key data ((2,) for threefry, (4,) for rbg): the check
  # before a restore must compare that, or every model with dropout (DeepLabV3+'s ASPP,
  # SegFormer) refuses to resume from its own checkpoints.
  from bonejax.train.checkpoint import Checkpoints

  class WithDropout(nnx.Module):
    def __init__(self):
      self.lin = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      self.drop = nnx.Dropout(0.5, rngs=nnx.Rngs(jax.random.key(1, impl=impl)))

  model = WithDropout()
  model.drop.rngs.key.get_value()  # a typed key, as build_model makes them
  state = nnx.state(model)
  ckpt = Checkpoints(tmp_path / "ckpt", async_save=False)
  ckpt.save(3, state, {"step": 3})
  restored, host = ckpt.restore(3, state)
  assert host == {"step": 3}
  np.testing.assert_array_equal(jax.random.key_data(restored["drop"]["rngs"]["key"].get_value()),
                                jax.random.key_data(model.drop.rngs.key.get_value()))
  np.testing.assert_array_equal(restored["lin"]["kernel"].get_value(), model.lin.kernel.get_value())
  # A real mismatch is still refused.
  other = nnx.state(nnx.Linear(2, 4, rngs=nnx.Rngs(0)))
  with pytest.raises(errors.UserError, match="does not fit this configuration"):
    ckpt.restore(3, {"lin": other, "drop": state["drop"]})
