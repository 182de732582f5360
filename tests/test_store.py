"""bonejax.data.store and bonejax.io.intensity against numpy: reads, writes, statistics, datasets."""

import json

import numpy as np
import pytest

from bonejax.core import errors
from bonejax.data import store
from bonejax.io import intensity

SHAPE = (7, 11, 13)  # odd, and not divisible by the chunks below
CHUNKS = (4, 5, 6)


@pytest.fixture
def volume():
  return np.random.default_rng(0).integers(0, 60000, SHAPE).astype(np.uint16)


@pytest.fixture
def array(tmp_path, volume):
  arr = store.create_array(tmp_path / "a", SHAPE, "uint16", CHUNKS)
  arr.write(volume).result()
  return arr


# ---------------------------------------------------------------------------------------------
# Arrays.
# ---------------------------------------------------------------------------------------------


def test_create_array_metadata(tmp_path):
  arr = store.create_array(tmp_path / "a", (3, 100, 2), "float32", (64, 64, 64))
  meta = json.loads((tmp_path / "a" / "zarr.json").read_text())
  assert meta["zarr_format"] == 3 and meta["node_type"] == "array"
  assert meta["data_type"] == "float32" and meta["shape"] == [3, 100, 2]
  # Chunks never exceed the shape, so tiny volumes are not padded to 64^3.
  assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [3, 64, 2]
  assert np.dtype(arr.dtype.numpy_dtype) == np.float32
  np.testing.assert_array_equal(arr.read().result(), np.zeros((3, 100, 2), np.float32))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_plane_and_slab_reads_equal_numpy(array, volume, axis):
  for index in range(SHAPE[axis]):
    np.testing.assert_array_equal(store.read_plane(array, axis, index),
                                  np.take(volume, index, axis=axis))
  for start, stop in [(0, 1), (1, 4), (3, SHAPE[axis]), (0, SHAPE[axis])]:
    want = volume[store.slab_index(axis, start, stop)]
    np.testing.assert_array_equal(store.read_slab(array, axis, start, stop), want)


def test_read_box_equals_numpy(array, volume):
  starts, sizes = (1, 2, 3), (5, 7, 9)
  got = store.read_box(array, starts, sizes).result()
  np.testing.assert_array_equal(got, volume[1:6, 2:9, 3:12])


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_write_slab_round_trip(tmp_path, volume, axis):
  arr = store.create_array(tmp_path / "w", SHAPE, "uint16", CHUNKS)
  step = 3  # not a chunk multiple: partial chunks are merged, not overwritten
  futures = [store.write_slab(arr, axis, s, volume[store.slab_index(axis, s, s + step)])
             for s in range(0, SHAPE[axis], step)]
  for f in futures:
    f.result()
  reopened = store.open_array(tmp_path / "w")
  np.testing.assert_array_equal(reopened.read().result(), volume)


def test_open_array_errors(tmp_path):
  with pytest.raises(errors.UserError, match="not a zarr v3 array"):
    store.open_array(tmp_path / "missing")
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "zarr.json").write_text("{not json")
  with pytest.raises(errors.UserError, match="cannot open zarr array"):
    store.open_array(tmp_path / "bad")


# ---------------------------------------------------------------------------------------------
# Scans.
# ---------------------------------------------------------------------------------------------


def test_write_scan_round_trip_and_attrs(tmp_path, volume):
  labels = (volume % 3).astype(np.int64)
  attrs = {"voxel_size_um": 2.5, "source": "/data/x.tif", "nested": {"a": [1, 2]}}
  store.write_scan(tmp_path / "s", volume, labels, attrs, CHUNKS, num_classes=3)
  scan = store.open_scan(tmp_path / "s")
  assert scan.name == "s" and scan.shape == SHAPE and scan.dtype == np.uint16
  np.testing.assert_array_equal(scan.read_image(), volume)
  np.testing.assert_array_equal(scan.read_labels(), labels)
  assert scan.labels.dtype.numpy_dtype == np.uint8
  assert scan.voxel_size_um == 2.5
  assert scan.attrs["nested"] == {"a": [1, 2]} and scan.attrs["source"] == "/data/x.tif"
  assert scan.stats == intensity.compute_stats(volume)

  # Updating attributes keeps the others, on disk too.
  store.update_scan_attrs(scan, note="checked")
  again = store.open_scan(tmp_path / "s")
  assert again.attrs["note"] == "checked" and again.attrs["voxel_size_um"] == 2.5
  assert again.attrs["intensity"] == scan.stats


