"""Volume import/export: every input kind round-trips; every bad input fails cleanly.

Most cases call `importer.import_volume` (what launch/import_volume.py wraps) in-process; a few
run the script itself to prove the CLI contract (exit code, one `error:` line, last-line JSON).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
import tifffile

from bonejax.core import errors
from bonejax.data import importer, store
from bonejax.io import intensity, registry, slices, tiff
from bonejax.io.source import VolumeSource

REPO = Path(__file__).resolve().parent.parent
SHAPE = (12, 10, 9)  # Z >= 11 so that natural and lexicographic slice orders differ
KINDS = ["tiff", "tiff_zlib", "tiff_pages", "imagej", "folder", "npy", "zarr3", "zarr2", "scan"]


def make_image(dtype=np.uint16, shape=SHAPE, seed=0):
  return np.random.default_rng(seed).integers(0, 4000, shape).astype(dtype)


def make_labels(shape=SHAPE, seed=1):
  return np.random.default_rng(seed).integers(0, 3, shape).astype(np.uint8)


def write_as(kind, path: Path, vol: np.ndarray) -> Path:
  """Writes `vol` in one of the supported input kinds; returns the path to import."""
  if kind == "tiff":
    tifffile.imwrite(path.with_suffix(".tif"), vol, photometric="minisblack")
    return path.with_suffix(".tif")
  if kind == "tiff_zlib":  # compressed: read page range by page range, not memory-mapped
    tifffile.imwrite(path.with_suffix(".tif"), vol, photometric="minisblack", compression="zlib")
    return path.with_suffix(".tif")
  if kind == "tiff_pages":  # one page at a time, no shape metadata (as many CT tools write)
    with tifffile.TiffWriter(path.with_suffix(".tif")) as tw:
      for plane in vol:
        tw.write(plane, metadata=None, photometric="minisblack")
    return path.with_suffix(".tif")
  if kind == "imagej":  # a TZCYX hyperstack with singleton T and C
    tifffile.imwrite(path.with_suffix(".tif"), vol[None, :, None], imagej=True,
                     metadata={"axes": "TZCYX"})
    return path.with_suffix(".tif")
  if kind == "folder":
    path.mkdir()
    for z, plane in enumerate(vol):
      tifffile.imwrite(path / f"slice_{z}.tif", plane, photometric="minisblack")
    (path / "notes.txt").write_text("ignored")
    return path
  if kind == "npy":
    np.save(path.with_suffix(".npy"), vol)
    return path.with_suffix(".npy")
  if kind == "zarr3":
    store.create_array(path.with_suffix(".zarr"), vol.shape, vol.dtype, (5, 4, 4)).write(
        vol).result()
    return path.with_suffix(".zarr")
  if kind == "zarr2":
    p = path.with_suffix(".zarr")
    arr = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(p)},
                   "metadata": {"shape": list(vol.shape), "chunks": [5, 4, 4],
                                "dtype": vol.dtype.str}},
                  create=True).result()
    arr.write(vol).result()
    return p
  raise ValueError(kind)


def snapshot(data: Path):
  """What an import may change: the dataset dir's entries (temp siblings too) and dataset.json."""
  if not data.is_dir():
    return data.read_bytes() if data.exists() else None
  ds = data / "dataset.json"
  return sorted(p.name for p in data.iterdir()), (ds.read_bytes() if ds.exists() else None)


def import_(image, data, scan="s", **kw):
  kw.setdefault("progress_every_s", 1e9)
  return importer.import_volume(image=str(image), out=str(data), scan=scan, **kw)


def expect_clean_error(match, image, data, scan="s", **kw):
  """The import fails with a one-line UserError naming the problem and changes nothing."""
  before = snapshot(data)
  with pytest.raises(errors.UserError, match=match) as info:
    import_(image, data, scan, **kw)
  assert "\n" not in errors.one_line(info.value)
  assert snapshot(data) == before
  return str(info.value)


