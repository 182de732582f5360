"""Bone morphometry (bonejax.evaluate.morphometry) on analytic phantoms with exact answers, at
isotropic and anisotropic voxel sizes, against brute-force references (local thickness by
painting every sphere, scipy's distance transform, scikit-image's Euler number)."""

import math

import numpy as np
import pytest
from scipy import ndimage
from skimage import measure as skmeasure

from bonejax.core import errors
from bonejax.evaluate import morphometry
from bonejax.evaluate.morphometry import euler, surface, thickness

ANISO = (8.0, 6.24, 6.24)
SIZES = [(1.0, 1.0, 1.0), ANISO]
EXACT = math.inf


def plates(t, s, n=3, side=24, axis=0):
  """n plates t voxels thick, s apart, normal to `axis`, marrow of s // 2 at both ends."""
  p = t + s
  z = (np.arange(n * p) - s // 2) % p < t
  return np.moveaxis(np.broadcast_to(z[:, None, None], (n * p, side, side)), 0, axis).copy()


def ball_grid(shape, vs, centre_um, radius_um):
  zz, yy, xx = [(np.arange(n) * v - c) for n, v, c in zip(shape, vs, centre_um)]
  return (zz[:, None, None] ** 2 + yy[None, :, None] ** 2 + xx[None, None, :] ** 2
          <= radius_um ** 2)


def lattice(period, width, cells):
  """Rods of square cross-section along Z, Y and X, one node per cell; side cells * period + 1,
  so the 2x2x2 windows cover whole periods: delta chi = cells^3 (1 node - 3 rods) = -2 cells^3."""
  n = cells * period + 1
  a = (np.arange(n) + period // 2) % period < width  # rods away from the image border
  z, y, x = a[:, None, None], a[None, :, None], a[None, None, :]
  return (z & y) | (z & x) | (y & x)


# --- plates: Tb.Th = t, Tb.Sp = s, BV/TV = t / (t + s), BS/BV = 2 / t ------------------------

@pytest.mark.parametrize("vs", SIZES)
@pytest.mark.parametrize("axis", [0, 2])
@pytest.mark.parametrize("t,s", [(6, 10), (5, 11)])
@pytest.mark.parametrize("mode", [EXACT, None])
def test_plates(vs, axis, t, s, mode):
  m = morphometry.measure(plates(t, s, axis=axis), voxel_size_um=vs, exact_radius_um=mode)
  v = vs[axis]
  assert m.bv_tv == pytest.approx(t / (t + s), rel=1e-12)
  assert m.bs_bv_per_um == pytest.approx(2 / (t * v), rel=0.02)
  assert m.bs_tv_per_um == pytest.approx(2 / ((t + s) * v), rel=0.02)
  # within one voxel; exact for even sizes (an odd plate reads t + 1, as in BoneJ)
  assert abs(m.tb_th_um - t * v) <= v + 1e-6
  assert abs(m.tb_sp_um - s * v) <= v + 1e-6
  if t % 2 == 0 and s % 2 == 0:
    assert m.tb_th_um == pytest.approx(t * v, rel=1e-6)
    assert m.tb_sp_um == pytest.approx(s * v, rel=1e-6)
    assert m.tb_n_per_um == pytest.approx(1 / ((t + s) * v), rel=0.02)
  assert 1 / ((t + s + 2) * v) - 1e-9 <= m.tb_n_per_um <= 1 / ((t + s) * v) + 1e-9
  assert m.delta_chi == 0  # infinite plates: no connectivity
  assert m.da > 0.99       # intercepts along the normal only
  assert abs(m.smi) < 0.05  # flat surfaces


# --- rods: Tb.Th = d within one voxel, SMI = 3 -------------------------------------------------

@pytest.mark.parametrize("vs", SIZES)
def test_rod(vs):
  d_um = 13 * min(vs)
  shape = (31, 25, 24)
  # a rod along X: its cross-section lies in the (anisotropic) Z-Y plane; its axis on voxel
  # centres (an axis between voxel centres reads up to 1.4 voxels thinner: see the README)
  centre = [(n - 1) / 2 * v for n, v in zip(shape, vs)]
  zz = np.arange(shape[0]) * vs[0] - centre[0]
  yy = np.arange(shape[1]) * vs[1] - centre[1]
  disc = zz[:, None] ** 2 + yy[None, :] ** 2 <= (d_um / 2) ** 2
  rod = np.broadcast_to(disc[:, :, None], shape).copy()
  m = morphometry.measure(rod, voxel_size_um=vs, exact_radius_um=EXACT)
  assert abs(m.tb_th_um - d_um) <= max(vs[:2]) + 1e-6
  assert m.smi == pytest.approx(3.0, abs=0.25)
  assert m.delta_chi == 0  # a rod crossing the field of view adds nothing to chi
  assert m.bs_um2 == pytest.approx(math.pi * d_um * shape[2] * vs[2], rel=0.03)


# --- sphere: BS within 2 % of 4 pi r^2, SMI = 4 -----------------------------------------------

@pytest.mark.parametrize("vs", [(1.0, 1.0, 1.0), (2.0, 1.5, 1.5)])
def test_sphere(vs):
  r = 15 * max(vs)
  shape = tuple(2 * int(round(r / v)) + 9 for v in vs)  # centred on a voxel centre
  centre = [(n - 1) / 2 * v for n, v in zip(shape, vs)]
  b = ball_grid(shape, vs, centre, r)
  m = morphometry.measure(b, voxel_size_um=vs)
  assert m.bs_um2 == pytest.approx(4 * math.pi * r ** 2, rel=0.02)
  assert m.bv_um3 == pytest.approx(4 / 3 * math.pi * r ** 3, rel=0.02)
  assert m.smi == pytest.approx(4.0, rel=0.05)
  # the largest sphere is the ball itself (voxels near the surface lie only in smaller ones, so
  # the mean is lower; centred between voxel centres the largest reads 1.4 voxels low)
  assert abs(m.tb_th_max_um - 2 * r) <= max(vs) + 1e-6
  assert m.delta_chi == 1  # one component, no tunnel: all windows lie inside the image


# --- cubic lattice of rods: Conn.D exact --------------------------------------------------------

@pytest.mark.parametrize("vs", SIZES)
def test_lattice_connectivity(vs):
  cells, period = 3, 8
  lat = lattice(period, 3, cells)
  m = morphometry.measure(lat, voxel_size_um=vs)
  assert m.delta_chi == -2 * cells ** 3
  tv = lat.size * float(np.prod(vs))
  assert m.conn_d_per_um3 == pytest.approx((1 + 2 * cells ** 3) / tv, rel=1e-12)
  # cubic symmetry: the fabric ellipsoid is a sphere on isotropic voxels
  if vs == (1.0, 1.0, 1.0):
    assert m.da < 0.05


def test_euler_windows_match_scikit_image():
  rng = np.random.default_rng(0)
  for _ in range(3):
    a = rng.random((10, 11, 12)) < 0.45
    assert euler.padded_chi(a) == skmeasure.euler_number(a, connectivity=3)


# --- local thickness against references --------------------------------------------------------

def _brute_thickness(mask, vs):
  """2 max{r(y) : |x - y| < r(y)} over every phase voxel y, with scipy's float64 distances."""
  r = ndimage.distance_transform_edt(mask, sampling=vs)
  pts = np.argwhere(mask) * np.asarray(vs)
  rad = r[mask]
  out = np.zeros(mask.shape)
  for i, x in enumerate(pts):
    d = np.sqrt(((pts - x) ** 2).sum(1))
    out[tuple(np.argwhere(mask)[i])] = 2 * rad[d < rad * (1 - 1e-6)].max()
  return out


@pytest.mark.parametrize("vs", SIZES)
def test_local_thickness_matches_brute_force(vs):
  rng = np.random.default_rng(1)
  g = ndimage.gaussian_filter(rng.standard_normal((14, 16, 16)), 2)
  m = g > 0
  # the border is no boundary for us; scipy's transform treats it so only with a phase margin
  m = np.pad(m, 1)
  ref = _brute_thickness(m, vs)
  d2 = thickness.distance_squared(m, vs)
  assert np.allclose(d2, ndimage.distance_transform_edt(m, sampling=vs) ** 2, rtol=1e-5)
  region = np.ones(m.shape, bool)
  exact = 2 * np.sqrt(thickness.block_thickness(m, vs, region, math.inf))
  assert np.allclose(exact[m], ref[m], rtol=1e-5)
  # radius levels above 2 voxels: a lower bound, never below a voxel's own sphere
  levels = 2 * np.sqrt(thickness.block_thickness(m, vs, region, math.inf,
                                                 exact_radius=2 * min(vs)))
  own = 2 * np.sqrt(d2)
  assert np.all(levels[m] <= ref[m] * (1 + 1e-5)) and np.all(levels[m] >= own[m] * (1 - 1e-5))
  # (an approximation: 3 to 6 % low on the mean on these anisotropic voxels, see thickness.py)
  assert levels[m].mean() == pytest.approx(ref[m].mean(), rel=0.1)


def _paint_balls(d2, centres, vs):
  """Reference for thickness.paint: each centre's ball, voxel by voxel, in float64."""
  out = np.zeros(d2.shape, np.float32)
  for c in centres:
    p = np.unravel_index(c, d2.shape)
    r2 = float(d2[p])
    box = tuple(slice(max(0, q - int(math.sqrt(r2) / v) - 1), q + int(math.sqrt(r2) / v) + 2)
                for q, v in zip(p, vs))
    coords = np.stack(np.meshgrid(*[np.arange(b.start, min(b.stop, n))
                                    for b, n in zip(box, d2.shape)], indexing="ij"), -1)
    inside = (((coords - p) * np.asarray(vs)) ** 2).sum(-1) < r2 * (1 - 1e-6)
    win = out[box]
    win[inside] = np.maximum(win[inside], np.float32(r2))
  return out


@pytest.mark.parametrize("vs", SIZES + [(6.0, 2.0, 3.5)])
def test_run_painting_equals_ball_painting(vs):
  """paint() writes runs along X and dilates them; the union of balls must be exact, also
  for balls cut by the block's faces and radii of many lengths."""
  rng = np.random.default_rng(4)
  m = ndimage.gaussian_filter(rng.standard_normal((12, 14, 16)), 2) > -0.1
  d2 = thickness.distance_squared(m, vs)
  rmax2 = float(d2.max())
  grid, l2 = thickness._offsets(rmax2 * (1 + 2e-6) + 1e-12, vs)
  region = np.ones(m.shape, bool)
  ridge = thickness.maximal_centres(d2, region, vs, grid, l2)
  # tested a few voxels at a time: the same centres
  assert np.array_equal(thickness.maximal_centres(d2, region, vs, grid, l2, chunk=97), ridge)
  for centres in (ridge,
                  rng.choice(np.flatnonzero(m), 60, replace=False)):
    got = thickness.paint(d2, centres, vs, grid, l2, batch=50)  # pairs split, some > one batch
    ref = _paint_balls(d2, centres, vs)
    assert np.array_equal(got, ref)
  assert np.array_equal(got > 0, ref > 0) and got.max() > 0


def test_surface_sums_in_chunks_of_triangles():
  smooth = ndimage.gaussian_filter(ball_grid((20, 22, 24), ANISO, (80, 70, 75), 45)
                                   .astype(np.float32), 0.7)
  whole, parts = surface.SurfaceSums(), surface.SurfaceSums()

  def keep(c):  # weights that differ per triangle, so chunks must keep them aligned
    return c[0] > 40, np.where(c[2] > 75, 0.5, 1.0)
  surface.mesh_block(smooth, ANISO, keep, whole)
  surface.mesh_block(smooth, ANISO, keep, parts, chunk=101)
  assert whole.area > 0
  assert parts.area == pytest.approx(whole.area, rel=1e-12)
  assert parts.area_shift == pytest.approx(whole.area_shift, rel=1e-12)
  assert np.allclose(parts.normal_bins, whole.normal_bins, rtol=1e-12)


def test_blocks_give_the_whole_volume_result():
  rng = np.random.default_rng(2)
  g = ndimage.gaussian_filter(rng.standard_normal((36, 40, 44)), 2.5)
  vol = g > 0.1
  whole = morphometry.measure(vol, voxel_size_um=ANISO, exact_radius_um=EXACT)
  split = morphometry.measure(vol, voxel_size_um=ANISO, exact_radius_um=EXACT,
                              max_block_voxels=30 ** 3)
  for name in ("tb_th_um", "tb_th_sd_um", "tb_sp_um", "bs_um2", "smi", "bv_tv"):
    assert getattr(split, name) == pytest.approx(getattr(whole, name), rel=1e-6), name
  assert split.delta_chi == whole.delta_chi
  assert split.da == pytest.approx(whole.da, abs=1e-3)
  assert split.tb_th_histogram == whole.tb_th_histogram


def test_memmap_volume_read_in_blocks(tmp_path):
  rng = np.random.default_rng(3)
  vol = (ndimage.gaussian_filter(rng.standard_normal((24, 26, 28)), 2) > 0).astype(np.uint8)
  mm = np.lib.format.open_memmap(tmp_path / "v.npy", mode="w+", dtype=np.uint8, shape=vol.shape)
  mm[:] = vol
  mm.flush()
  lazy = np.load(tmp_path / "v.npy", mmap_mode="r")
  a = morphometry.measure(lazy, classes=1, voxel_size_um=ANISO, max_block_voxels=16 ** 3)
  b = morphometry.measure(vol, classes=1, voxel_size_um=ANISO)
  assert a.bv_tv == b.bv_tv and a.delta_chi == b.delta_chi
  assert a.tb_th_um == pytest.approx(b.tb_th_um, rel=1e-6)
  assert a.bs_um2 == pytest.approx(b.bs_um2, rel=1e-6)


# --- regions of interest, cortical indices, comparison ----------------------------------------

def test_roi_box_is_a_crop_and_mask_bounds_the_marrow():
  vol = plates(6, 10, n=4)
  box = morphometry.Box((8, 2, 3), (56, 20, 22))
  a = morphometry.measure(vol, voxel_size_um=ANISO, roi=box)
  b = morphometry.measure(vol[box.slices()], voxel_size_um=ANISO)
  assert a.as_dict() | {"roi": None} == b.as_dict() | {"roi": None}
  mask = np.zeros(vol.shape, bool)
  mask[box.slices()] = True
  c = morphometry.measure(vol, voxel_size_um=ANISO, roi=mask)
  assert c.tv_um3 == a.tv_um3 and c.bv_um3 == a.bv_um3
  assert c.bs_um2 == pytest.approx(a.bs_um2, rel=1e-6)
  assert c.tb_sp_um <= a.tb_sp_um + 1e-9  # spheres stop at the ROI's faces


def test_cortical_tube():
  vs = (5.0, 4.0, 4.0)
  shape = (12, 64, 64)
  centre = [(n - 1) / 2 * v for n, v in zip(shape, vs)]
  yy = np.arange(shape[1]) * vs[1] - centre[1]
  xx = np.arange(shape[2]) * vs[2] - centre[2]
  r2 = yy[:, None] ** 2 + xx[None, :] ** 2
  outer, inner = 30 * vs[1], 20 * vs[1]
  ring = (r2 <= outer ** 2) & (r2 > inner ** 2)
  labels = np.where(np.broadcast_to(ring, shape), 3, 0).astype(np.uint8)
  c = morphometry.cortical(labels, classes=3, voxel_size_um=vs)
  assert c.ct_ar_tt_ar == pytest.approx(1 - (inner / outer) ** 2, rel=0.02)
  assert c.tt_ar_um2 == pytest.approx(math.pi * outer ** 2, rel=0.02)
  assert abs(c.ct_th_um - (outer - inner)) <= vs[1] + 1e-6
  assert c.slices == shape[0]


def test_compare_side_by_side():
  truth = morphometry.measure(plates(6, 10), voxel_size_um=ANISO)
  pred = morphometry.measure(plates(8, 8), voxel_size_um=ANISO)
  rows = morphometry.compare(pred, truth)
  assert rows["BV/TV"]["truth"] == pytest.approx(6 / 16)
  assert rows["BV/TV"]["prediction"] == pytest.approx(8 / 16)
  assert rows["BV/TV"]["relative_difference"] == pytest.approx((8 - 6) / 6)
  assert rows["Tb.Th"]["relative_difference"] == pytest.approx((8 - 6) / 6, rel=1e-6)
  assert rows["Conn.D"]["relative_difference"] == pytest.approx(0.0)


def test_labels_pick_the_class_and_union():
  vol = plates(6, 10)
  labels = np.where(vol, 2, 1).astype(np.uint8)
  labels[:, :, :4] = np.where(vol[:, :, :4], 5, 1)
  one = morphometry.measure(labels, classes=[2, 5], voxel_size_um=ANISO)
  ref = morphometry.measure(vol, voxel_size_um=ANISO)
  assert one.bv_tv == ref.bv_tv and one.tb_th_um == ref.tb_th_um


# --- bad input: one UserError naming the value --------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"classes": 4}, "class 4 has no voxels"),
    ({"classes": 1, "roi": morphometry.Box((0, 0, 0), (4, 4, 4))}, "class 1 has no voxels in"),
    ({"classes": 1, "roi": np.ones((3, 3, 3), bool)}, r"ROI mask shape \(3, 3, 3\)"),
    ({"classes": 1, "roi": np.zeros((16, 8, 8), bool)}, "ROI mask is empty"),
    ({"classes": 1, "roi": ((0, 0, 0), (20, 8, 8))}, "outside the volume"),
    ({"classes": 1, "voxel_size_um": 0}, "voxel size 0"),
    ({"classes": 1, "voxel_size_um": (1, float("nan"), 1)}, "voxel size"),
    ({"classes": 1, "voxel_size_um": (1, 2)}, "three numbers"),
    ({"classes": 1.5}, "not an integer"),
    ({"classes": None}, "needs a class index"),
])
def test_bad_input(kwargs, match):
  labels = np.zeros((16, 8, 8), np.uint8)
  labels[4:8] = 1
  labels[8:] = 2
  with pytest.raises(errors.UserError, match=match):
    morphometry.measure(labels, **kwargs)


def test_bad_volumes():
  with pytest.raises(errors.UserError, match="3D volume"):
    morphometry.measure(np.zeros((8, 8), np.uint8), classes=1)
  with pytest.raises(errors.UserError, match="integers or booleans"):
    morphometry.measure(np.zeros((8, 8, 8), np.float32), classes=1)
  with pytest.raises(errors.UserError, match="the mask has no voxels"):
    morphometry.measure(np.zeros((8, 8, 8), bool))
