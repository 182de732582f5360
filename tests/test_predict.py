"""The predictor against a plain per-slice loop, voting, tiling, out of core, and the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from flax import nnx

from bonejax import predict
from bonejax.core import errors
from bonejax.data import store
from bonejax.io import intensity
from bonejax.predict import rotate
from bonejax.models.utils import pad_to_multiple

REPO = Path(__file__).resolve().parents[1]
SHAPE = (37, 50, 23)  # odd on purpose
K = 3


class TinyNet(nnx.Module):
  """Two 3x3 convs (receptive field radius 2) with BatchNorm: any NHWC -> logits module."""

  def __init__(self, cin: int = 1, k: int = K, *, rngs: nnx.Rngs):
    self.c1 = nnx.Conv(cin, 6, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(6, rngs=rngs)
    self.c2 = nnx.Conv(6, k, (3, 3), rngs=rngs)
    self.dtype = jnp.float32

  def __call__(self, x):
    x = x.astype(self.dtype)
    return self.c2(jnp.tanh(self.bn(self.c1(x) * 3.0))).astype(jnp.float32)


@pytest.fixture(scope="module")
def model():
  m = TinyNet(rngs=nnx.Rngs(0))
  m.eval()
  return m


@pytest.fixture(scope="module")
def volume():
  rng = np.random.default_rng(0)
  z, y, x = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
  smooth = 1500 + 1000 * np.sin(z / 4.0) * np.cos(y / 5.0) + 800 * np.sin(x / 3.0)
  return np.clip(smooth + rng.normal(0, 200, SHAPE), 0, 65535).astype(np.uint16)


@pytest.fixture(scope="module")
def stats(volume):
  return intensity.compute_stats(volume)


@pytest.fixture(scope="module")
def engine(model):
  """One engine for the module: compiled functions are reused across tests."""
  return predict.make_engine(model, batch_size=4, device_memory_gb=1.0)


# ---------------------------------------------------------------------------------------------
# The reference: one slice at a time through the model, scipy for the 45-degree rotations.
# ---------------------------------------------------------------------------------------------


def reference_set(model, vol, stats, ps, rule="percentile"):
  forward = jax.jit(lambda x: jax.nn.softmax(model(x), axis=-1))
  background = stats["p0_5"]  # new voxels of a rotation look like background, whatever the rule
  v = vol.astype(np.float64)
  v = v if v.ndim == 4 else v[..., None]
  if ps.rot45 is not None:
    rot = rotate.Rotation(ps.rot45, vol.shape[:3])
    rows, cols = rot.forward_coords()
    v = np.stack([np.stack([ndi.map_coordinates(p[..., c], [rows, cols], order=1,
                                                mode="grid-constant", cval=background)
                            for c in range(p.shape[-1])], -1)
                  for p in np.moveaxis(v, ps.rot45, 0)])
    v = np.moveaxis(v, 0, ps.rot45)
    if np.issubdtype(vol.dtype, np.integer):
      v = np.clip(np.rint(v), 0, 65535)
    v = v.astype(vol.dtype)
  out = []
  for plane in np.moveaxis(v, ps.axis, 0):
    x = np.asarray(intensity.normalize(plane, stats, rule))[None]
    x = np.rot90(x, ps.k90, axes=(1, 2))
    xp, (h, w) = pad_to_multiple(np.ascontiguousarray(x), 32)
    p = np.asarray(forward(jnp.asarray(xp)))[:, :h, :w]
    out.append(np.rot90(p, -ps.k90, axes=(1, 2))[0])
  probs = np.moveaxis(np.stack(out), 0, ps.axis)
  if ps.rot45 is not None:
    rows, cols = rot.backward_coords()
    back = [np.stack([ndi.map_coordinates(p[..., c].astype(np.float64), [rows, cols], order=1,
                                          mode="grid-constant", cval=0.0) for c in range(K)], -1)
            for p in np.moveaxis(probs, ps.rot45, 0)]
    probs = np.moveaxis(np.stack(back), 0, ps.rot45)
  return probs


def face_weight_reference(shape, ps, taper):
  """A plane set's soft-vote weights, voxel by voxel in float64 (planesets.face_weights)."""
  w = np.ones(shape, np.float64)
  if ps.rot45 is not None or not taper:
    return w
  for idx in np.ndindex(*shape):
    d = min(min(i, n - 1 - i) for a, (i, n) in enumerate(zip(idx, shape)) if a != ps.axis)
    w[idx] = min(1.0, (d + 1) / taper)
  return w