# ---------------------------------------------------------------------------------------------
# Round trips.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_labels", [False, True], ids=["image", "labels"])
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(tmp_path, kind, with_labels):
  vol, lab = make_image(), make_labels()
  data = tmp_path / "DATA"
  if kind == "scan":
    src = tmp_path / "scan_in"
    store.write_scan(src, vol, lab if with_labels else None)
    labels = src if with_labels else None  # the scan's own labels array
  else:
    src = write_as(kind, tmp_path / "img", vol)
    labels = write_as(kind, tmp_path / "lab", lab) if with_labels else None
  result = import_(src, data, "scan_000", labels=labels, voxel_size_um=3.5, slab=5,
                   chunks=(4, 8, 8))
  assert result["scan"] == "scan_000" and result["shape"] == list(SHAPE)
  assert result["dtype"] == "uint16" and result["has_labels"] == with_labels
  assert result["dataset"] == str(data) and result["path"] == str(data / "scan_000")
  assert result["seconds"] >= 0

  scan = store.open_dataset(data).open_scan("scan_000")
  np.testing.assert_array_equal(scan.read_image(), vol)
  assert scan.dtype == np.uint16
  if with_labels:
    np.testing.assert_array_equal(scan.read_labels(), lab)
  else:
    assert scan.labels is None
  assert scan.voxel_size_um == 3.5
  assert scan.attrs["source"] == str(Path(src).resolve())
  assert scan.stats == intensity.compute_stats(vol) == result["intensity"]
  assert json.loads((data / "dataset.json").read_text()) == {
      "classes": ["background", "bone", "pore"], "scans": ["scan_000"]}
  assert sorted(p.name for p in data.iterdir()) == ["dataset.json", "scan_000"]


def test_folder_is_read_in_natural_order(tmp_path):
  vol = make_image()
  folder = write_as("folder", tmp_path / "slices", vol)
  with registry.open_volume(folder) as src:
    assert [f.name for f in src.files[:3]] == ["slice_0.tif", "slice_1.tif", "slice_2.tif"]
    assert src.files[10].name == "slice_10.tif"
    np.testing.assert_array_equal(src.read_slab(0, SHAPE[0]), vol)
  assert slices.natural_key("a_2.tif") < slices.natural_key("a_10.tif")


def test_tiff_read_paths_agree(tmp_path):
  """Memory map, page ranges, and the whole-series fallback read the same slices."""
  vol = make_image()
  for kind, mapped in [("tiff", True), ("tiff_zlib", False)]:
    with registry.open_volume(write_as(kind, tmp_path / kind, vol)) as src:
      assert (src._mm is not None) == mapped and src._paged
      np.testing.assert_array_equal(src.read_slab(3, 8), vol[3:8])
      src._mm, src._paged = None, False
      np.testing.assert_array_equal(src.read_slab(3, 8), vol[3:8])
      np.testing.assert_array_equal(src.read_slab(10, 99), vol[10:])


def test_import_streams_slab_by_slab(tmp_path, monkeypatch):
  """--slab smaller than Z: no read spans more than one slab, and the result is exact."""
  vol = make_image(np.float32, (23, 6, 5)) / 7
  src = write_as("npy", tmp_path / "v", vol)
  reads = []
  original = VolumeSource.read_slab

  def spy(self, z0, z1):
    reads.append((z0, z1))
    return original(self, z0, z1)

  monkeypatch.setattr(VolumeSource, "read_slab", spy)
  import_(src, tmp_path / "D", slab=4, chunks=(3, 4, 4))
  assert reads == [(z, min(z + 4, 23)) for z in range(0, 23, 4)]
  np.testing.assert_array_equal(store.open_scan(tmp_path / "D" / "s").read_image(), vol)


@pytest.mark.parametrize("src_dtype,stored", [
    (np.int16, np.float32), (np.int32, np.float32), (np.uint32, np.float32),
    (np.float64, np.float32), (np.bool_, np.uint8), (np.uint8, np.uint8),
    (np.float32, np.float32)])
