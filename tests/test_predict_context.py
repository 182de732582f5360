"""2.5D prediction: each plane with its 2k + 1 neighbours as channels, for every plane set.

A pointwise model (one linear map of the channels per pixel) makes the prediction a function of
each pixel's stacked planes alone, so a numpy reference can state it exactly: the volume padded
along the axis by numpy's own `np.pad(mode="reflect")`, planes p .. p + 2k of it as channels.
Being pointwise it is also rotation-equivariant and blind to tiling, so in-plane rotations (12
planes), tiles, out-of-core runs and 45-degree sets can be checked against the plain run or
against a 2D model. End to end, `configs/bone_dlfit.py:smoke,context=1` trains a 2.5D model
whose bundle `launch/predict.py` applies to a plain 1-channel scan.
"""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bonejax import predict
from bonejax.core import errors
from bonejax.io import intensity
from bonejax.data import context

REPO = Path(__file__).resolve().parents[1]
K = 2                    # context planes each side
SHAPE = (4, 36, 40)      # 4 planes along Z: k = 2 mirrors at both ends of every plane there


class Pointwise(nnx.Module):
  """logits = x @ w at every pixel: the probabilities show how the channels were stacked."""

  def __init__(self, w: np.ndarray):
    self.w = nnx.Param(jnp.asarray(w, jnp.float32))

  def __call__(self, x):
    return x.astype(jnp.float32) @ self.w[...]


@pytest.fixture(scope="module")
def case():
  rng = np.random.default_rng(0)
  vol = rng.uniform(0, 1000, SHAPE).astype(np.float32)
  w = rng.normal(size=(2 * K + 1, 3)).astype(np.float32)
  return vol, intensity.compute_stats(vol), w


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def reference(vol, stats, w, axis, k=K):
  """(Z, Y, X, K) probabilities of the planes perpendicular to `axis`, stacked by numpy."""
  x = (vol.astype(np.float64) - stats["mean"]) / stats["std"]
  widths = [(0, 0)] * 3
  widths[axis] = (k, k)
  padded = np.pad(x, widths, mode="reflect")
  n = vol.shape[axis]
  stack = np.stack([np.take(padded, np.arange(c, c + n), axis) for c in range(2 * k + 1)], -1)
  return _softmax(stack @ w.astype(np.float64))


def _run(model, vol, stats, **kw):
  return predict.predict_planes(model, vol, stats=stats, rule="zscore", context_slices=K,
                                graph="off", **kw)


def test_read_with_context_matches_numpy():
  vol = np.arange(5 * 2 * 3).reshape(5, 2, 3)
  padded = np.pad(vol, ((3, 3), (0, 0), (0, 0)), mode="reflect")
  for s0, s1 in ((0, 2), (1, 4), (3, 5), (0, 5)):
    got = context.read_with_context(lambda a, b: vol[a:b], 5, s0, s1, 3)
    want = np.stack([padded[s0 + c:s1 + c] for c in range(7)], -1)
    np.testing.assert_array_equal(got, want)


def test_every_axis_stacks_as_numpy_does(case):
  vol, stats, w = case
  got = _run(Pointwise(w), vol, stats, planes=3)
  for axis, probs in enumerate(got):
    np.testing.assert_allclose(probs, reference(vol, stats, w, axis), rtol=1e-4, atol=1e-5)
  # Tiled planes (32-px tiles of the 36 x 40 planes), in-plane rotations (12 planes) and an
  # out-of-core run stack the same planes.
  tiled = _run(Pointwise(w), vol, stats, planes=3, tile_size=32, tile_overlap=0)
  for a, b in zip(tiled, got):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  sets = predict.plane_sets(12)
  twelve = _run(Pointwise(w), vol, stats, sets=sets)
  assert len(sets) == 12 and {ps.k90 for ps in sets} == {0, 1, 2, 3}
  for ps, probs in zip(sets, twelve):
    np.testing.assert_allclose(probs, got[ps.axis], rtol=1e-5, atol=1e-6, err_msg=ps.name)


def test_rotated_sets_and_out_of_core(case):
  vol, stats, w = case
  # A 2.5D model that reads only the centre plane predicts what the same 2D model does, on
  # every set of 9 planes, the 45-degree ones included: the centre channel is the plane itself.
  centre = np.zeros_like(w)
  centre[K] = w[K]
  sets = predict.plane_sets(9)
  flat = predict.predict_planes(Pointwise(w[K:K + 1]), vol, stats=stats, rule="zscore",
                                sets=sets, graph="off")
  deep = _run(Pointwise(centre), vol, stats, sets=sets)
  for ps, a, b in zip(sets, deep, flat):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=ps.name)
  # The whole model, in memory and out of core (slabs with halos from scratch zarr arrays).
  kw = dict(stats=stats, rule="zscore", planes=9, context_slices=K, graph="off",
            return_probs=True)
  labels, probs = predict.predict_volume(Pointwise(w), vol, out_of_core=False, **kw)
  labels_ooc, probs_ooc = predict.predict_volume(Pointwise(w), vol, out_of_core=True,
                                                 memory_budget_gb=0.001, **kw)
  np.testing.assert_allclose(probs_ooc, probs, rtol=1e-5, atol=1e-6)
  assert (labels_ooc == labels).mean() > 0.999


def test_a_multichannel_volume_is_refused_by_a_25d_model(case):
  vol, stats, w = case
  with pytest.raises(errors.UserError, match="expects a 1-channel volume"):
    _run(Pointwise(np.zeros((3 * (2 * K + 1), 3))), np.stack([vol] * 3, -1), stats, planes=1)


def test_recipe_trains_25d_and_predict_py_applies_it(tmp_path):
  # The BONe recipe's smoke variant with 3 planes (k = 1): the bundle says so, and predict.py
  # predicts a plain 1-channel scan with it, every axis.
  from bonejax.train import configlib, trainer
  c = configlib.load_config_file(str(REPO / "configs/bone_dlfit.py") + ":smoke,context=1")
  c.phantom.shape = (32, 32, 40)
  c.num_steps, c.eval_every, c.checkpoint_every = 2, 2, 2
  result = trainer.train(c, tmp_path / "run")
  assert result["steps"] == 2 and result["best_metric"] == "miou_all"
  meta = json.loads((tmp_path / "run/model/model.json").read_text())
  assert meta["context_slices"] == 1 and meta["in_channels"] == 3
  assert meta["normalization"] == "zscore_nonzero"
  out = subprocess.run(
      [sys.executable, str(REPO / "launch/predict.py"), f"--model={tmp_path / 'run/model'}",
       f"--input={tmp_path / 'run/data/scan_002'}", f"--output={tmp_path / 'pred.zarr'}",
       "--planes=3", "--vote=soft"], cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(__import__("os").environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)))
  assert out.returncode == 0, out.stderr[-2000:]
  res = json.loads(out.stdout.strip().splitlines()[-1])
  assert res["shape"] == [32, 32, 40]
