"""predict_scan with bundles: compute dtype, the 45-degree fill under z-score, channel inputs."""

import numpy as np
import pytest

from bonejax import predict
from bonejax.core import errors
from bonejax.data import store
from bonejax.io import intensity
from bonejax.models import bundle
from bundle_helpers import make_bundle, phantom

def test_loaded_bundle_and_bundle_path_agree_in_bfloat16(tmp_path):
  model = make_bundle(tmp_path / "model")
  np.save(tmp_path / "vol.npy", phantom((6, 20, 15)))
  kw = dict(planes=3, progress=False, batch_size=4)

  def probs(model_arg, name, dtype):
    out = tmp_path / f"{name}.zarr"
    predict.predict_scan(model_arg, tmp_path / "vol.npy", save_probs=out, dtype=dtype, **kw)
    return store.open_array(out).read().result()

  by_path = probs(model, "path", "bfloat16")
  loaded = probs(bundle.load_bundle(model), "loaded", "bfloat16")
  # The same network either way: the float32 stem and head stay float32 in both.
  np.testing.assert_array_equal(loaded, by_path)
  assert np.abs(by_path - probs(model, "f32", "float32")).max() > 0  # bfloat16 really ran


def test_rotated_corners_show_the_model_background_under_zscore(tmp_path):
  """45-degree sets fill new voxels with the background's raw value, not the mean intensity.

  The volume is background (100) with a bright block inside; the model (depth 1: receptive
  field radius 2) sees around every voxel on the volume's outer faces only background -- the
  volume's own and the rotation's fill -- so it must answer there as on a plane of background.
  """
  b = bundle.load_bundle(make_bundle(tmp_path / "model", normalization="zscore", depth=1))
  shape = (16, 30, 26)
  vol = np.full(shape, 100, np.uint16)
  rng = np.random.default_rng(0)
  vol[6:-6, 8:-8, 8:-8] = rng.integers(3000, 5000, (4, 14, 10))
  stats = intensity.compute_stats(vol)
  assert stats["p0_5"] == 100 and stats["mean"] > 200  # z-score: 0 is mid-grey, not background
  engine = predict.make_engine(b.model, batch_size=4, device_memory_gb=1.0)
  sets = [ps for ps in predict.plane_sets(9) if ps.rot45 is not None]
  got = predict.predict_planes(engine, vol, stats=stats, rule=b.normalization, sets=sets)
  flat = engine.infer(np.full((1, 32, 32), 100, np.uint16))[0, 16, 16]  # background's answer
  for ps, p in zip(sets, got):
    a = ps.rot45
    plane = np.moveaxis(p, a, 0)[3:-3]  # (along a, P, Q, K), clear of the ends along a
    m = 5                               # clear of the plane's corners (its rotated grid's edges)
    faces = np.concatenate([plane[:, 0, m:-m], plane[:, -1, m:-m],
                            plane[:, m:-m, 0], plane[:, m:-m, -1]], axis=1)
    np.testing.assert_allclose(faces, np.broadcast_to(flat, faces.shape), atol=1e-4,
                               err_msg=ps.name)


def test_multichannel_npy_and_zarr_inputs(tmp_path):
  model = make_bundle(tmp_path / "model", in_channels=2, depth=2)
  vol = np.stack([phantom((6, 20, 15)), phantom((6, 20, 15), 1)], -1)
  np.save(tmp_path / "v.npy", vol)
  store.create_array(tmp_path / "v.zarr", (1,) + vol.shape, vol.dtype).write(vol[None]).result()
  ref = predict.predict_volume(bundle.load_bundle(model).model, vol, planes=3, batch_size=4)
  for name in ("v.npy", "v.zarr"):
    res = predict.predict_scan(model, tmp_path / name, planes=3, progress=False, batch_size=4)
    assert res["input_kind"] == "channels" and res["shape"] == [6, 20, 15]
    np.testing.assert_array_equal(res["labels"], ref)
  np.save(tmp_path / "one.npy", vol[..., 0])
  with pytest.raises(errors.UserError, match="1 channel.*expects in_channels=2"):
    predict.predict_scan(model, tmp_path / "one.npy", progress=False)
