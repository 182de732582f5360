"""3D sliding-window prediction (bonejax/predict/windows3d.py) against a plain whole-volume loop.

The reference pads the whole scan, runs every window alone through the model (flipped and
flipped back for test-time flips), weights it with the Gaussian and divides by the summed
weights: no Z slabs, no batches, no devices. The predictor must agree to float rounding in
memory and in Z groups with a carried overlap (a tiny memory budget), on 1 and 4 devices.
"""

import math
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bonejax import models
from bonejax.core import errors
from bonejax.data import store
from bonejax.evaluate import uncertainty
from bonejax.io import intensity
from bonejax.predict import windows3d
from bonejax.predict.volumes import SlabVolume
from bundle_helpers import phantom

STATS = {"p0_5": 500.0, "p99_9": 3500.0}
SHAPE = (37, 13, 26)  # not multiples of the window or its step; Y smaller than a window


@pytest.fixture(scope="module")
def net():
  model = models.fill_from_numpy(models.abstract_model(
      models.create, "unet3d", num_classes=3, in_channels=1, depth=2, width=2), 3)
  model.eval()
  return model


@pytest.fixture(scope="module")
def vol():
  return phantom(SHAPE, seed=2)


def reference(model, vol, window, overlap, flips=1):
  """A numpy loop over every window of the padded scan, float64 sums."""
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda x: jax.nn.softmax(nnx.merge(graphdef, state)(x), -1))
  off, scale, clip = intensity.normalize_params(STATS, "percentile")
  x = np.clip((vol.astype(np.float32) - off) * scale, 0, 1)
  w = tuple(min(window, -(-s // 2) * 2) for s in vol.shape)  # stride 2 for depth 2
  padded = tuple(max(s, v) for s, v in zip(vol.shape, w))
  x = np.pad(x, [(0, p - s) for p, s in zip(padded, vol.shape)], mode="reflect")
  g = windows3d.gaussian_importance(w).astype(np.float64)
  acc = np.zeros(padded + (3,))
  wsum = np.zeros(padded)
  for z in windows3d.window_starts(padded[0], w[0], overlap):
    for y in windows3d.window_starts(padded[1], w[1], overlap):
      for xx in windows3d.window_starts(padded[2], w[2], overlap):
        win = x[z:z + w[0], y:y + w[1], xx:xx + w[2]]
        p = 0
        for axes in windows3d.FLIPS[:flips]:
          q = np.asarray(fwd(jnp.asarray(np.flip(win, axes).copy())[None, ..., None]))[0]
          p = p + np.flip(q, axes)
        acc[z:z + w[0], y:y + w[1], xx:xx + w[2]] += p / flips * g[..., None]
        wsum[z:z + w[0], y:y + w[1], xx:xx + w[2]] += g
  mean = acc / wsum[..., None]
  return mean[:vol.shape[0], :vol.shape[1], :vol.shape[2]]


def test_gaussian_and_window_grid():
  g = windows3d.gaussian_importance((16, 16, 24))
  assert g.shape == (16, 16, 24) and g.dtype == np.float32 and g.max() == pytest.approx(1, 1e-6)
  np.testing.assert_allclose(g, g[::-1, ::-1, ::-1], atol=1e-7)  # symmetric
  # sigma = side / 8 (3 voxels of 24) about the centre 11.5, scaled to a maximum of 1.
  line = windows3d.gaussian_importance((1, 1, 24))[0, 0]
  want = np.exp(-0.5 * ((np.arange(24) - 11.5) / 3.0)**2)
  np.testing.assert_allclose(line, want / want.max(), rtol=1e-5)
  assert g.min() > 0
  assert windows3d.window_starts(37, 16, 0.5) == [0, 7, 14, 21]
  assert windows3d.window_starts(16, 16, 0.5) == [0]
  assert windows3d.window_starts(40, 16, 0.0) == [0, 12, 24]


@pytest.mark.parametrize("budget_gb,flips", [(1.0, 1), (2e-5, 1), (2e-5, 4)])
def test_matches_the_whole_volume_loop(net, vol, budget_gb, flips):
  want = reference(net, vol, 16, 0.5, flips)
  got = windows3d.predict_volume_3d(net, vol, stats=STATS, window=16, overlap=0.5,
                                    flips=flips, batch_size=2, devices=1, keep_probs=True,
                                    memory_budget_gb=budget_gb)
  if budget_gb < 1:
    assert got.plan.group < len(got.plan.starts[0]), "the budget forces several Z groups"
  else:
    assert got.plan.group == len(got.plan.starts[0])
  assert got.probabilities.shape == SHAPE + (3,)
  np.testing.assert_allclose(got.probabilities, want, atol=2e-6)
  assert (got.labels == np.argmax(want, -1)).mean() > 0.999  # ties at float rounding only


def test_four_devices_equal_one_and_outputs_go_to_slab_volumes(net, vol, tmp_path):
  assert jax.local_device_count() >= 4, "conftest sets jax_num_cpu_devices=4"
  one = windows3d.predict_volume_3d(net, vol, stats=STATS, window=16, batch_size=1, devices=1,
                                    keep_probs=True, memory_budget_gb=2e-5)
  labels = SlabVolume(store.create_array(tmp_path / "l.zarr", SHAPE, np.uint8, (8, 8, 8)))
  probs = SlabVolume(np.zeros(SHAPE + (3,), np.float32))
  four = windows3d.predict_volume_3d(net, vol, stats=STATS, window=16, batch_size=1,
                                     keep_labels=False, labels_out=labels, probs_out=probs,
                                     memory_budget_gb=2e-5)
  assert four.plan.devices == 4 and four.labels is None
  p = four.plan
  assert p.group * len(p.starts[1]) * len(p.starts[2]) % 4 != 0, "last batches are padded"
  assert p.padded[1] > SHAPE[1], "Y is padded up to a window"
  np.testing.assert_allclose(probs.arr, one.probabilities, atol=1e-6)
  np.testing.assert_array_equal(store.open_array(tmp_path / "l.zarr").read().result(),
                                one.labels)


def test_uncertainty_is_the_spread_of_the_flips(net, vol, tmp_path):
  with uncertainty.UncertaintyWriter(tmp_path / "u.zarr", SHAPE) as writer:
    res = windows3d.predict_volume_3d(net, vol, stats=STATS, window=16, flips=8, devices=1,
                                      keep_probs=True, uncertainty_out=writer,
                                      memory_budget_gb=2e-5)
  u = store.open_array(tmp_path / "u.zarr").read().result()
  assert u.shape == SHAPE + (2,)
  p = np.clip(res.probabilities, 1e-12, 1)
  ent = -(p * np.log(p)).sum(-1) / math.log(3)
  assert np.abs(u[..., 0].astype(float) - np.rint(ent * 255)).max() <= 1
  assert u[..., 1].max() > 0, "random weights: the flips disagree somewhere"
  # Disagreement: the Gaussian-blended fraction of flips voting another class, in [0, 1].
  assert u[..., 1].min() == 0


def test_host_memory_is_bounded_by_the_plan(net, tmp_path):
  """Out of core: labels to disk, Z groups; peak host allocations near the plan, not the scan."""
  shape = (160, 32, 32)
  vol = phantom(shape, seed=5)
  labels = SlabVolume(store.create_array(tmp_path / "l.zarr", shape, np.uint8, (16, 32, 32)))
  small = windows3d.make_plan(shape, 16, 0.5, 2, 3, 1, 1, 1, 4e-4, False)
  whole = windows3d.make_plan(shape, 16, 0.5, 2, 3, 1, 1, 1, 1.0, False)
  assert small.group < whole.group and small.host_bytes < whole.host_bytes / 3
  windows3d.predict_volume_3d(net, vol, stats=STATS, window=16, devices=1, keep_labels=False,
                              labels_out=labels, memory_budget_gb=1e-4)  # compile first
  tracemalloc.start()
  res = windows3d.predict_volume_3d(net, vol, stats=STATS, window=16, devices=1,
                                    keep_labels=False, labels_out=labels,
                                    memory_budget_gb=4e-4)
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert res.plan.host_bytes == small.host_bytes
  accumulators_whole = math.prod(shape) * 4 * 4  # probabilities + weights of the whole scan
  assert peak < 3 * small.host_bytes + 2**20 < accumulators_whole


def test_bad_input_is_one_clear_error(net, vol):
  two_d = models.fill_from_numpy(models.abstract_model(
      models.create, "unet", num_classes=3, in_channels=1, depth=2, width=2))
  with pytest.raises(errors.UserError, match="not a 3D model"):
    windows3d.predict_volume_3d(two_d, vol, stats=STATS)
  with pytest.raises(errors.UserError, match="intensity statistics"):
    windows3d.predict_volume_3d(net, vol)
  with pytest.raises(errors.UserError, match="overlap"):
    windows3d.predict_volume_3d(net, vol, stats=STATS, overlap=1.0)
  with pytest.raises(errors.UserError, match="takes 1 channel.*has 2"):
    windows3d.predict_volume_3d(net, np.zeros(SHAPE + (2,), np.uint16), stats=STATS)


def test_a_bundle_and_a_file_source(net, vol, tmp_path):
  """What the Predictor hands over for a 3D bundle: the bundle (its normalisation rule) and a
  lazily read source from the io registry."""
  from bonejax.io import registry
  from bonejax.models import bundle
  meta = bundle.make_meta(model_name="unet3d", model_kwargs=dict(depth=2, width=2),
                          classes=["background", "bone", "pore"], in_channels=1,
                          normalization="zscore", patch_size=16, train_axes=[0, 1, 2])
  bundle.save_bundle(tmp_path / "model", net, meta)
  np.save(tmp_path / "vol.npy", vol)
  stats = {"mean": 1500.0, "std": 700.0}
  b = bundle.load_bundle(tmp_path / "model")
  engine = windows3d.make_window_engine(b, devices=2)
  got = windows3d.predict_volume_3d(engine, registry.open_volume(tmp_path / "vol.npy"),
                                    stats=stats, window=16, keep_probs=True)
  again = windows3d.predict_volume_3d(engine, vol[::-1].copy(), stats=stats, window=16)
  assert engine.compilations == 1 and again.labels.shape == SHAPE  # compiled once, reused
  want = windows3d.predict_volume_3d(net, vol, stats=stats, normalization="zscore", window=16,
                                     devices=1, keep_probs=True)
  np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-6)
  assert got.summary()["devices"] == 2 and got.summary()["windows"] == got.plan.windows

  meta2d = bundle.make_meta(model_name="unet", model_kwargs=dict(depth=2, width=2),
                            classes=["background", "bone", "pore"], in_channels=1,
                            normalization="zscore", patch_size=16, train_axes=[0])
  bundle.save_bundle(tmp_path / "model2d", models.fill_from_numpy(models.abstract_model(
      models.create, "unet", num_classes=3, in_channels=1, depth=2, width=2)), meta2d)
  with pytest.raises(errors.UserError, match="'unet' is 2D"):
    windows3d.predict_volume_3d(bundle.load_bundle(tmp_path / "model2d"), vol, stats=stats)


def test_z_ranges_put_together_are_the_whole(net, vol):
  """Several processes: each finishes its own Z range (chunk-aligned), running the windows that
  reach it; the ranges together give the single-process result."""
  whole = windows3d.predict_volume_3d(net, vol, stats=STATS, window=16, devices=1,
                                      keep_probs=True, memory_budget_gb=2e-5)
  shares = windows3d.z_shares(SHAPE[0], 3, align=8)
  assert shares[0][0] == 0 and shares[-1][1] == SHAPE[0]
  assert all(a % 8 == 0 for a, _ in shares) and all(b > a for a, b in shares)
  probs = np.zeros_like(whole.probabilities)
  runs = 0
  for a, b in shares:
    part = windows3d.predict_volume_3d(net, vol, stats=STATS, window=16, devices=1,
                                       keep_probs=True, memory_budget_gb=2e-5, z_range=(a, b))
    probs[a:b] = part.probabilities[a:b]
    assert not part.probabilities[:a].any() and not part.probabilities[b:].any()
    runs += part.windows_run
  np.testing.assert_allclose(probs, whole.probabilities, atol=1e-6)
  assert whole.windows_run < runs < 3 * whole.windows_run  # the halos are run twice
  with pytest.raises(errors.UserError, match="z_range"):
    windows3d.predict_volume_3d(net, vol, stats=STATS, z_range=(5, 5))
