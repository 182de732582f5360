"""Resampling: the grid maps, slab reads equal whole reads, import --resample_um, and one bundle
predicting one phantom made at two voxel sizes equally well because predict resamples.

The two-voxel-size test uses a deterministic stand-in model rather than a trained network: a
fixed 5 x 5 box filter thresholded at half intensity. Like any CNN it sees pixels, not
micrometres (its footprint is 5 um at 1 um voxels, 10 um at 2 um), so predicting the 2 um scan
on its own grid erodes the spheres; predicting it at the bundle's 1 um and mapping the
probabilities back must not. It runs in about a second, where training a network to the same
scale sensitivity would take minutes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tifffile
from flax import nnx

from bonejax import predict
from bonejax.data import store
from bonejax.evaluate import metrics
from bonejax.data import importer
from bonejax.io import registry, resample
from bonejax.models import bundle


def test_axis_map_shares_the_outer_edges():
  i0, i1, w = resample.axis_map(4, 4, 1)
  assert i0.tolist() == [0, 1, 2, 3] and not w.any()
  i0, i1, w = resample.axis_map(4, 8, 1)  # upsampling: output centres at -0.25, 0.25, ...
  assert i0.tolist() == [0, 0, 0, 1, 1, 2, 2, 3] and np.allclose(w[1:7], [0.25, .75] * 3)
  i, _, _ = resample.axis_map(8, 4, 0)  # nearest, downsampling by 2: centres at 0.5, 2.5, ...
  assert i.tolist() == [1, 3, 5, 7]
  assert resample.resampled_shape((12, 10, 9), (2, 1.5, 1.5), 3) == (8, 5, 4)


def test_linear_ramp_is_reproduced_and_slabs_equal_whole(tmp_path, monkeypatch):
  z = np.arange(20, dtype=np.float32)[:, None, None] * np.ones((20, 8, 6), np.float32)
  np.save(tmp_path / "ramp.npy", z)
  src = registry.open_volume(tmp_path / "ramp.npy")
  src.voxel_size_um = (1.0, 1.0, 1.0)
  up = resample.ResampledSource(src, 0.5)
  assert up.shape == (40, 16, 12)
  whole = up.read_slab(0, 40)
  # Interior output slices lie on the ramp: value = input coordinate (i + 0.5) / 2 - 0.5.
  want = (np.arange(40) + 0.5) / 2 - 0.5
  np.testing.assert_allclose(whole[1:-1, 3, 3], want[1:-1], atol=1e-5)
  monkeypatch.setattr(resample, "MAX_INPUT_SLICES", 3)  # many small reads, same answer
  parts = np.concatenate([up.read_slab(a, min(a + 7, 40)) for a in range(0, 40, 7)])
  np.testing.assert_array_equal(parts, whole)


def test_import_resamples_image_linearly_and_labels_by_nearest(tmp_path):
  rng = np.random.default_rng(0)
  img = rng.integers(0, 4000, (16, 12, 10)).astype(np.uint16)
  lab = np.zeros(img.shape, np.uint8)
  lab[4:12, 3:9, 2:8] = 1
  lab[6:8, 5:7, 4:6] = 2
  tifffile.imwrite(tmp_path / "img.tif", img, imagej=True, resolution=(1 / 2.0, 1 / 2.0),
                   metadata={"spacing": 2.0, "unit": "um", "axes": "ZYX"})
  np.save(tmp_path / "lab.npy", lab)
  r = importer.import_volume(image=tmp_path / "img.tif", labels=tmp_path / "lab.npy",
                              out=tmp_path / "D", scan="s", resample_um=4, slab=3,
                              progress_every_s=1e9)
  assert r["shape"] == [8, 6, 5] and r["voxel_size_um"] == 4.0 and r["dtype"] == "uint16"
  scan = store.open_scan(tmp_path / "D" / "s")
  assert scan.voxel_size_um == 4.0
  assert scan.attrs["resampled_from"] == {"shape": [16, 12, 10], "voxel_size_um": [2.0] * 3}
  labels = scan.read_labels()
  # Nearest neighbour: output (i) takes input 2i + 1, no new label values.
  np.testing.assert_array_equal(labels, lab[1::2, 1::2, 1::2])
  # Linear: each output voxel is the mean of the 2x2x2 block around its centre.
  block = img.astype(np.float64).reshape(8, 2, 6, 2, 5, 2).mean(axis=(1, 3, 5))
  np.testing.assert_array_equal(scan.read_image(), np.rint(block).astype(np.uint16))


# ---------------------------------------------------------------------------------------------
# One bundle, two voxel sizes.
# ---------------------------------------------------------------------------------------------


class BoxNet(nnx.Module):
  """A 5 x 5 box mean of the normalised plane, thresholded at 0.5: background / bone logits."""

  def __init__(self, width: int = 5):
    self.width, self.dtype = width, jnp.float32

  def __call__(self, x):
    w = self.width
    m = jax.lax.reduce_window(x.astype(jnp.float32), 0.0, jax.lax.add, (1, w, w, 1),
                              (1, 1, 1, 1), "SAME") / (w * w)
    logit = 12.0 * (m - 0.5)
    return jnp.concatenate([-logit, logit], axis=-1)


def sphere_phantom(voxel_um, extent_um=60, seed=0):
  """The same spheres (radius 5-12 um) sampled at voxel centres of a `voxel_um` grid."""
  rng = np.random.default_rng(seed)
  c = (np.arange(int(round(extent_um / voxel_um))) + 0.5) * voxel_um
  z, y, x = np.meshgrid(c, c, c, indexing="ij")
  inside = np.zeros(z.shape, bool)
  for _ in range(10):
    p, r = rng.uniform(8, extent_um - 8, 3), rng.uniform(5, 12)
    inside |= (z - p[0]) ** 2 + (y - p[1]) ** 2 + (x - p[2]) ** 2 <= r * r
  return (1000 + 2000 * inside).astype(np.uint16), inside.astype(np.uint8)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
  root = tmp_path_factory.mktemp("two_sizes")
  out = {}
  for v in (1.0, 2.0):
    img, lab = sphere_phantom(v)
    path = root / f"phantom_{v:g}um.tif"
    tifffile.imwrite(path, img, imagej=True, resolution=(1 / v, 1 / v),
                     metadata={"spacing": v, "unit": "um", "axes": "ZYX"})
    out[v] = (path, lab)
  return out


def boxnet_bundle(voxel_size_um=1.0):
  meta = bundle.make_meta(model_name="boxnet", model_kwargs={}, classes=["background", "bone"],
                          in_channels=1, normalization="percentile", patch_size=32,
                          train_axes=[0, 1, 2], voxel_size_um=voxel_size_um)
  return bundle.Bundle(BoxNet(), meta)


def bone_iou(labels, truth):
  return metrics.scores(metrics.confusion_matrix(labels, truth, 2), ["bg", "bone"])["iou"][1]


def test_two_voxel_sizes_predict_alike_through_one_bundle(phantoms):
  b = boxnet_bundle(1.0)
  kw = dict(planes=3, progress=False, batch_size=8)
  iou, plain = {}, {}
  for v, (path, truth) in phantoms.items():
    res = predict.predict_scan(b, path, **kw)
    assert res["labels"].shape == truth.shape  # the output is on the input grid
    assert res["voxel_size_um"] == [v] * 3 and res["model_voxel_size_um"] == [1.0] * 3
    assert (res["resampled"] is not None) == (v != 1.0)
    iou[v] = bone_iou(res["labels"], truth)
    plain[v] = bone_iou(predict.predict_scan(b, path, resample=False, **kw)["labels"], truth)
  assert iou[1.0] > 0.9 and abs(iou[1.0] - iou[2.0]) < 0.02, iou
  # Without resampling the model sees 10 um through its 5 px footprint: it loses bone.
  assert plain[1.0] == iou[1.0] and iou[2.0] - plain[2.0] > 0.1, (iou, plain)


@pytest.mark.parametrize("vote", ["soft", "majority", "max"])
def test_resampled_prediction_out_of_core_equals_in_memory(phantoms, tmp_path, vote):
  b = boxnet_bundle(1.0)
  path, _ = phantoms[2.0]
  kw = dict(planes=3, progress=False, batch_size=8, vote=vote)
  mem = predict.predict_scan(b, path, out_of_core=False, **kw)
  out = tmp_path / "pred.zarr"
  ooc = predict.predict_scan(b, path, output=out, out_of_core=True, memory_budget_gb=0.005,
                             keep_labels=True, **kw)
  assert ooc["mode"] == "out_of_core"
  np.testing.assert_array_equal(ooc["labels"], mem["labels"])
  attrs = store.array_attrs(out)
  assert attrs["voxel_size_um"] == 2.0 and attrs["predicted_at_voxel_size_um"] == [1.0] * 3


def test_unknown_voxel_size_predicts_as_is(tmp_path, phantoms):
  path, truth = phantoms[2.0]
  np.save(tmp_path / "p.npy", tifffile.imread(path))  # .npy: no voxel size
  res = predict.predict_scan(boxnet_bundle(1.0), tmp_path / "p.npy", planes=1, progress=False)
  assert res["voxel_size_um"] is None and res["resampled"] is None


# ---------------------------------------------------------------------------------------------
# A 3D bundle: windows on the bundle's grid, probabilities mapped back to the input's.
# ---------------------------------------------------------------------------------------------

CLASSES3 = ["background", "bone", "pore"]
SCAN3_UM, BUNDLE3_UM = (2.0, 1.5, 1.0), (1.0, 1.0, 1.5)  # anisotropic, other on every axis


def unet3d_bundle(path, voxel_size_um):
  """A classic 3D U-Net bundle (depth 2, width 2; numpy-drawn weights), 16^3 windows."""
  from bonejax import models
  kwargs = {"depth": 2, "width": 2}
  net = models.fill_from_numpy(models.abstract_model(
      models.create, "unet3d", num_classes=len(CLASSES3), in_channels=1, **kwargs), 3)
  meta = bundle.make_meta(model_name="unet3d", model_kwargs=kwargs, classes=CLASSES3,
                          in_channels=1, normalization="percentile", patch_size=16,
                          train_axes=[0, 1, 2], patch_size_zyx=[16, 16, 16], predict_window=16,
                          predict_overlap=0.5, voxel_size_um=list(voxel_size_um))
  bundle.save_bundle(path, net, meta)
  return path


def anisotropic_scan(path, shape=(10, 14, 18), seed=4):
  from bonejax.io import voxel
  from bundle_helpers import phantom
  store.write_scan(path, phantom(shape, seed=seed), attrs=voxel.voxel_attrs(SCAN3_UM))
  return path


def map_back(probs, out_shape):
  """The reference back-map: separable linear interpolation by np.interp in float64, output
  voxel i at input coordinate (i + 0.5) n_in / n_out - 0.5 (the grids share their outer edges)."""
  p = probs.astype(np.float64)
  for axis, n_out in enumerate(out_shape):
    n_in = p.shape[axis]
    x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    p = np.apply_along_axis(lambda v: np.interp(x, np.arange(n_in), v), axis, p)
  return p


def test_3d_bundle_resamples_the_input_and_maps_the_probabilities_back(tmp_path):
  """Reference: the windows run by hand on the input resampled to the bundle's grid, their
  probabilities mapped back by `map_back`. In memory, and out of core (staged in a scratch
  zarr, mapped back in slabs of a small budget), the predictor gives those probabilities and
  their argmax."""
  from bonejax.predict import source as source_lib, windows3d
  from bonejax.evaluate import uncertainty
  model = unet3d_bundle(tmp_path / "model", BUNDLE3_UM)
  src, _ = source_lib.open_source(anisotropic_scan(tmp_path / "scan"), 1, 1 << 26)
  stats = src.stats
  on_model_grid = resample.ResampledSource(src, BUNDLE3_UM, order=1)
  model_shape = on_model_grid.shape
  assert model_shape == (20, 21, 12)
  ref = windows3d.predict_volume_3d(bundle.load_bundle(model), on_model_grid.read_slab(0, 20),
                                    stats=stats, window=16, overlap=0.5, batch_size=1,
                                    devices=1, keep_probs=True)
  src.close()
  want = map_back(ref.probabilities, (10, 14, 18))
  top2 = np.sort(want, axis=-1)[..., -2:]
  clear = top2[..., 1] - top2[..., 0] > 1e-4  # no near-tie: the argmax is decided

  kw = dict(progress=False, batch_size=1, devices=1)
  mem = predict.predict_scan(model, tmp_path / "scan", save_probs=tmp_path / "mem_probs.zarr",
                             keep_labels=True, out_of_core=False, **kw)
  assert mem["resampled"] == {"shape": list(model_shape), "voxel_size_um": list(BUNDLE3_UM)}
  assert mem["mode"] == "3d_windows" and mem["labels"].shape == (10, 14, 18)
  probs = store.open_array(tmp_path / "mem_probs.zarr").read().result()
  np.testing.assert_allclose(probs, want, atol=2e-6)
  np.testing.assert_array_equal(mem["labels"][clear], want.argmax(-1)[clear])
  assert clear.mean() > 0.99

  out = tmp_path / "ooc.zarr"
  ooc = predict.predict_scan(model, tmp_path / "scan", output=out,
                             save_probs=tmp_path / "ooc_probs.zarr",
                             save_uncertainty=tmp_path / "unc.zarr", out_of_core=True,
                             memory_budget_gb=2e-4, **kw)
  assert ooc["resampled"] == mem["resampled"]
  np.testing.assert_array_equal(store.open_array(out).read().result(), mem["labels"])
  np.testing.assert_array_equal(store.open_array(tmp_path / "ooc_probs.zarr").read().result(),
                                probs)
  attrs = store.array_attrs(out)
  assert attrs["voxel_size_zyx_um"] == list(SCAN3_UM)
  assert attrs["predicted_at_voxel_size_um"] == list(BUNDLE3_UM)
  unc = store.open_array(tmp_path / "unc.zarr").read().result()
  np.testing.assert_array_equal(unc, uncertainty.maps(probs, None, mem["labels"], 1))


def test_3d_windows_that_cannot_fit_are_refused_before_allocation(tmp_path, monkeypatch):
  """A window-deep group of accumulators (and probabilities staged in memory) beyond what the
  machine has left: one line naming the windows, before any is run."""
  from bonejax.core import errors, memory_plan
  from bonejax.predict import run3d, windows3d
  engine = windows3d.make_window_engine(
      bundle.load_bundle(unet3d_bundle(tmp_path / "model", BUNDLE3_UM)), devices=1)
  args = dict(window=16, overlap=0.5, batch_size=1, memory_budget_gb=1.0)
  plan = windows3d.make_plan((40, 30, 30), 16, 0.5, engine.stride, 3, 1, 1, 1, 1.0, False)
  monkeypatch.setattr(memory_plan, "available_bytes", lambda: (plan.host_bytes, "left here"))
  run3d.require_windows_fit(engine, (40, 30, 30), args, False)  # exactly fits
  with pytest.raises(errors.UserError, match=r"3D windows 16x16x16 over \(40, 30, 30\) .*staged"):
    run3d.require_windows_fit(engine, (40, 30, 30), args, False, staged_bytes=1)