def test_dtype_conversions(tmp_path, src_dtype, stored):
  vol = (make_image(np.int32) - 2000).astype(src_dtype)
  src = write_as("npy", tmp_path / "v", vol)
  result = import_(src, tmp_path / "D")
  scan = store.open_scan(tmp_path / "D" / "s")
  assert scan.dtype == stored and result["dtype"] == np.dtype(stored).name
  assert result["source_dtype"] == np.dtype(src_dtype).name
  np.testing.assert_array_equal(scan.read_image(), vol.astype(stored))


def test_labels_keep_integer_values(tmp_path):
  vol, lab = make_image(), make_labels()
  import_(write_as("npy", tmp_path / "v", vol), tmp_path / "D",
          labels=write_as("npy", tmp_path / "l", lab.astype(np.int64)))
  np.testing.assert_array_equal(store.open_scan(tmp_path / "D" / "s").read_labels(), lab)


def test_second_scan_joins_the_dataset(tmp_path):
  data = tmp_path / "D"
  import_(write_as("npy", tmp_path / "a", make_image()), data, "a", classes="bg,bone")
  import_(write_as("npy", tmp_path / "b", make_image(seed=3)), data, "b", classes=["bg", "bone"])
  assert store.open_dataset(data).scans == ["a", "b"]
  assert store.open_dataset(data).classes == ["bg", "bone"]


def test_overwrite_replaces_the_scan(tmp_path):
  data = tmp_path / "D"
  import_(write_as("npy", tmp_path / "a", make_image()), data)
  dataset_json = (data / "dataset.json").read_bytes()
  new = make_image(seed=5)
  expect_clean_error("exists; pass --overwrite", write_as("npy", tmp_path / "b", new), data)
  import_(tmp_path / "b.npy", data, overwrite=True)
  np.testing.assert_array_equal(store.open_scan(data / "s").read_image(), new)
  assert (data / "dataset.json").read_bytes() == dataset_json
  assert sorted(p.name for p in data.iterdir()) == ["dataset.json", "s"]


# ---------------------------------------------------------------------------------------------
# Bad inputs: a clear error and nothing half-written.
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def dataset(tmp_path):
  """A dataset that already holds one scan, so failures can be checked to leave it alone."""
  data = tmp_path / "D"
  import_(write_as("npy", tmp_path / "first", make_image()), data, "first")
  return data


def test_missing_paths(tmp_path, dataset):
  expect_clean_error("image .*nope.tif' does not exist", tmp_path / "nope.tif", dataset)
  expect_clean_error("labels .*nope.npy' does not exist", tmp_path / "first.npy", dataset,
                     labels=tmp_path / "nope.npy")
  # A fresh --out is not left behind as an empty directory either.
  expect_clean_error("does not exist", tmp_path / "nope.tif", tmp_path / "new")


def test_unreadable_inputs(tmp_path, dataset):
  (tmp_path / "garbage.tif").write_bytes(b"\x00garbage bytes, not a TIFF" * 10)
  expect_clean_error("cannot read TIFF .*garbage.tif", tmp_path / "garbage.tif", dataset)
  (tmp_path / "garbage.npy").write_bytes(b"not numpy")
  expect_clean_error("cannot read .npy", tmp_path / "garbage.npy", dataset)
  (tmp_path / "file.xyz").write_bytes(b"hello")
  expect_clean_error("unsupported input", tmp_path / "file.xyz", dataset)
  (tmp_path / "empty").mkdir()
  expect_clean_error("contains no .tif/.tiff slices", tmp_path / "empty", dataset)


