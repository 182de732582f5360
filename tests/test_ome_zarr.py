"""OME-Zarr outputs: NGFF 0.5 on zarr v3, valid by ome-zarr-models, read back by zarr-python,
pyramids by mode (labels) and mean (probabilities), voxel size and class metadata, atomic."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from bonejax import predict
from bonejax.core import errors
from bonejax.data import store
from bonejax.evaluate import report
from bonejax.io import colours, ome_zarr, registry
from bundle_helpers import CLASSES, make_bundle, phantom

zarr = pytest.importorskip("zarr")
ngff = pytest.importorskip("ome_zarr_models.v05")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("ome")
  make_bundle(root / "model")
  # An ImageJ TIFF that knows its voxel size: the OME-Zarr's scale comes from it.
  tifffile.imwrite(root / "vol.tif", phantom((34, 20, 15)), imagej=True,
                   resolution=(1 / 2.5, 1 / 2.5), metadata={"spacing": 2.5, "unit": "um",
                                                            "axes": "ZYX"})
  return root


# ---------------------------------------------------------------------------------------------
# Pyramid levels against a numpy loop.
# ---------------------------------------------------------------------------------------------


def reference_down(data, rule):
  z, y, x = (-(-s // 2) for s in data.shape[:3])
  out = np.zeros((z, y, x) + data.shape[3:], data.dtype)
  for i in range(z):
    for j in range(y):
      for k in range(x):
        # Odd edges repeat the last voxel, as np.pad(mode="edge") does.
        idx = [[min(2 * a + d, n - 1) for d in (0, 1)] for a, n in zip((i, j, k), data.shape)]
        block = data[np.ix_(*idx)].reshape((8,) + data.shape[3:])
        if rule == "mode":
          values, counts = np.unique(block, return_counts=True)
          out[i, j, k] = values[np.argmax(counts)]  # first maximum: the lowest label
        else:
          out[i, j, k] = block.astype(np.float64).mean(axis=0).astype(data.dtype)
  return out


def test_downsampling_matches_a_loop():
  rng = np.random.default_rng(0)
  lab = rng.integers(0, 4, (5, 6, 7)).astype(np.uint8)
  np.testing.assert_array_equal(ome_zarr.downsample_mode(lab), reference_down(lab, "mode"))
  probs = rng.random((5, 6, 7, 3)).astype(np.float32)
  np.testing.assert_allclose(ome_zarr.downsample_mean(probs), reference_down(probs, "mean"),
                             rtol=1e-6)
  assert ome_zarr.level_shapes((100, 40, 9), 32) == [(100, 40, 9), (50, 20, 5), (25, 10, 3)]


# ---------------------------------------------------------------------------------------------
# Predictions as OME-Zarr.
# ---------------------------------------------------------------------------------------------


def test_predict_writes_valid_ome_zarr(files):
  out, probs = files / "pred.ome.zarr", files / "probs.ome.zarr"
  res = predict.predict_scan(files / "model", files / "vol.tif", output=out, save_probs=probs,
                             planes=3, progress=False, batch_size=4)
  plain = predict.predict_scan(files / "model", files / "vol.tif", planes=3, progress=False,
                               batch_size=4)["labels"]
  assert res["voxel_size_um"] == [2.5, 2.5, 2.5]

  # Valid OME-NGFF 0.5 (image-label) by ome-zarr-models, read through zarr-python 3.
  group = zarr.open_group(out, mode="r")
  model = ngff.ImageLabel.from_zarr(group)
  ms = model.attributes.ome.multiscales[0]
  assert [a.name for a in ms.axes] == ["z", "y", "x"]
  assert [a.unit for a in ms.axes] == ["micrometer"] * 3
  assert [d.path for d in ms.datasets] == ["0", "1"]
  assert list(ms.datasets[0].coordinateTransformations[0].scale) == [2.5, 2.5, 2.5]
  assert list(ms.datasets[1].coordinateTransformations[0].scale) == [5.0, 5.0, 5.0]
  level0, level1 = group["0"][:], group["1"][:]
  np.testing.assert_array_equal(level0, plain)
  np.testing.assert_array_equal(level1, ome_zarr.downsample_mode(plain))
  assert group["0"].metadata.dimension_names == ("z", "y", "x")
  meta = json.loads((out / "zarr.json").read_text())["attributes"]
  label = meta["ome"]["image-label"]
  assert [p["class"] for p in label["properties"]] == CLASSES
  assert label["colors"][1] == {"label-value": 1, "rgba": colours.rgba(colours.colour(1))}
  assert label["colors"][0]["rgba"][3] == 0  # background see-through
  assert meta["vote"] == "soft" and meta["classes"] == CLASSES and "bonejax_version" in meta

  # Probabilities: channel-first (c, z, y, x), mean pyramid, channel names.
  pgroup = zarr.open_group(probs, mode="r")
  ngff.Image.from_zarr(pgroup)
  p0 = pgroup["0"][:]
  assert p0.shape == (3, 34, 20, 15) and np.allclose(p0.sum(0), 1, atol=1e-5)
  np.testing.assert_allclose(pgroup["1"][:], np.moveaxis(ome_zarr.downsample_mean(
      np.moveaxis(p0, 0, -1)), -1, 0), rtol=1e-6)
  omero = json.loads((probs / "zarr.json").read_text())["attributes"]["ome"]["omero"]
  assert [c["label"] for c in omero["channels"]] == CLASSES
  # Probabilities are in [0, 1]: that is their display window; each class keeps its colour.
  assert all(c["window"] == {"min": 0.0, "max": 1.0, "start": 0.0, "end": 1.0}
             for c in omero["channels"])
  assert [c["color"] for c in omero["channels"]] == \
      ["FFFFFF"] + [colours.colour(k).lstrip("#").upper() for k in range(1, len(CLASSES))]

  # Our own OME-Zarr is an input like any other (evaluate reads it; the voxel size survives).
  with registry.open_volume(out, "labels") as src:
    assert src.voxel_size_um == (2.5, 2.5, 2.5)
    np.testing.assert_array_equal(src.read_slab(0, 34), plain)
  ev = report.evaluate(out, out, progress=False)
  assert ev.result["miou_all"] == 1.0 and ev.result["voxel_size_um"] == 2.5

  # --overwrite replaces it (it carries bonejax's mark); without, it is refused.
  predict.predict_scan(files / "model", files / "vol.tif", output=out, planes=1,
                       progress=False, overwrite=True)
  with pytest.raises(errors.UserError, match="exists; pass --overwrite"):
    predict.predict_scan(files / "model", files / "vol.tif", output=out, planes=1,
                         progress=False)


def test_out_of_core_ome_zarr_matches_in_memory(files):
  kw = dict(planes=3, progress=False, batch_size=4, vote="max")
  a, b = files / "mem.ome.zarr", files / "ooc.ome.zarr"
  predict.predict_scan(files / "model", files / "vol.tif", output=a, out_of_core=False, **kw)
  res = predict.predict_scan(files / "model", files / "vol.tif", output=b, out_of_core=True,
                             memory_budget_gb=0.01, **kw)
  assert res["mode"] == "out_of_core"
  for level in ("0", "1"):
    np.testing.assert_array_equal(zarr.open_array(a / level)[:], zarr.open_array(b / level)[:])


def test_cli_existing_ome_zarr_without_overwrite(files):
  out = files / "exists.ome.zarr"
  predict.predict_scan(files / "model", files / "vol.tif", output=out, planes=1, progress=False)
  before = sorted(os.listdir(files)), (out / "zarr.json").read_bytes()
  r = subprocess.run([sys.executable, str(REPO / "launch" / "predict.py"),
                      f"--model={files / 'model'}", f"--input={files / 'vol.tif'}",
                      f"--output={out}", "--planes=1"], capture_output=True, text=True,
                     cwd=REPO, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert r.returncode == 2 and len(errors) == 1 and "exists; pass --overwrite" in errors[0]
  assert "Traceback" not in r.stderr and r.stdout.strip() == ""
  assert (sorted(os.listdir(files)), (out / "zarr.json").read_bytes()) == before


def test_write_volume_image_and_atomicity(tmp_path):
  img = phantom((40, 12, 10))
  res = ome_zarr.write_volume(img, tmp_path / "img.ome.zarr", kind="image",
                              voxel_size_um=(1, 1, 1))
  assert res["levels"] == 2
  ngff.Image.from_zarr(zarr.open_group(tmp_path / "img.ome.zarr", mode="r"))
  np.testing.assert_array_equal(zarr.open_array(tmp_path / "img.ome.zarr" / "1")[:],
                                ome_zarr.downsample_mean(img))

  def broken(z0, z1):
    raise errors.UserError("read failed")

  class Bad:
    shape, dtype = (40, 12, 10), np.dtype(np.uint16)

    def __getitem__(self, idx):
      broken(0, 0)

  with pytest.raises(errors.UserError, match="read failed"):
    ome_zarr.write_volume(Bad(), tmp_path / "bad.ome.zarr", kind="image")
  assert sorted(os.listdir(tmp_path)) == ["img.ome.zarr"]


def test_predict_with_image_nests_the_labels_under_the_image(files):
  out = files / "both.ome.zarr"
  predict.predict_scan(files / "model", files / "vol.tif", output=out, planes=1,
                       progress=False, with_image=True)
  plain = predict.predict_scan(files / "model", files / "vol.tif", planes=1,
                               progress=False)["labels"]
  # NGFF's layout: the image at the top, labels/ listing its label images, each an image-label
  # whose source is the image two levels up (what napari-ome-zarr and MoBIE follow).
  image = ngff.Image.from_zarr(zarr.open_group(out, mode="r"))
  assert [a.unit for a in image.attributes.ome.multiscales[0].axes] == ["micrometer"] * 3
  labels_group = json.loads((out / "labels" / "zarr.json").read_text())["attributes"]["ome"]
  assert labels_group["labels"] == ["segmentation"]
  seg = out / "labels" / "segmentation"
  ngff.ImageLabel.from_zarr(zarr.open_group(seg, mode="r"))
  label_meta = json.loads((seg / "zarr.json").read_text())["attributes"]
  assert label_meta["ome"]["image-label"]["source"] == {"image": "../../"}
  assert label_meta["classes"] == CLASSES and "bonejax_version" in label_meta
  np.testing.assert_array_equal(zarr.open_array(seg / "0")[:], plain)
  vol = tifffile.imread(files / "vol.tif")
  np.testing.assert_array_equal(zarr.open_array(out / "0")[:], vol)
  with registry.open_volume(out) as src:
    assert src.voxel_size_um == (2.5, 2.5, 2.5)
    np.testing.assert_array_equal(src.read_slab(0, 34), vol)
  with registry.open_volume(seg, "labels") as src:
    assert src.voxel_size_um == (2.5, 2.5, 2.5)
    np.testing.assert_array_equal(src.read_slab(0, 34), plain)
  # Ours: --overwrite replaces it. Only an OME-Zarr output can hold the image.
  predict.predict_scan(files / "model", files / "vol.tif", output=out, planes=1,
                       progress=False, with_image=True, overwrite=True)
  with pytest.raises(errors.UserError, match="--with_image needs an .ome.zarr"):
    predict.predict_scan(files / "model", files / "vol.tif", output=files / "x.zarr",
                         planes=1, progress=False, with_image=True)
  assert not (files / "x.zarr").exists()


def test_omero_window_follows_the_dtype(tmp_path):
  maps = np.zeros((4, 6, 5, 2), np.uint8)
  ome_zarr.write_volume(maps, tmp_path / "u.ome.zarr", kind="image",
                        channel_names=["entropy", "disagreement"])
  omero = ome_zarr.read_metadata(tmp_path / "u.ome.zarr")["omero"]
  assert [c["label"] for c in omero["channels"]] == ["entropy", "disagreement"]
  assert all(c["window"] == {"min": 0, "max": 255, "start": 0, "end": 255}
             for c in omero["channels"])
  assert ome_zarr.display_range(np.float32) == (0.0, 1.0)
  assert ome_zarr.display_range(np.uint16) == (0, 65535)