@pytest.mark.parametrize("planes_", [1, 3, 9])
def test_fast_path_equals_the_per_slice_reference(model, engine, volume, stats, planes_):
  axis = 1 if planes_ == 1 else None
  sets = predict.plane_sets(planes_, axis)
  got = predict.predict_planes(engine, volume, stats=stats, planes=planes_, axis=axis)
  assert len(got) == len(sets)
  refs = []
  for ps, p in zip(sets, got):
    ref = reference_set(model, volume, stats, ps)
    refs.append(ref)
    assert p.shape == SHAPE + (K,) and p.dtype == np.float32
    # Naive sets agree to float rounding; rotated ones to interpolation in float32 vs float64.
    np.testing.assert_allclose(p, ref, atol=1e-5 if ps.rot45 is None else 2e-3,
                               err_msg=ps.name)
  labels = predict.predict_volume(engine, volume, stats=stats, planes=planes_, axis=axis)
  # The default soft vote: each set weighted near the faces its planes cut (face taper).
  weights = [face_weight_reference(SHAPE, ps, predict.DEFAULT_FACE_TAPER)[..., None]
             for ps in sets]
  mean = sum(w * r for w, r in zip(weights, refs)) / sum(weights)
  top2 = np.sort(mean, axis=-1)
  clear = top2[..., -1] - top2[..., -2] > 1e-2  # skip near-ties between the two implementations
  assert labels.dtype == np.uint8 and labels.shape == SHAPE
  assert (labels == mean.argmax(-1))[clear].all()


def test_multichannel_float_volume_nine_planes():
  rng = np.random.default_rng(5)
  vol = rng.normal(0.0, 1.0, (9, 14, 11, 2)).astype(np.float32)
  net = TinyNet(cin=2, rngs=nnx.Rngs(1))
  net.eval()
  stats = intensity.compute_stats(vol)
  got = predict.predict_planes(net, vol, stats=stats, rule="zscore", planes=9, batch_size=4,
                               device_memory_gb=1.0)
  for ps, p in zip(predict.plane_sets(9), got):
    np.testing.assert_allclose(p, reference_set(net, vol, stats, ps, "zscore"),
                               atol=1e-5 if ps.rot45 is None else 2e-3, err_msg=ps.name)
  with pytest.raises(ValueError, match="1-channel"):
    predict.predict_volume(net, vol[..., 0], stats=stats)


def test_twelve_planes_rotate_each_plane_in_place(model, engine, volume, stats):
  sets = predict.plane_sets(12)
  assert len(sets) == 12 and {(ps.axis, ps.k90) for ps in sets} == {
      (a, k) for a in range(3) for k in range(4)}
  pick = [predict.PlaneSet(2, k90=1), predict.PlaneSet(0, k90=2)]
  got = predict.predict_planes(engine, volume, stats=stats, sets=pick)
  for ps, p in zip(pick, got):
    np.testing.assert_allclose(p, reference_set(model, volume, stats, ps), atol=1e-5)


def test_one_compile_per_plane_shape(model, volume, stats):
  engine = predict.make_engine(model, batch_size=4, device_memory_gb=1.0)
  compiles = []
  original = engine._compile
  engine._compile = lambda plan: compiles.append(plan.shape) or original(plan)
  predict.predict_volume(engine, volume, stats=stats, planes=3)
  # Three plane shapes, three compiles: batches are padded, never recompiled per slice...
  assert sorted(compiles) == sorted([(50, 23), (37, 23), (37, 50)])
  # ... and another scan (new statistics: traced scalars) or vote reuses them all.
  predict.predict_volume(engine, volume[::-1].copy(), stats={**stats, "p0_5": 10.0},
                         planes=3, vote="majority")
  assert len(compiles) == 3


def test_plane_sets_and_bad_arguments():
  assert [ps.name for ps in predict.plane_sets(3)] == ["z", "y", "x"]
  nine = predict.plane_sets(9)
  # The six non-redundant 45-degree sets: rotate about a, slice along the two axes it changed.
  assert {(ps.rot45, ps.axis) for ps in nine if ps.rot45 is not None} == {
      (a, b) for a in range(3) for b in range(3) if a != b}
  assert predict.plane_sets(1) == [predict.PlaneSet(0)]
  with pytest.raises(errors.UserError, match="planes"):
    predict.plane_sets(5)
  with pytest.raises(errors.UserError, match="axis"):
    predict.plane_sets(3, axis=1)


def test_three_plane_soft_vote_is_the_mean_of_the_single_axes(engine, volume, stats):
  singles = [predict.axis_probabilities(engine, volume, a, stats=stats) for a in range(3)]
  labels, probs = predict.predict_volume(engine, volume, stats=stats, planes=3, vote="soft",
                                         return_probs=True, face_taper=0)
  mean = (singles[0] + singles[1] + singles[2]) / 3
  np.testing.assert_allclose(probs, mean, atol=1e-6)
  assert (labels == probs.argmax(-1)).all()
  fused, fused_mean = predict.fuse(singles, "soft")
  assert (fused == labels).all()
  np.testing.assert_allclose(fused_mean, mean, atol=1e-6)


