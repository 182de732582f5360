"""TIFF outputs are calibrated: Fiji, BoneJ and CTAn read the voxel size from ImageJ's
metadata (Z spacing and unit in the description, X/Y resolution in pixels per unit)."""

import numpy as np
import pytest
import tifffile

from bonejax.core import errors
from bonejax.io import registry, tiff


def imagej_voxel(path):
  """(Z, Y, X) um as ImageJ reads the file: spacing, and 1 / resolution in its unit."""
  with tifffile.TiffFile(path) as tif:
    ij = tif.imagej_metadata
    page = tif.pages.first
    x, y = (page.tags[k].value for k in ("XResolution", "YResolution"))
    return ij["unit"], (ij["spacing"], y[1] / y[0], x[1] / x[0])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_export_writes_imagej_calibration(tmp_path, dtype):
  vol = (np.arange(5 * 6 * 7) % 3).reshape(5, 6, 7).astype(dtype)
  res = tiff.export_tiff(vol, tmp_path / "v.tif", voxel_size_um=(8.0, 6.24, 6.5))
  unit, (z, y, x) = imagej_voxel(tmp_path / "v.tif")
  assert unit == "um" and z == 8.0
  assert y == pytest.approx(6.24, rel=1e-4) and x == pytest.approx(6.5, rel=1e-4)
  assert res["voxel_size_zyx_um"] == pytest.approx([8.0, 6.24, 6.5])
  with registry.open_volume(tmp_path / "v.tif") as src:  # and bonejax reads it back the same
    assert src.voxel_size_um == pytest.approx((8.0, 6.24, 6.5), rel=1e-4)
    np.testing.assert_array_equal(src.read_slab(0, 5), vol)
  with tifffile.TiffFile(tmp_path / "v.tif") as tif:
    assert tif.pages.first.software.startswith("bonejax")  # --overwrite knows it as ours


def test_export_takes_the_source_s_own_voxel_size(tmp_path):
  vol = np.ones((4, 5, 6), np.uint8)
  tiff.export_tiff(vol, tmp_path / "a.tif", voxel_size_um=(2.0, 3.0, 3.0))
  with registry.open_volume(tmp_path / "a.tif") as src:
    tiff.export_tiff(src, tmp_path / "b.tif")
  assert imagej_voxel(tmp_path / "b.tif")[1] == pytest.approx((2.0, 3.0, 3.0), rel=1e-4)
  # Unknown voxel size: no calibration is invented.
  res = tiff.export_tiff(vol, tmp_path / "c.tif")
  assert "voxel_size_zyx_um" not in res
  with tifffile.TiffFile(tmp_path / "c.tif") as tif:
    assert not tif.imagej_metadata
  with registry.open_volume(tmp_path / "c.tif") as src:
    assert src.voxel_size_um is None


def test_export_refuses_a_zero_or_nan_voxel_size(tmp_path):
  for bad in (0, float("nan"), (1.0, -2.0, 1.0)):
    with pytest.raises(errors.UserError, match="voxel size"):
      tiff.export_tiff(np.ones((2, 3, 4), np.uint8), tmp_path / "v.tif", voxel_size_um=bad)
  assert not (tmp_path / "v.tif").exists()


def test_big_or_other_dtypes_keep_the_xy_resolution(tmp_path, monkeypatch):
  monkeypatch.setattr(tiff, "BIGTIFF_BYTES", 10)  # pretend the volume exceeds 4 GiB
  tiff.export_tiff(np.ones((3, 4, 5), np.uint8), tmp_path / "v.tif", voxel_size_um=(2, 4, 4))
  with tifffile.TiffFile(tmp_path / "v.tif") as tif:
    assert tif.is_bigtiff and tif.pages.first.tags["XResolution"].value == (1, 4)
