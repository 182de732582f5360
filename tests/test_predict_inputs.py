"""The predictor's way in: registry.open_volume with channels, and store.create_array options."""

import json

import numpy as np
import pytest
import tensorstore as ts
import tifffile

from bonejax.core import errors
from bonejax.data import store
from bonejax.io import intensity, registry

SHAPE = (5, 7, 6)


def image(seed=0, shape=SHAPE):
  return np.random.default_rng(seed).integers(0, 4000, shape).astype(np.uint16)


def test_channels_none_takes_what_the_file_has(tmp_path):
  vol = np.stack([image(0), image(1)], -1)
  np.save(tmp_path / "c.npy", vol)
  store.create_array(tmp_path / "c.zarr", (1,) + vol.shape, vol.dtype).write(vol[None]).result()
  np.save(tmp_path / "g.npy", image(2))
  for name, want in (("c.npy", 2), ("c.zarr", 2), ("g.npy", 1)):
    with registry.open_volume(tmp_path / name, channels=None) as src:
      assert src.channels == want and src.stats is None
      data = src.read_slab(1, 4)
      ref = vol[1:4] if want == 2 else image(2)[1:4]
      assert data.shape == ref.shape and data.dtype == np.uint16
      np.testing.assert_array_equal(data, ref)
  with registry.open_volume(tmp_path / "c.npy", channels=2) as src:
    assert src.shape == SHAPE + (2,)


def test_channel_mismatches_name_the_shape(tmp_path):
  np.save(tmp_path / "c.npy", np.stack([image(0)] * 2, -1))
  with pytest.raises(errors.UserError, match="more than 3 non-singleton axes"):
    registry.open_volume(tmp_path / "c.npy")  # the importer's default: one channel
  with pytest.raises(errors.UserError, match=r"not a \(Z, Y, X, 3\) volume"):
    registry.open_volume(tmp_path / "c.npy", channels=3)
  tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((3, 8, 8, 3), np.uint8), photometric="rgb")
  with pytest.raises(errors.UserError, match="has 3 channels.*npy or zarr"):
    registry.open_volume(tmp_path / "rgb.tif", channels=None)
  tifffile.imwrite(tmp_path / "g.tif", image(0))
  with pytest.raises(errors.UserError, match="one channel"):
    registry.open_volume(tmp_path / "g.tif", channels=2)
  with pytest.raises(ValueError, match="labels"):
    registry.open_volume(tmp_path / "c.npy", "labels", channels=2)


def test_a_scan_brings_its_statistics_and_its_array(tmp_path):
  vol = image(3)
  store.write_scan(tmp_path / "s", vol)
  context = ts.Context({"cache_pool": {"total_bytes_limit": 1 << 20}})
  with registry.open_volume(tmp_path / "s", channels=None, context=context) as src:
    assert src.kind == "scan" and src.channels == 1
    assert src.stats == intensity.compute_stats(vol)
    np.testing.assert_array_equal(src.tensorstore.read().result(), vol)


def test_create_array_in_a_context_uncompressed_with_channels(tmp_path):
  context = ts.Context({"cache_pool": {"total_bytes_limit": 1 << 20}})
  arr = store.create_array(tmp_path / "p", (5, 70, 6, 3), "float32", (4, 64, 64),
                           compression_level=None, context=context)
  data = np.random.default_rng(0).random((5, 70, 6, 3)).astype(np.float32)
  arr.write(data).result()
  meta = json.loads((tmp_path / "p" / "zarr.json").read_text())
  assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [4, 64, 6, 3]
  assert [c["name"] for c in meta["codecs"]] == ["bytes"]
  np.testing.assert_array_equal(store.open_array(tmp_path / "p").read().result(), data)
  store.create_array(tmp_path / "q", (2, 3, 4), "uint8")  # the defaults: zstd level 1
  codecs = json.loads((tmp_path / "q" / "zarr.json").read_text())["codecs"]
  assert codecs[-1]["name"] == "zstd" and codecs[-1]["configuration"]["level"] == 1