def test_majority_vote_by_hand():
  p = lambda *v: np.array(v, np.float32)  # noqa: E731
  # Four plane sets, three voxels, three classes.
  # Voxel 0: three weak votes for class 1 beat one confident 0 (a soft vote says 0).
  # Voxel 1: a 2-2 tie between classes 0 and 2 goes to the tied class with the higher mean
  #          probability (2), although class 1, with no vote, has the highest mean (soft: 1).
  # Voxel 2: a 2-2 tie between classes 1 and 2 goes to 1, the higher mean.
  sets = [np.stack([p(0.40, 0.45, 0.15), p(0.50, 0.45, 0.05), p(0.10, 0.60, 0.30)]),
          np.stack([p(0.40, 0.45, 0.15), p(0.45, 0.40, 0.15), p(0.10, 0.50, 0.40)]),
          np.stack([p(0.98, 0.01, 0.01), p(0.05, 0.45, 0.50), p(0.20, 0.35, 0.45)]),
          np.stack([p(0.30, 0.40, 0.30), p(0.10, 0.40, 0.50), p(0.00, 0.45, 0.55)])]
  sets = [s[None, None] for s in sets]  # (1, 1, 3, K) volumes
  majority, mean = predict.fuse(sets, "majority")
  soft, _ = predict.fuse(sets, "soft")
  assert majority[0, 0].tolist() == [1, 2, 1]
  assert soft[0, 0].tolist() == [0, 1, 1]
  np.testing.assert_allclose(mean, np.mean(sets, axis=0), atol=1e-7)
  # The streaming path's rule is the same function.
  counts = sum(predict.one_hot_argmax(s) for s in sets)
  assert (predict.majority_labels(counts, sum(sets)) == majority).all()


def test_tiled_plane_equals_whole_plane(model):
  rng = np.random.default_rng(1)
  x = rng.integers(0, 4000, (3, 100, 130)).astype(np.uint16)
  whole = predict.PlaneEngine(model, batch_size=2)
  tiled = predict.PlaneEngine(model, batch_size=2, tile_size=64, tile_overlap=32)
  fitted = predict.PlaneEngine(model, batch_size=2, device_budget_bytes=700_000)
  for e in (whole, tiled, fitted):
    e.set_normalization({"p0_5": 100.0, "p99_9": 3900.0}, "percentile")
  ref = whole.infer(x)
  assert whole.plan((100, 130), np.uint16).tile is None
  for e in (tiled, fitted):
    got = e.infer(x)
    plan = e.plan((100, 130), np.uint16)
    assert plan.tile is not None, e.describe()
    # The window is zero within overlap/4 = 8 px of interior tile edges, beyond this model's
    # receptive field (2 px): tiled equals whole everywhere, up to float rounding.
    np.testing.assert_allclose(got, ref, atol=1e-6)
  assert fitted.plan((100, 130), np.uint16).device_bytes <= 700_000
  # The blend weights of neighbouring tiles sum to one over their overlap.
  w1 = predict.blend_window(64, 8, 16, True, False)
  w2 = predict.blend_window(64, 8, 16, False, True)
  np.testing.assert_allclose(w1[32:] + w2[:32], 1.0, atol=1e-12)


@pytest.mark.parametrize("planes_,vote", [(3, "soft"), (9, "majority")])
def test_out_of_core_equals_in_memory(engine, volume, stats, tmp_path, planes_, vote):
  kw = dict(stats=stats, planes=planes_, vote=vote, memory_budget_gb=0.001, return_probs=True,
            return_info=True)
  mem_labels, mem_probs, mem_info = predict.predict_volume(engine, volume, out_of_core=False,
                                                           **kw)
  ooc_labels, ooc_probs, ooc_info = predict.predict_volume(engine, volume, out_of_core=True,
                                                           scratch_dir=tmp_path, **kw)
  assert mem_info["mode"] == "in_memory" and ooc_info["mode"] == "out_of_core"
  assert ooc_info["scratch_chunk"] < 32  # the tiny budget forced small chunks and many slabs
  assert (mem_labels == ooc_labels).all()
  np.testing.assert_allclose(mem_probs, ooc_probs, atol=1e-6)
  assert not any(tmp_path.iterdir())  # the scratch space is gone


def test_bfloat16_compute_is_close(model, volume, stats):
  e32 = predict.make_engine(model, batch_size=4, device_memory_gb=1.0)
  e16 = predict.make_engine(model, batch_size=4, device_memory_gb=1.0, dtype="bfloat16")
  p32 = predict.axis_probabilities(e32, volume[:8], 0, stats=stats)
  p16 = predict.axis_probabilities(e16, volume[:8], 0, stats=stats)
  assert np.abs(p32 - p16).max() < 0.05
  assert np.abs(p32 - p16).max() > 0  # it really ran in bfloat16