def test_scan_without_labels(tmp_path, volume):
  store.write_scan(tmp_path / "s", volume)
  scan = store.open_scan(tmp_path / "s")
  assert scan.labels is None and store.is_scan(tmp_path / "s")
  with pytest.raises(errors.UserError, match="has no labels"):
    scan.read_labels()


def test_create_scan_slab_by_slab(tmp_path, volume):
  scan = store.create_scan(tmp_path / "s", SHAPE, "uint16", True, {"k": 1}, CHUNKS)
  for z in range(0, SHAPE[0], 2):
    store.write_slab(scan.image, 0, z, volume[z:z + 2]).result()
  reopened = store.open_scan(tmp_path / "s")
  np.testing.assert_array_equal(reopened.read_image(), volume)
  np.testing.assert_array_equal(reopened.read_labels(), np.zeros(SHAPE, np.uint8))
  with pytest.raises(errors.UserError, match="no intensity statistics"):
    reopened.stats


def test_create_scan_rejects_bad_dtype_and_rank(tmp_path):
  with pytest.raises(errors.UserError, match="int16 is not one of"):
    store.create_scan(tmp_path / "a", (2, 2, 2), "int16", False)
  with pytest.raises(errors.UserError, match="3D"):
    store.create_scan(tmp_path / "b", (2, 2), "uint8", False)


def test_clear_errors_for_non_scans(tmp_path):
  with pytest.raises(errors.UserError, match="does not exist"):
    store.open_scan(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(errors.UserError, match="not a scan"):
    store.open_scan(tmp_path / "empty")
  store.create_array(tmp_path / "arr", (2, 2, 2), "uint8")
  with pytest.raises(errors.UserError, match="not a scan group"):
    store.open_scan(tmp_path / "arr")
  (tmp_path / "group").mkdir()
  store.write_group_attrs(tmp_path / "group", {})
  with pytest.raises(errors.UserError, match="no image array"):
    store.open_scan(tmp_path / "group")
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "zarr.json").write_text("]]")
  with pytest.raises(errors.UserError, match="not valid JSON"):
    store.open_scan(tmp_path / "junk")
  assert not store.is_scan(tmp_path / "group") and not store.is_scan(tmp_path / "arr")


def test_open_scan_rejects_mismatched_labels(tmp_path):
  scan = store.create_scan(tmp_path / "s", (2, 3, 4), "uint8", False)
  store.create_array(scan.path / "labels", (2, 3, 5), "uint8")
  with pytest.raises(errors.UserError, match="labels shape"):
    store.open_scan(scan.path)


def test_validate_labels():
  good = np.array([[[0, 1, 2]]], np.int32)
  store.validate_labels(good, (1, 1, 3), 3)
  with pytest.raises(errors.UserError, match="labels shape"):
    store.validate_labels(good, (1, 3, 1), 3)
  with pytest.raises(errors.UserError, match="integers"):
    store.validate_labels(good.astype(np.float32), (1, 1, 3), 3)
  with pytest.raises(errors.UserError, match="label value 2 >= number of classes 2"):
    store.validate_labels(good, (1, 1, 3), 2)
  with pytest.raises(errors.UserError, match="label value -1 is negative"):
    store.validate_labels(good - 1, (1, 1, 3), 3)
  with pytest.raises(errors.UserError, match="does not fit uint8"):
    store.validate_labels(good * 200, (1, 1, 3), None)


# ---------------------------------------------------------------------------------------------
# Datasets.
# ---------------------------------------------------------------------------------------------


def test_dataset_json_round_trip(tmp_path, volume):
  store.write_scan(tmp_path / "scan_000", volume)
  store.add_scan_to_dataset(tmp_path, "scan_000", ["background", "bone"])
  ds = store.add_scan_to_dataset(tmp_path, "scan_000", ["background", "bone"])  # idempotent
  assert json.loads((tmp_path / "dataset.json").read_text()) == {
      "classes": ["background", "bone"], "scans": ["scan_000"]}
  ds = store.open_dataset(tmp_path)
  assert ds.classes == ["background", "bone"] and ds.num_classes == 2
  assert ds.scans == ["scan_000"] and ds.scan_path("scan_000") == tmp_path / "scan_000"
  np.testing.assert_array_equal(ds.open_scan("scan_000").read_image(), volume)
  with pytest.raises(errors.UserError, match="not in dataset"):
    ds.open_scan("scan_001")
  with pytest.raises(errors.UserError, match="disagree"):
    store.add_scan_to_dataset(tmp_path, "scan_001", ["background", "bone", "pore"])
  assert store.open_dataset(tmp_path).scans == ["scan_000"]


