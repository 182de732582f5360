"""The formats micro-CT users bring: each written by its own library, read back through
`open_volume` (so import, predict and evaluate all get it), voxel sizes from their metadata, and
every bad input a one-line error that leaves nothing behind."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from bonejax.core import errors
from bonejax.data import importer, store
from bonejax.io import registry, source

REPO = Path(__file__).resolve().parent.parent
SHAPE = (12, 10, 9)


def vol(dtype=np.uint16, shape=SHAPE, seed=0):
  return np.random.default_rng(seed).integers(0, 4000, shape).astype(dtype)


def read_all(path, **kw):
  with registry.open_volume(path, **kw) as src:
    return src.read_slab(0, src.shape[0]), src


def import_(image, data, scan="s", **kw):
  kw.setdefault("progress_every_s", 1e9)
  return importer.import_volume(image=str(image), out=str(data), scan=scan, **kw)


def expect_error(match, image, data, **kw):
  with pytest.raises(errors.UserError, match=match) as info:
    import_(image, data, **kw)
  assert "\n" not in str(info.value)
  assert not Path(data).exists()  # no scan, no dataset directory
  return str(info.value)


# ---------------------------------------------------------------------------------------------
# HDF5 / NeXus.
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def h5file(tmp_path):
  import h5py
  v = vol()
  path = tmp_path / "scan.h5"
  with h5py.File(path, "w") as f:
    d = f.create_dataset("/entry/data/data", data=v, chunks=(4, 10, 9))
    d.attrs["element_size_um"] = [2.0, 1.5, 1.5]
    f.create_dataset("/entry/flat", data=v[0])  # 2D
    f.create_dataset("/entry/stack4d", data=np.stack([v, v]))  # 4D
    f.create_dataset("/entry/labels", data=(v % 3).astype(np.uint8))
  return path, v


def test_hdf5_key_voxel_size_and_slabs(h5file, tmp_path):
  path, v = h5file
  data, src = read_all(path, key="/entry/data/data")
  np.testing.assert_array_equal(data, v)
  assert src.kind == "hdf5" and src.voxel_size_um == (2.0, 1.5, 1.5)
  with registry.open_volume(path, key="/entry/data/data") as src:
    np.testing.assert_array_equal(src.read_slab(3, 7), v[3:7])
  result = import_(path, tmp_path / "D", image_key="/entry/data/data",
                   labels=path, labels_key="/entry/labels")
  assert result["voxel_size_um"] == 1.5 and result["voxel_size_zyx_um"] == [2.0, 1.5, 1.5]
  assert result["voxel_size_from"] == "metadata"
  scan = store.open_scan(tmp_path / "D" / "s")
  np.testing.assert_array_equal(scan.read_image(), v)
  np.testing.assert_array_equal(scan.read_labels(), v % 3)
  assert scan.attrs["voxel_size_zyx_um"] == [2.0, 1.5, 1.5]


def test_nexus_default_signal(tmp_path):
  import h5py
  v = vol(np.float32)
  path = tmp_path / "tomo.nxs"
  with h5py.File(path, "w") as f:
    f.attrs["default"] = "entry"
    entry = f.create_group("entry")
    entry.attrs["default"] = "plot"
    plot = entry.create_group("plot")
    plot.attrs["signal"] = "volume"
    plot.create_dataset("volume", data=v)
    d = plot["volume"]
    d.attrs["voxel_size"], d.attrs["units"] = 0.65, "um"
    entry.create_dataset("other", data=v)  # two volumes: the default decides
  data, src = read_all(path)
  np.testing.assert_array_equal(data, v)
  assert src.voxel_size_um == (0.65, 0.65, 0.65)


@pytest.mark.parametrize("key,match", [
    ("/entry/missing", r"does not exist in .*datasets: /entry/data/data 12x10x9 uint16"),
    ("/entry/flat", "is 2D"),
    ("/entry/stack4d", "more than 3 non-singleton axes"),
    ("/entry", "is a group"),
    (None, "holds 3 volume datasets; name one with --image_key"),
])
def test_hdf5_bad_keys(h5file, tmp_path, key, match):
  path, _ = h5file
  msg = expect_error(match, path, tmp_path / "D", image_key=key)
  if key == "/entry/missing":
    assert "/entry/labels" in msg and "/entry/flat" in msg


def test_key_only_for_hdf5(tmp_path):
  np.save(tmp_path / "v.npy", vol())
  expect_error("only goes with an HDF5", tmp_path / "v.npy", tmp_path / "D", image_key="/x")


# ---------------------------------------------------------------------------------------------
# MRC.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint16, np.int8])
def test_mrc_round_trip_and_voxel_size(tmp_path, dtype):
  import mrcfile
  v = (vol(np.int32) - 1000).astype(dtype) if dtype != np.uint16 else vol()
  if dtype == np.int8:
    v = (vol() % 200 - 100).astype(np.int8)
  path = tmp_path / "tomo.mrc"
  with mrcfile.new(path) as m:
    m.set_data(v)
    m.voxel_size = (20.0, 20.0, 30.0)  # Angstrom, x y z
  data, src = read_all(path)
  np.testing.assert_array_equal(data, v.astype(source.image_dtype_for(v.dtype)))
  assert src.kind == "mrc"
  assert np.allclose(src.voxel_size_um, (0.003, 0.002, 0.002))


def test_mrc_non_volume_mode(tmp_path):
  import mrcfile
  path = tmp_path / "complex.mrc"
  with mrcfile.new(path) as m:
    m.set_data(np.ones(SHAPE, np.complex64))
  expect_error("data mode 4, not a real-valued volume", path, tmp_path / "D")
  flat = tmp_path / "flat.mrc"
  with mrcfile.new(flat) as m:
    m.set_data(np.ones(SHAPE[1:], np.float32))
  expect_error("is 2D", flat, tmp_path / "D")


# ---------------------------------------------------------------------------------------------
# Folders of 2D slices.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext,dtype", [(".png", np.uint16), (".png", np.uint8),
                                       (".bmp", np.uint8), (".jp2", np.uint16)])
def test_slice_folder_natural_order_and_bit_depth(tmp_path, ext, dtype):
  import imageio.v3 as iio
  v = vol(dtype) if dtype == np.uint16 else (vol() % 256).astype(np.uint8)
  folder = tmp_path / "slices"
  folder.mkdir()
  for z, plane in enumerate(v):
    iio.imwrite(folder / f"rec_{z}{ext}", plane)
  (folder / "notes.txt").write_text("ignored")
  (folder / "scan.log").write_text("[Reconstruction]\nImage Pixel Size (um)=4.5\n")
  data, src = read_all(folder)
  assert src.kind == "image-folder" and src.files[10].name == f"rec_10{ext}"
  assert data.dtype == dtype
  np.testing.assert_array_equal(data, v)
  assert src.voxel_size_um == (4.5, 4.5, 4.5)


@pytest.mark.parametrize("case,match", [
    ("size", r"is \(10, 8\) uint8 but 'a_0.png' is \(10, 9\) uint8"),
    ("depth", r"is \(10, 9\) uint16 but 'a_0.png' is \(10, 9\) uint8"),
    ("rgb", "must be 2D greyscale"),
])
def test_slice_folder_mismatches(tmp_path, case, match):
  import imageio.v3 as iio
  folder = tmp_path / "slices"
  folder.mkdir()
  for z in range(3):
    iio.imwrite(folder / f"a_{z}.png", np.full((10, 9), z, np.uint8))
  if case == "size":
    iio.imwrite(folder / "a_3.png", np.zeros((10, 8), np.uint8))
  elif case == "depth":
    iio.imwrite(folder / "a_3.png", np.zeros((10, 9), np.uint16))
  else:
    iio.imwrite(folder / "a_3.png", np.zeros((10, 9, 3), np.uint8))
  expect_error(match, folder, tmp_path / "D")


# ---------------------------------------------------------------------------------------------
# Scanco ISQ.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def isq_file(tmp_path_factory):
  """An ISQ written by itk-ioscanco (the kept Scanco reader/writer), and what ITK reads back."""
  itk = pytest.importorskip("itk")
  if not hasattr(itk, "ScancoImageIO"):
    pytest.skip("itk-ioscanco is not installed")
  path = tmp_path_factory.mktemp("isq") / "C0001.isq"
  v = (vol(np.int32) - 1000).astype(np.int16)
  img = itk.image_from_array(v)
  # mm, x y z; the header keeps whole um of extent (9 x 10 um), so sizes here divide evenly.
  img.SetSpacing([0.01, 0.01, 0.02])
  img["CreationDate"] = img["ModificationDate"] = "1-JAN-2024 12:00:00.000"
  itk.imwrite(img, str(path), imageio=itk.ScancoImageIO.New())
  back = itk.imread(str(path), imageio=itk.ScancoImageIO.New())
  return path, v, itk.array_from_image(back), [float(s) for s in back.GetSpacing()]


def test_isq_matches_itk(isq_file, tmp_path):
  path, v, itk_data, itk_spacing_mm = isq_file
  data, src = read_all(path)
  np.testing.assert_array_equal(itk_data, v)
  np.testing.assert_array_equal(data, itk_data.astype(np.float32))
  assert src.kind == "isq" and src.source_dtype == np.int16
  x, y, z = (s * 1000 for s in itk_spacing_mm)
  assert np.allclose(src.voxel_size_um, (z, y, x)) and np.allclose(src.voxel_size_um,
                                                                   (20, 10, 10))
  with registry.open_volume(path) as src:
    np.testing.assert_array_equal(src.read_slab(5, 9), v[5:9].astype(np.float32))
  result = import_(path, tmp_path / "D")
  assert result["voxel_size_zyx_um"] == pytest.approx([20, 10, 10])


@pytest.mark.parametrize("damage,match", [
    ("truncated", "truncated"), ("magic", "no CTDATA-HEADER_V1 header"),
    ("dims", "dimensions"), ("type", "data type 7"), ("short", "no CTDATA"),
])
def test_isq_corrupt(isq_file, tmp_path, damage, match):
  raw = bytearray(isq_file[0].read_bytes())
  if damage == "truncated":
    raw = raw[:-100]
  elif damage == "magic":
    raw[:16] = b"X" * 16
  elif damage == "dims":
    raw[44:48] = np.array([-5], "<i4").tobytes()
  elif damage == "type":
    raw[16:20] = np.array([7], "<i4").tobytes()
  else:
    raw = raw[:100]
  bad = tmp_path / "bad.isq"
  bad.write_bytes(bytes(raw))
  expect_error(match, bad, tmp_path / "D")


# ---------------------------------------------------------------------------------------------
# TIFF metadata, OME-Zarr inputs, the CLI.
# ---------------------------------------------------------------------------------------------


def test_tiff_voxel_size_from_imagej_and_ome(tmp_path):
  v = vol()
  tifffile.imwrite(tmp_path / "ij.tif", v, imagej=True, resolution=(1 / 0.5, 1 / 0.5),
                   metadata={"spacing": 2.0, "unit": "um", "axes": "ZYX"})
  assert read_all(tmp_path / "ij.tif")[1].voxel_size_um == pytest.approx((2.0, 0.5, 0.5))
  tifffile.imwrite(tmp_path / "o.ome.tif", v, ome=True,
                   metadata={"axes": "ZYX", "PhysicalSizeX": 3.0, "PhysicalSizeY": 3.0,
                             "PhysicalSizeZ": 6.0})
  assert read_all(tmp_path / "o.ome.tif")[1].voxel_size_um == pytest.approx((6.0, 3.0, 3.0))
  tifffile.imwrite(tmp_path / "plain.tif", v)
  assert read_all(tmp_path / "plain.tif")[1].voxel_size_um is None
  # An explicit --voxel_size_um wins over the metadata; without either it is 1 um.
  assert import_(tmp_path / "ij.tif", tmp_path / "D", "a",
                 voxel_size_um=3)["voxel_size_um"] == 3.0
  r = import_(tmp_path / "plain.tif", tmp_path / "D", "b")
  assert r["voxel_size_um"] == 1.0 and r["voxel_size_from"] == "default"


def test_ome_zarr_v2_input_written_by_zarr_python(tmp_path):
  """An OME-NGFF 0.4 image (zarr v2, t/c/z/y/x, two levels) as other tools write it."""
  zarr = pytest.importorskip("zarr")
  v = vol()
  root = zarr.open_group(tmp_path / "img.zarr", mode="w", zarr_format=2)
  root.create_array("0", data=v[None, None], chunks=(1, 1, 6, 10, 9))
  root.create_array("1", data=v[None, None, ::2, ::2, ::2])
  axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}] + [
      {"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
  root.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [
      {"path": "0", "coordinateTransformations": [{"type": "scale",
                                                   "scale": [1, 1, 4.0, 2.0, 2.0]}]},
      {"path": "1", "coordinateTransformations": [{"type": "scale",
                                                   "scale": [1, 1, 8.0, 4.0, 4.0]}]}]}]
  data, src = read_all(tmp_path / "img.zarr")
  np.testing.assert_array_equal(data, v)
  assert src.kind == "ome-zarr" and src.voxel_size_um == (4.0, 2.0, 2.0)


def test_import_cli_resample_and_key(h5file, tmp_path):
  path, v = h5file
  data = tmp_path / "D"
  proc = subprocess.run(
      [sys.executable, "launch/import_volume.py", f"--image={path}", "--image_key=/entry/data/data",
       f"--out={data}", "--scan=s", "--resample_um=3"], cwd=REPO, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  # 12 x 2 um = 24 um -> 8 slices at 3 um; 10 x 1.5 um -> 5; 9 x 1.5 um -> 4.5 -> 4 (round half
  # to even).
  assert result["shape"] == [8, 5, 4] and result["voxel_size_um"] == 3.0
  assert result["resampled_from"] == {"shape": list(SHAPE), "voxel_size_um": [2.0, 1.5, 1.5]}
  assert result["dtype"] == "uint16"  # bit depth kept through interpolation
  proc = subprocess.run(
      [sys.executable, "launch/import_volume.py", f"--image={path}", "--image_key=/nope",
       f"--out={tmp_path / 'E'}", "--scan=s"], cwd=REPO, capture_output=True, text=True,
      timeout=300)
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 2 and len(errors) == 1 and "/entry/data/data" in errors[0]
  assert "Traceback" not in proc.stderr and not (tmp_path / "E").exists()