# ---------------------------------------------------------------------------------------------
# Scans, bundles and the command line.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory, volume):
  from bonejax import models
  from bonejax.models import bundle
  root = tmp_path_factory.mktemp("predict")
  # Abstract model, weights filled from numpy: creating it eagerly costs far more on a busy CPU.
  abstract = nnx.eval_shape(lambda: models.create("unet", num_classes=K, in_channels=1,
                                                  rngs=nnx.Rngs(0), depth=2, width=4))
  net = models.fill_from_numpy(abstract, 0)
  meta = bundle.make_meta(model_name="unet", model_kwargs={"depth": 2, "width": 4},
                          classes=["background", "bone", "pore"], in_channels=1,
                          normalization="percentile", patch_size=32, train_axes=[0, 1, 2])
  bundle.save_bundle(root / "model", net, meta)
  small = volume[:9, :20, :15]
  store.write_scan(root / "scan", small)
  np.save(root / "vol.npy", small)
  np.save(root / "vol2c.npy", np.stack([small, small], -1))
  nan = small.astype(np.float32)
  nan[3, 4, 5] = np.nan
  np.save(root / "nan.npy", nan)
  old = json.loads((root / "model" / "model.json").read_text())
  (root / "old").mkdir()
  (root / "old" / "model.json").write_text(json.dumps({**old, "format_version": 0}))
  return root


def test_predict_scan_writes_labels_attributes_and_probs(files):
  out, probs = files / "pred.zarr", files / "probs.zarr"
  res = predict.predict_scan(files / "model", files / "scan", output=out, save_probs=probs,
                             planes=3, vote="majority", progress=False)
  assert res["shape"] == [9, 20, 15] and res["voxels_per_second"] > 0
  labels = store.open_array(out).read().result()
  assert labels.dtype == np.uint8 and labels.shape == (9, 20, 15)
  attrs = json.loads((out / "zarr.json").read_text())["attributes"]
  assert attrs["planes"] == 3 and attrs["vote"] == "majority" and len(attrs["classes"]) == K
  p = store.open_array(probs).read().result()
  assert p.shape == (9, 20, 15, K) and np.allclose(p.sum(-1), 1.0, atol=1e-5)
  # Same answer from the .npy (statistics computed while reading) and in the Python API.
  res2 = predict.predict_scan(files / "model", files / "vol.npy", planes=3, vote="majority",
                              progress=False)
  assert (res2["labels"] == labels).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(source="vol2c.npy"), "2 channel"),
    (dict(source="vol.npy", model="old"), "format version"),
    (dict(source="vol.npy", model="missing"), "does not exist"),
    (dict(source="vol.npy", output="exists.zarr"), "exists"),
])
def test_bad_inputs_leave_nothing(files, kwargs, match):
  (files / "exists.zarr").mkdir(exist_ok=True)
  output = files / kwargs.get("output", "bad.zarr")
  with pytest.raises(errors.UserError, match=match):
    predict.predict_scan(files / kwargs.get("model", "model"), files / kwargs["source"],
                         output=output, progress=False)
  if output.name == "bad.zarr":
    assert not output.exists()
  assert not [p for p in files.iterdir() if ".tmp-" in p.name or "bonejax-predict" in p.name]


def _cli(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, str(REPO / "launch" / "predict.py"), *args],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def test_cli_tiff_output_and_result_line(files):
  out = files / "pred.tif"
  r = _cli(f"--model={files / 'model'}", f"--input={files / 'vol.npy'}", f"--output={out}",
           "--planes=1", "--axis=2", "--dtype=bfloat16")
  assert r.returncode == 0, r.stderr[-2000:]
  result = json.loads(r.stdout.strip().splitlines()[-1])
  for key in ("output", "shape", "seconds", "voxels_per_second", "planes", "vote", "classes"):
    assert key in result
  assert result["planes"] == 1 and result["axis"] == 2
  assert "planes/s" in r.stderr
  import tifffile
  assert tifffile.imread(out).shape == (9, 20, 15)


@pytest.mark.parametrize("args,match", [
    (["--planes=5"], "planes"),
    (["--planes=3", "--axis=1"], "axis"),
    (["--input=nan.npy"], "NaN"),
])
def test_cli_bad_inputs_one_line_error(files, args, match):
  out = files / "cli_bad.zarr"
  base = {"--model": str(files / "model"), "--input": str(files / "vol.npy"),
          "--output": str(out)}
  for a in args:
    key, value = a.split("=", 1)
    base[key] = str(files / value) if key == "--input" else value
  r = _cli(*[f"{k}={v}" for k, v in base.items()])
  assert r.returncode != 0
  lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
  assert lines[-1].startswith("error:") and match in lines[-1], r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  assert not out.exists()
  assert not [p for p in files.iterdir() if ".tmp-" in p.name or "bonejax-predict" in p.name]