@pytest.mark.parametrize("kind", ["tiff", "tiff_zlib"])
def test_truncated_tiff(tmp_path, dataset, kind):
  tif = write_as(kind, tmp_path / "v", make_image())
  data = tif.read_bytes()
  tif.write_bytes(data[: len(data) // 2])
  expect_clean_error("cannot read TIFF .*damaged file", tif, dataset)


def test_corrupt_slice_in_folder(tmp_path, dataset):
  folder = write_as("folder", tmp_path / "slices", make_image())
  (folder / "slice_7.tif").write_bytes(b"garbage" * 20)
  expect_clean_error("slice_7.tif", folder, dataset)


def test_mismatched_slices(tmp_path, dataset):
  folder = write_as("folder", tmp_path / "slices", make_image())
  tifffile.imwrite(folder / "slice_4.tif", np.zeros((10, 8), np.uint16))
  expect_clean_error(r"slice 'slice_4.tif' is \(10, 8\)", folder, dataset)
  tifffile.imwrite(folder / "slice_4.tif", np.zeros((10, 9), np.uint8))
  expect_clean_error("uint8 but 'slice_0.tif' is .* uint16", folder, dataset)


def test_not_3d(tmp_path, dataset):
  tifffile.imwrite(tmp_path / "plane.tif", np.zeros((10, 9), np.uint16))
  expect_clean_error("2D .*a volume is 3D", tmp_path / "plane.tif", dataset)
  np.save(tmp_path / "4d.npy", np.zeros((2, 3, 4, 5), np.uint8))
  expect_clean_error("more than 3 non-singleton axes", tmp_path / "4d.npy", dataset)
  tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((3, 8, 8, 3), np.uint8), photometric="rgb")
  expect_clean_error("more than 3 non-singleton axes", tmp_path / "rgb.tif", dataset)
  # Singleton axes are dropped: (1, Z, Y, X) is a volume.
  np.save(tmp_path / "4d1.npy", make_image()[None])
  import_(tmp_path / "4d1.npy", dataset, "squeezed")
  assert store.open_scan(dataset / "squeezed").shape == SHAPE


def test_unsupported_dtypes(tmp_path, dataset):
  np.save(tmp_path / "c.npy", np.zeros(SHAPE, np.complex64))
  expect_clean_error("unsupported dtype complex64", tmp_path / "c.npy", dataset)
  img = write_as("npy", tmp_path / "v", make_image())
  np.save(tmp_path / "fl.npy", make_labels().astype(np.float32))
  expect_clean_error("labels must be integers, got dtype float32", img, dataset,
                     labels=tmp_path / "fl.npy")


def test_labels_of_another_shape(tmp_path, dataset):
  img = write_as("npy", tmp_path / "v", make_image())
  lab = write_as("tiff", tmp_path / "l", make_labels((12, 10, 8)))
  expect_clean_error(r"labels shape \(12, 10, 8\) != image shape \(12, 10, 9\)", img, dataset,
                     labels=lab)


@pytest.mark.parametrize("bad", [3, 200, -1])
def test_label_value_out_of_range(tmp_path, dataset, bad):
  """A bad value in a late slab: earlier slabs were already written, and must be removed."""
  lab = make_labels().astype(np.int16)
  lab[9, 2, 3] = bad
  img = write_as("npy", tmp_path / "v", make_image())
  want = f"label value {bad} >= number of classes 3" if bad > 0 else "label value -1 is negative"
  msg = expect_clean_error(want, img, dataset, labels=write_as("npy", tmp_path / "l", lab),
                           slab=4)
  assert "slices 8-11" in msg


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_image(tmp_path, dataset, bad):
  vol = make_image(np.float32)
  vol[11, 0, 0] = bad
  name = "NaN" if np.isnan(bad) else "Inf"
  expect_clean_error(f"image contains {name} values", write_as("tiff", tmp_path / "v", vol),
                     dataset, slab=5)


def test_bad_options(tmp_path, dataset):
  img = write_as("npy", tmp_path / "v", make_image())
  expect_clean_error("disagree", img, dataset, classes="background,bone")
  expect_clean_error("not a safe scan name", img, dataset, scan="../escape")
  expect_clean_error("not a safe scan name", img, dataset, scan=".hidden")
  expect_clean_error("not a safe scan name", img, dataset, scan="dataset.json")
  expect_clean_error("at least 2 distinct", img, tmp_path / "new", classes="bone,bone")
  expect_clean_error("must be positive", img, dataset, slab=0)
  expect_clean_error("must be a positive number", img, dataset, voxel_size_um=-1.0)
  (tmp_path / "afile").write_text("x")
  expect_clean_error("not a directory", img, tmp_path / "afile")
  assert not (tmp_path / "new").exists()


def test_open_volume_rejects_zarr_groups(tmp_path):
  store.write_group_attrs(tmp_path / "g", {})
  with pytest.raises(errors.UserError, match="zarr group without an 'image' array"):
    registry.open_volume(tmp_path / "g")
  store.write_scan(tmp_path / "s", make_image())
  with pytest.raises(errors.UserError, match="zarr group without an 'labels' array"):
    registry.open_volume(tmp_path / "s", "labels")


# ---------------------------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["tensorstore", "numpy", "volume"])
def test_export_tiff_round_trip(tmp_path, source):
  vol = make_image()
  store.write_scan(tmp_path / "s", vol, chunks=(5, 4, 4))
  arr = {"tensorstore": lambda: store.open_scan(tmp_path / "s").image,
         "numpy": lambda: vol,
         "volume": lambda: registry.open_volume(tmp_path / "s")}[source]()
  out = tmp_path / "out.tif"
  result = tiff.export_tiff(arr, out, slab=5)
  assert result == {"output": str(out), "shape": list(SHAPE), "dtype": "uint16",
                    "bigtiff": False}
  with tifffile.TiffFile(out) as tif:
    assert len(tif.pages) == SHAPE[0] and not tif.is_bigtiff
    np.testing.assert_array_equal(tif.asarray(), vol)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tif", "s"]
  # The exported TIFF imports back to the same volume.
  import_(out, tmp_path / "D")
  np.testing.assert_array_equal(store.open_scan(tmp_path / "D" / "s").read_image(), vol)


def test_export_tiff_overwrite_and_bigtiff(tmp_path, monkeypatch):
  out = tmp_path / "out.tif"
  out.write_bytes(b"old")
  with pytest.raises(errors.UserError, match="exists; pass --overwrite"):
    tiff.export_tiff(make_labels(), out)
  # --overwrite replaces only what bonejax wrote: not a file of someone else's.
  with pytest.raises(errors.UserError, match="is a TIFF bonejax did not write"):
    tiff.export_tiff(make_labels(), out, overwrite=True)
  assert out.read_bytes() == b"old"
  tifffile.imwrite(out, make_labels())  # a TIFF, but not one of bonejax's
  with pytest.raises(errors.UserError, match="is a TIFF bonejax did not write"):
    tiff.export_tiff(make_labels(), out, overwrite=True)
  out.unlink()
  tiff.export_tiff(make_labels(), out)
  monkeypatch.setattr(tiff, "BIGTIFF_BYTES", 100)  # pretend the volume exceeds 4 GiB
  lab = make_labels() == 1
  assert tiff.export_tiff(lab, out, overwrite=True, slab=7)["bigtiff"]
  with tifffile.TiffFile(out) as tif:
    assert tif.is_bigtiff
    np.testing.assert_array_equal(tif.asarray(), lab.astype(np.uint8))
  with pytest.raises(errors.UserError, match="3D"):
    tiff.export_tiff(np.zeros((4, 4)), tmp_path / "flat.tif")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tif"]


# ---------------------------------------------------------------------------------------------
# The script itself, end to end.
# ---------------------------------------------------------------------------------------------


def run_script(*args):
  return subprocess.run([sys.executable, "launch/import_volume.py", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


def assert_cli_error(proc, match):
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  errors = [l for l in lines if l.startswith("error:")]
  assert len(errors) == 1 and match in errors[0], proc.stderr
  assert "Traceback" not in proc.stderr and proc.stdout.strip() == ""


def test_cli_success_prints_json_last(tmp_path):
  img = write_as("tiff", tmp_path / "v", make_image())
  lab = write_as("folder", tmp_path / "l", make_labels())
  data = tmp_path / "D"
  proc = run_script(f"--image={img}", f"--labels={lab}", f"--out={data}", "--scan=scan_000",
                    "--slab=5", "--voxel_size_um=2")
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["scan"] == "scan_000" and result["shape"] == list(SHAPE)
  assert result["dtype"] == "uint16" and result["has_labels"] is True
  assert result["dataset"] == str(data) and result["seconds"] >= 0
  assert "import scan_000" in proc.stderr and "slabs" in proc.stderr  # progress line
  scan = store.open_dataset(data).open_scan("scan_000")
  np.testing.assert_array_equal(scan.read_labels(), make_labels())

  # The same output again without --overwrite: refused, nothing changed.
  before = snapshot(data)
  proc = run_script(f"--image={img}", f"--out={data}", "--scan=scan_000")
  assert_cli_error(proc, "exists; pass --overwrite")
  assert snapshot(data) == before


@pytest.mark.parametrize("case", ["missing", "corrupt", "label_value"])
def test_cli_bad_input(tmp_path, case):
  data = tmp_path / "D"
  img = write_as("npy", tmp_path / "v", make_image())
  args, match = [f"--image={img}"], ""
  if case == "missing":
    args, match = [f"--image={tmp_path / 'missing.tif'}"], "does not exist"
  elif case == "corrupt":
    (tmp_path / "bad.tif").write_bytes(b"garbage" * 30)
    args, match = [f"--image={tmp_path / 'bad.tif'}"], "cannot read TIFF"
  else:
    lab = make_labels()
    lab[-1, -1, -1] = 7
    args.append(f"--labels={write_as('npy', tmp_path / 'l', lab)}")
    args.append("--slab=4")
    match = "label value 7 >= number of classes 3"
  assert_cli_error(run_script(*args, f"--out={data}", "--scan=s"), match)
  assert not data.exists()


def test_cli_help_and_no_jax():
  proc = subprocess.run([sys.executable, "-X", "importtime", "launch/import_volume.py",
                         "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
  # absl exits 1 after --help by design; what matters is the usage text on stdout.
  assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr
  assert "--image" in proc.stdout and "--[no]overwrite" in proc.stdout
  imported = [l.rsplit("|", 1)[-1].strip() for l in proc.stderr.splitlines()
              if l.startswith("import time:")]
  assert "tifffile" in imported and "bonejax.data.importer" in imported
  assert "bonejax.io.registry" in imported
  assert not [m for m in imported if m == "jax" or m.startswith("jax.")]


def test_voxel_size_source_is_recorded_and_an_assumed_one_is_said_once(tmp_path, capsys):
  npy = write_as("npy", tmp_path / "v", make_image())
  r = import_(npy, tmp_path / "D", "a")
  err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
  assert len(err) == 1 and "voxel size unknown, 1 um assumed; pass --voxel_size_um" in err[0]
  assert r["voxel_size_source"] == "assumed" and r["voxel_size_um"] == 1.0
  assert store.open_scan(tmp_path / "D" / "a").attrs["voxel_size_source"] == "assumed"
  r = import_(npy, tmp_path / "D", "b", voxel_size_um=(8, 6.24, 6.24))
  assert not [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
  attrs = store.open_scan(tmp_path / "D" / "b").attrs
  assert attrs["voxel_size_source"] == "given" and attrs["voxel_size_zyx_um"] == [8, 6.24, 6.24]
  tif = tmp_path / "cal.tif"
  tiff.export_tiff(make_image(), tif, voxel_size_um=(8, 6.24, 6.24))
  r = import_(tif, tmp_path / "D", "c")
  assert not [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
  attrs = store.open_scan(tmp_path / "D" / "c").attrs
  assert attrs["voxel_size_source"] == "metadata"
  assert attrs["voxel_size_zyx_um"] == pytest.approx([8, 6.24, 6.24], rel=1e-4)
  # The scan exported again is as calibrated as the file it came from.
  with registry.open_volume(tmp_path / "D" / "c") as scan:
    tiff.export_tiff(scan, tmp_path / "back.tif")
  with registry.open_volume(tmp_path / "back.tif") as src:
    assert src.voxel_size_um == pytest.approx((8, 6.24, 6.24), rel=1e-4)
