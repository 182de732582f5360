"""Bone measures on shapes whose answer is known analytically or by a direct computation."""

import math

import numpy as np
import pytest
from scipy import ndimage

from bonejax.core import errors
from bonejax.data import store
from bonejax.evaluate import measures

BONE = ["background", "bone", "pore"]
IMPLANT = ["background", "bone", "degradation layer", "residual material"]


def test_roles_from_class_names():
  assert measures.applicable(BONE) == ["bv_tv", "porosity"]
  assert measures.applicable(IMPLANT) == ["bv_tv", "bic", "dr"]
  r = measures.roles(["bg", "Bone", "DL", "RM"])
  assert (r.bone, r.degradation, r.residual, r.pore) == (1, 2, 3, None)
  assert measures.applicable(["class_0", "class_1"]) == []
  assert measures.measure(np.zeros((2, 2, 2), np.uint8), ["class_0", "class_1"], 1.0) == {}


def test_cylinder_bv_tv():
  # A bone cylinder (radius r, along Z) filling a pore box of side n, inside a background margin.
  n, r, m = 41, 12.0, 3
  y, x = np.mgrid[:n, :n] - (n - 1) / 2
  disk = (y ** 2 + x ** 2) <= r ** 2
  labels = np.zeros((5, n + 2 * m, n + 2 * m), np.uint8)
  labels[:, m:m + n, m:m + n] = np.where(disk, 1, 2)
  out = measures.measure(labels, BONE, voxel_size_um=10.0)
  # The unit squares of the lattice points in the disk cover the disk of radius r - sqrt(2)/2
  # and lie inside that of radius r + sqrt(2)/2, so |count - pi r^2| <= pi (sqrt(2) r + 1/2).
  tol = math.pi * (math.sqrt(2) * r + 0.5) / n ** 2
  assert out["bv_tv"] == pytest.approx(math.pi * r ** 2 / n ** 2, abs=tol)
  assert out["bv_tv"] == pytest.approx(disk.sum() / n ** 2, rel=1e-12)
  assert out["porosity"] == pytest.approx(1 - out["bv_tv"], rel=1e-12)
  assert out["total_volume_mm3"] == pytest.approx(5 * n * n * 1e-6)


def _ball_implant(surround: str, size: int = 24, radius: float = 7.0, core: float = 4.0):
  """Residual core + degradation shell centred between voxels, so the Z mirror is exact."""
  c = (size - 1) / 2
  z, y, x = np.mgrid[:size, :size, :size] - c
  d = np.sqrt(z ** 2 + y ** 2 + x ** 2)
  labels = np.zeros((size,) * 3, np.uint8)
  if surround == "bone":
    labels[:] = 1
  elif surround == "half":
    labels[z > 0] = 1
  labels[d <= radius] = 2
  labels[d <= core] = 3
  return labels


@pytest.mark.parametrize("surround,bic", [("bone", 1.0), ("background", 0.0), ("half", 0.5)])
def test_bic_sphere(surround, bic):
  labels = _ball_implant(surround)
  out = measures.measure(labels, IMPLANT, voxel_size_um=5.0, slab=5)
  # Half: the upper surface voxels all touch bone, the lower ones (mirror images) none.
  assert out["bic"] == pytest.approx(bic, abs=1e-12)


def test_shell_roi_bv_tv_matches_full_edt_and_is_slab_invariant(tmp_path):
  labels = _ball_implant("half")
  voxel, dist_um = 5.0, 17.0  # 3.4 voxels: a halo of 4 slices, bigger than the slab of 3
  opts = measures.Options(roi_distance_um=dist_um)
  implant = labels >= 2
  roi = ~implant & (ndimage.distance_transform_edt(~implant) <= dist_um / voxel)
  out = measures.measure(labels, IMPLANT, voxel, opts, slab=3)
  assert out["roi_volume_mm3"] == pytest.approx(roi.sum() * (voxel * 1e-3) ** 3, rel=1e-12)
  assert out["bv_tv"] == pytest.approx(0.5, abs=1e-12)  # the Z mirror again
  arr = store.create_array(tmp_path / "l", labels.shape, "uint8", chunks=(4, 24, 24))
  arr.write(labels).result()
  for slab in (1, 7, 64):
    assert measures.measure(arr, IMPLANT, voxel, opts, slab=slab) == out


def test_dr_and_surface_of_a_box_implant():
  labels = np.ones((12, 13, 14), np.uint8)  # bone everywhere around
  labels[3:9, 3:10, 3:11] = 2               # implant 6 x 7 x 8 voxels
  labels[5:7, 5:8, 5:9] = 3                 # residual core 2 x 3 x 4 = 24 voxels
  voxel = 10.0                              # um: voxel = 1e-6 mm^3, face = 1e-4 mm^2
  t = 0.5
  out = measures.measure(labels, IMPLANT, voxel, measures.Options(implant_time_years=t), slab=4)
  assert out["implant_volume_mm3"] == pytest.approx(336e-6)
  assert out["residual_volume_mm3"] == pytest.approx(24e-6)
  assert out["implant_surface_mm2"] == pytest.approx(2 * (42 + 56 + 48) * 1e-4)
  assert out["dr_mm_per_year"] == pytest.approx((336e-6 - 24e-6) / (292e-4 * t))
  assert out["bic"] == pytest.approx(1.0)
  given = measures.Options(implant_time_years=2.0, initial_volume_mm3=1e-3,
                           initial_surface_mm2=0.1)
  out = measures.measure(labels, IMPLANT, voxel, given)
  assert out["dr_mm_per_year"] == pytest.approx((1e-3 - 24e-6) / (0.1 * 2.0))


def test_compare_and_bad_options():
  cmp = measures.compare({"bv_tv": 0.45, "bic": 0.2}, {"bv_tv": 0.5, "bic": 0.0})
  assert cmp["bv_tv"]["rel_diff"] == pytest.approx(-0.1)
  assert cmp["bic"]["rel_diff"] is None
  with pytest.raises(errors.UserError, match="roi_distance_um"):
    measures.measure(np.zeros((2, 2, 2), np.uint8), IMPLANT, 1.0,
                     measures.Options(roi_distance_um=-1))
  with pytest.raises(errors.UserError, match="number of classes"):
    measures.measure(np.full((2, 2, 2), 4, np.uint8), IMPLANT, 1.0)
