"""45-degree rotations: geometry, agreement with scipy, and the round trip of a smooth field."""

import math

import numpy as np
import pytest
import scipy.ndimage as ndi

from bonejax.predict import rotate


def _scipy_rotate(vol, rot, fill):
  """Reference: scipy's bilinear map_coordinates on every plane perpendicular to rot.axis."""
  rows, cols = rot.forward_coords()
  planes = np.moveaxis(vol, rot.axis, 0).astype(np.float64)
  out = np.stack([ndi.map_coordinates(p, [rows, cols], order=1, mode="grid-constant", cval=fill)
                  for p in planes])
  return np.moveaxis(out, 0, rot.axis)


def test_geometry_is_not_cropped():
  rot = rotate.Rotation(0, (5, 40, 30))
  p2, q2 = rot.out_plane
  # The rotated bounding box of a 40 x 30 plane of voxel centres is (39 + 29) / sqrt(2) wide.
  assert p2 == q2 == math.ceil((39 + 29) / math.sqrt(2)) + 1
  assert rot.rotated_shape == (5, p2, q2)
  assert rotate.Rotation(1, (5, 40, 30)).rotated_shape[1] == 40
  # Every original voxel centre lands inside the rotated grid.
  rows, cols = rot.backward_coords()
  assert rows.min() >= 0 and cols.min() >= 0 and rows.max() <= p2 - 1 and cols.max() <= q2 - 1
  # Forward and backward maps are inverse to each other.
  fr, fc = rot.forward_coords()
  br, bc = rot.backward_coords()
  i, j = 7, 11
  assert np.allclose([fr[int(round(br[i, j])), int(round(bc[i, j]))]], [i], atol=1.0)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_matches_scipy_map_coordinates(axis):
  rng = np.random.default_rng(axis)
  vol = rng.random((9, 14, 11)).astype(np.float32)
  rot = rotate.Rotation(axis, vol.shape)
  ours = rotate.rotate_volume(vol, axis, fill=0.25, chunk=4)
  assert ours.shape == rot.rotated_shape
  np.testing.assert_allclose(ours, _scipy_rotate(vol, rot, 0.25), atol=2e-5)


def test_integer_volumes_round_back_to_their_dtype():
  vol = (np.random.default_rng(0).random((4, 12, 9)) * 60000).astype(np.uint16)
  rot = rotate.Rotation(2, vol.shape)
  ours = rotate.rotate_volume(vol, 2, fill=100.0, chunk=4)
  assert ours.dtype == np.uint16
  ref = np.clip(np.rint(_scipy_rotate(vol, rot, 100.0)), 0, 65535)
  assert np.abs(ours.astype(np.float64) - ref).max() <= 1.0


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_round_trip_of_a_smooth_field_is_the_identity_inside(axis):
  z, y, x = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in (18, 27, 22)], indexing="ij")
  field = (np.sin(z / 5.0) + np.cos(y / 6.0) * np.sin(x / 7.0 + 0.3)).astype(np.float32)
  rot = rotate.Rotation(axis, field.shape)
  back = rotate.unrotate_volume(rotate.rotate_volume(field, axis, chunk=8), rot, chunk=8)
  assert back.shape == field.shape
  err = np.abs(np.moveaxis(back - field, axis, 0))
  # Inside (one voxel from the rotated plane's edges, where zero fill mixes in): two bilinear
  # interpolations of a field with wavelengths >= 30 voxels lose about 1 % of its amplitude.
  assert err[:, 1:-1, 1:-1].max() < 0.02
  # A linear ramp comes back exactly (bilinear reproduces it) once both interpolations stay
  # clear of the fill: two voxels from the edges.
  ramp = (0.01 * y + 0.02 * x + 0.03 * z).astype(np.float32)
  back = rotate.unrotate_volume(rotate.rotate_volume(ramp, axis, chunk=8), rot, chunk=8)
  assert np.abs(np.moveaxis(back - ramp, axis, 0)[:, 2:-2, 2:-2]).max() < 1e-5


def test_channels_rotate_independently():
  rng = np.random.default_rng(3)
  vol = rng.random((6, 10, 8, 2)).astype(np.float32)
  both = rotate.rotate_volume(vol, 1, chunk=4)
  for c in range(2):
    np.testing.assert_allclose(both[..., c], rotate.rotate_volume(vol[..., c], 1, chunk=4),
                               atol=1e-6)