def test_dataset_errors(tmp_path):
  with pytest.raises(errors.UserError, match="not a dataset"):
    store.open_dataset(tmp_path)
  (tmp_path / "dataset.json").write_text("{")
  with pytest.raises(errors.UserError, match="not valid JSON"):
    store.open_dataset(tmp_path)
  (tmp_path / "dataset.json").write_text('{"classes": ["only"]}')
  with pytest.raises(errors.UserError, match="at least 2 classes"):
    store.open_dataset(tmp_path)


# ---------------------------------------------------------------------------------------------
# Intensity statistics and normalisation.
# ---------------------------------------------------------------------------------------------


def _check_moments(stats, x):
  x64 = x.astype(np.float64)
  assert stats["voxels"] == x.size
  np.testing.assert_allclose(stats["mean"], x64.mean(), rtol=1e-12)
  np.testing.assert_allclose(stats["std"], x64.std(), rtol=1e-9)
  assert stats["min"] == x64.min() and stats["max"] == x64.max()
  pos = x64[x64 > 0]  # the voxels > 0 (BONe's z-score leaves the zero padding out)
  assert stats["voxels_nonzero"] == pos.size
  np.testing.assert_allclose(stats["mean_nonzero"], pos.mean() if pos.size else x64.mean(),
                             rtol=1e-12)
  np.testing.assert_allclose(stats["std_nonzero"], pos.std() if pos.size else x64.std(),
                             rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype,high", [(np.uint8, 256), (np.uint16, 65536), (np.uint16, 300)])
@pytest.mark.parametrize("slab", [1, 3, 64])
def test_integer_stats_are_exact(dtype, high, slab):
  rng = np.random.default_rng(high + slab)
  x = rng.integers(0, high, (9, 10, 11)).astype(dtype)
  stats = intensity.compute_stats(x, slab=slab)
  lo, hi = np.percentile(x, intensity.PERCENTILES, method="lower")
  assert (stats["p0_5"], stats["p99_9"]) == (lo, hi)
  assert stats["dtype"] == np.dtype(dtype).name and stats["method"] == "exact histogram"
  _check_moments(stats, x)


def test_integer_stats_on_skewed_volume():
  # Mostly background with a few bright voxels: the percentile index lands on bin edges.
  x = np.zeros((5, 20, 20), np.uint16)
  x[0, 0, :3] = [100, 40000, 65535]
  stats = intensity.compute_stats(x)
  assert (stats["p0_5"], stats["p99_9"]) == tuple(
      np.percentile(x, intensity.PERCENTILES, method="lower"))
  _check_moments(stats, x)


def test_float_stats_exact_below_sample_size():
  x = np.random.default_rng(1).normal(100.0, 15.0, (6, 7, 8)).astype(np.float32)
  stats = intensity.compute_stats(x, slab=4)
  want = np.percentile(x.astype(np.float64), intensity.PERCENTILES, method="lower")
  assert (stats["p0_5"], stats["p99_9"]) == tuple(want)
  _check_moments(stats, x)


@pytest.mark.parametrize("slab", [1, 5, 64])
def test_float_stats_use_the_documented_sample(monkeypatch, slab):
  """Above SAMPLE_SIZE voxels, percentiles come from every k-th voxel, whatever the slabs."""
  monkeypatch.setattr(intensity, "SAMPLE_SIZE", 97)
  x = np.random.default_rng(2).gamma(2.0, 10.0, (10, 9, 11)).astype(np.float32)
  k = -(-x.size // 97)
  stats = intensity.compute_stats(x, slab=slab)
  sample = x.reshape(-1)[::k].astype(np.float64)
  assert (stats["p0_5"], stats["p99_9"]) == tuple(
      np.percentile(sample, intensity.PERCENTILES, method="lower"))
  assert f"every {k}th voxel ({sample.size} voxels)" in stats["method"]
  _check_moments(stats, x)  # moments stay exact


def test_stats_reject_bad_images():
  with pytest.raises(errors.UserError, match="NaN"):
    intensity.compute_stats(np.array([[[1.0, np.nan]]], np.float32))
  with pytest.raises(errors.UserError, match="Inf"):
    intensity.compute_stats(np.array([[[1.0, np.inf]]], np.float32))
  with pytest.raises(errors.UserError, match="empty"):
    intensity.validate_image(np.zeros((0, 2, 2), np.uint8))
  with pytest.raises(errors.UserError, match="not supported"):
    intensity.StatsAccumulator(np.int16, 10)
  with pytest.raises(errors.UserError, match="empty"):
    intensity.StatsAccumulator(np.uint8, 0).finalize()


def test_zero_padding_is_left_out_of_zscore_nonzero(tmp_path):
  # A reconstructed scan: a sample inside zero padding. zscore_nonzero normalises with the
  # sample's own statistics; a scan imported before they were stored gets them computed.
  rng = np.random.default_rng(3)
  x = np.zeros((6, 20, 20), np.float32)
  x[1:5, 4:16, 4:16] = rng.normal(1000.0, 50.0, (4, 12, 12)).astype(np.float32)
  stats = intensity.compute_stats(x)
  _check_moments(stats, x)
  inside = x[1:5, 4:16, 4:16].astype(np.float64)
  z = intensity.normalize(x[1:5, 4:16, 4:16], stats, "zscore_nonzero")
  np.testing.assert_allclose(z, (inside - inside.mean()) / inside.std(), rtol=1e-4, atol=1e-4)
  old = {k: v for k, v in stats.items() if "nonzero" not in k}
  assert not intensity.has_stats(old, "zscore_nonzero") and intensity.has_stats(old, "zscore")
  with pytest.raises(errors.UserError, match="lack mean_nonzero"):
    intensity.normalize_params(old, "zscore_nonzero")
  again = intensity.nonzero_stats(old, lambda a, b: x[a:b], x.shape[0], slab=4)
  for k in ("mean_nonzero", "std_nonzero", "voxels_nonzero"):
    np.testing.assert_allclose(again[k], stats[k], rtol=1e-9)
  # The patch stream of such a scan computes them (one note) and cuts the same batches.
  from bonejax.data import patches
  lab = (x > 0).astype(np.uint8)
  store.write_scan(tmp_path / "d" / "s", x, lab)
  store.write_dataset_json(tmp_path / "d", ["background", "bone"], ["s"])
  kw = dict(patch_size=8, global_batch_size=4, process_index=0, process_count=1,
            normalization="zscore_nonzero")
  with patches.PatchStream(tmp_path / "d", ["s"], **kw) as stream:
    want = next(stream)["image"]
  store.update_scan_attrs(store.open_scan(tmp_path / "d" / "s"), intensity=old)
  with patches.PatchStream(tmp_path / "d", ["s"], **kw) as stream:
    np.testing.assert_allclose(next(stream)["image"], want, rtol=1e-6)


def test_normalize_rules():
  stats = {"p0_5": 10.0, "p99_9": 110.0, "mean": 50.0, "std": 4.0, "mean_nonzero": 60.0,
           "std_nonzero": 2.0}
  x = np.array([0, 10, 60, 110, 500], np.uint16)
  pct = intensity.normalize(x, stats, "percentile")
  assert pct.dtype == np.float32
  np.testing.assert_allclose(pct, [0.0, 0.0, 0.5, 1.0, 1.0], rtol=1e-6)
  np.testing.assert_array_equal(intensity.normalize(x, stats), pct)  # percentile is the default
  z = intensity.normalize(x, stats, "zscore")
  np.testing.assert_allclose(z, (x - 50.0) / 4.0, rtol=1e-6)
  z = intensity.normalize(x, stats, "zscore_nonzero")
  np.testing.assert_allclose(z, (x - 60.0) / 2.0, rtol=1e-6)
  for rule in intensity.RULES:
    offset, scale, clip = intensity.normalize_params(stats, rule)
    y = (x.astype(np.float32) - offset) * scale
    np.testing.assert_allclose(y.clip(0, 1) if clip else y,
                               intensity.normalize(x, stats, rule), rtol=1e-6)
  # A constant image (p0.5 == p99.9, std 0) must not divide by zero.
  flat = {"p0_5": 7.0, "p99_9": 7.0, "mean": 7.0, "std": 0.0, "mean_nonzero": 7.0,
          "std_nonzero": 0.0}
  assert np.isfinite(intensity.normalize(x, flat, "percentile")).all()
  assert np.isfinite(intensity.normalize(x, flat, "zscore")).all()
  with pytest.raises(errors.UserError, match="unknown normalisation rule"):
    intensity.normalize(x, stats, "minmax")
  with pytest.raises(errors.UserError, match="unknown normalisation rule"):
    intensity.normalize_params(stats, "minmax")
