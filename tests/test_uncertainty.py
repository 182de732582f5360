"""Uncertainty maps and max-probability fusion, against numpy references built from the per-set
probabilities; no extra inference; zarr, OME-Zarr and TIFF outputs agree."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from flax import nnx

from bonejax import models, predict
from bonejax.core import errors
from bonejax.data import store
from bonejax.evaluate import uncertainty
from bonejax.models import bundle
from bonejax.predict.engine import PlaneEngine

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["background", "bone", "pore"]
SHAPE = (13, 18, 11)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("unc")
  kwargs = {"depth": 2, "width": 4}
  abstract = nnx.eval_shape(lambda: models.create("unet", num_classes=3, in_channels=1,
                                                  rngs=nnx.Rngs(0), **kwargs))
  meta = bundle.make_meta(model_name="unet", model_kwargs=kwargs, classes=CLASSES,
                          in_channels=1, normalization="percentile", patch_size=32,
                          train_axes=[0, 1, 2])
  bundle.save_bundle(root / "model", models.fill_from_numpy(abstract, 1), meta)
  rng = np.random.default_rng(0)
  z, y, x = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
  vol = 1500 + 1000 * np.sin(z / 3.0) * np.cos(y / 4.0) + 800 * np.sin(x / 2.5)
  np.save(root / "vol.npy", np.clip(vol + rng.normal(0, 300, SHAPE), 0, 4000).astype(np.uint16))
  return root


def reference_maps(per_set, labels, mean=None):
  mean = sum(per_set) / len(per_set) if mean is None else mean
  p = np.clip(mean.astype(np.float64), 1e-30, 1)
  ent = -(mean * np.log(p)).sum(-1) / math.log(mean.shape[-1])
  disagree = np.mean([np.argmax(s, -1) != labels for s in per_set], axis=0)
  return np.rint(np.clip(ent, 0, 1) * 255), np.rint(disagree * 255)


def test_maps_by_hand():
  mean = np.array([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0]], np.float32)
  counts = np.array([[3, 0, 0], [1, 1, 1], [2, 1, 0]], np.uint8)
  labels = np.array([0, 0, 0], np.uint8)
  m = uncertainty.maps(mean, counts, labels, 3)
  assert m[:, 0].tolist() == [0, 255, round(255 * math.log(2) / math.log(3))]
  assert m[:, 1].tolist() == [0, 170, 85]  # 0, 2/3, 1/3 of the sets disagree


def test_max_vote_by_hand():
  a = np.array([[0.6, 0.3, 0.1], [0.4, 0.35, 0.25]], np.float32)
  b = np.array([[0.2, 0.7, 0.1], [0.2, 0.2, 0.6]], np.float32)
  c = np.array([[0.6, 0.3, 0.1], [0.6, 0.3, 0.1]], np.float32)
  labels, mean = predict.fuse([a, b, c], "max")
  assert labels.tolist() == [1, 0]  # 0.7 (bone) beats 0.6; 0.6 ties: higher summed wins (bg)
  soft, _ = predict.fuse([a, b, c], "soft")
  assert soft.tolist() == [0, 0]  # the mean disagrees on the first voxel


@pytest.mark.parametrize("vote", ["soft", "majority", "max"])
@pytest.mark.parametrize("ooc", [False, True], ids=["memory", "out_of_core"])
def test_uncertainty_and_votes_match_the_per_set_reference(files, tmp_path, vote, ooc,
                                                           monkeypatch):
  planes = []
  stream = PlaneEngine.stream

  def counting(self, slabs, k90=0):
    for s0, probs in stream(self, slabs, k90):
      planes.append(len(probs))
      yield s0, probs

  monkeypatch.setattr(PlaneEngine, "stream", counting)
  b = bundle.load_bundle(files / "model")
  vol = np.load(files / "vol.npy")
  from bonejax.io import intensity
  per_set = predict.predict_planes(b.model, vol, stats=intensity.compute_stats(vol), planes=3)
  labels_ref, mean_ref = predict.fuse(per_set, vote, predict.plane_sets(3),
                                      predict.DEFAULT_FACE_TAPER)  # as predict.py fuses
  planes.clear()

  out = tmp_path / "unc.zarr"
  res = predict.predict_scan(files / "model", files / "vol.npy", save_uncertainty=out,
                             planes=3, vote=vote, progress=False, out_of_core=ooc,
                             memory_budget_gb=0.01 if ooc else 1.0, batch_size=4)
  assert sum(planes) == sum(SHAPE)  # every plane once: the maps cost no extra inference
  np.testing.assert_array_equal(res["labels"], labels_ref)
  maps = store.open_array(out).read().result()
  ent, dis = reference_maps(per_set, labels_ref, mean_ref)
  assert maps.dtype == np.uint8 and maps.shape == SHAPE + (2,)
  assert np.abs(maps[..., 0].astype(int) - ent).max() <= 1  # float32 vs float64 rounding
  np.testing.assert_array_equal(maps[..., 1], dis)
  attrs = json.loads((out / "zarr.json").read_text())["attributes"]
  assert attrs["channels"] == ["entropy", "disagreement"] and attrs["vote"] == vote

  top = res["uncertain_slices"]
  for axis, name in enumerate("zyx"):
    means = ent.mean(axis=tuple(a for a in range(3) if a != axis)) / 255
    want = sorted(range(SHAPE[axis]), key=lambda i: (-round(means[i], 9), i))[:10]
    assert [t["index"] for t in top[name]] == want
    assert len(top[name]) == min(10, SHAPE[axis])
    assert top[name][0]["entropy"] == pytest.approx(means[want[0]], abs=2e-3)


def test_tiff_and_ome_zarr_uncertainty_agree_with_zarr(files, tmp_path):
  kw = dict(planes=3, vote="majority", progress=False, batch_size=4)
  outs = {k: tmp_path / f"unc{k}" for k in (".zarr", ".tif", ".ome.zarr")}
  results = {}
  for suffix, path in outs.items():
    results[suffix] = predict.predict_scan(files / "model", files / "vol.npy",
                                           save_uncertainty=path, **kw)
  want = store.open_array(outs[".zarr"]).read().result()
  with uncertainty.open_maps(outs[".tif"]) as src:
    assert src.shape == SHAPE + (2,)
    np.testing.assert_array_equal(src.read_slab(0, SHAPE[0]), want)
  assert tifffile.imread(outs[".tif"]).shape == (SHAPE[0], 2) + SHAPE[1:]  # ZCYX for Fiji
  src = uncertainty.open_maps(outs[".ome.zarr"])
  np.testing.assert_array_equal(src.read_slab(0, SHAPE[0]), want)
  src.close()
  zarr = pytest.importorskip("zarr")
  ngff = pytest.importorskip("ome_zarr_models.v05")
  ngff.Image.from_zarr(zarr.open_group(outs[".ome.zarr"], mode="r"))
  assert results[".tif"]["uncertain_slices"] == results[".zarr"]["uncertain_slices"]


def test_bad_uncertainty_paths(files, tmp_path):
  with pytest.raises(errors.UserError, match="must end in .zarr, .ome.zarr or .tif"):
    predict.predict_scan(files / "model", files / "vol.npy", save_uncertainty=tmp_path / "u.h5",
                         progress=False)
  with pytest.raises(errors.UserError, match="output and save_uncertainty are the same path"):
    predict.predict_scan(files / "model", files / "vol.npy", output=tmp_path / "a.zarr",
                         save_uncertainty=tmp_path / "a.zarr", progress=False)
  assert not list(tmp_path.iterdir())


def test_cli_vote_max_and_save_uncertainty(files, tmp_path):
  out, unc = tmp_path / "pred.zarr", tmp_path / "unc.tif"
  r = subprocess.run([sys.executable, str(REPO / "launch" / "predict.py"),
                      f"--model={files / 'model'}", f"--input={files / 'vol.npy'}",
                      f"--output={out}", "--vote=max", f"--save_uncertainty={unc}"],
                     capture_output=True, text=True, cwd=REPO, timeout=300,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-2000:]
  result = json.loads(r.stdout.strip().splitlines()[-1])
  assert result["vote"] == "max" and result["save_uncertainty"] == str(unc)
  assert set(result["uncertain_slices"]) == {"z", "y", "x"}
  assert len(result["uncertain_slices"]["z"]) == 10
  assert unc.exists() and out.exists()


def test_uncertainty_tiff_is_calibrated(tmp_path):
  import tifffile
  maps = np.zeros((3, 4, 5, 2), np.uint8)
  maps[..., 0] = 7
  path = tmp_path / "u.tif"
  uncertainty.write_tiff(maps, path, maps.shape[:3], voxel_size_um=(8.0, 6.24, 5.0))
  with tifffile.TiffFile(path) as tif:
    ij = tif.imagej_metadata
    assert ij["spacing"] == pytest.approx(8.0) and ij["unit"] == "um"
    page = tif.pages[0]
    x_res = page.tags["XResolution"].value
    y_res = page.tags["YResolution"].value
    assert x_res[1] / x_res[0] == pytest.approx(5.0, rel=1e-6)
    assert y_res[1] / y_res[0] == pytest.approx(6.24, rel=1e-6)
  with uncertainty.open_maps(path) as src:
    np.testing.assert_array_equal(src.read_slab(0, 3), maps)
