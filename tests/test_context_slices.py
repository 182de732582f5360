"""2.5D (`context_slices` = k): 2k + 1 adjacent planes as channels, against numpy.

The reference pads the volume along the plane axis with numpy's own `np.pad(mode="reflect")`
(which mirrors again when k exceeds the volume) and takes planes plane .. plane + 2k of the padded
volume: an independent statement of "reflect at the volume's ends". Training examples (host patch
stream and validation batches) are checked here; the device sampler equals the host stream bit
for bit (tests/test_device_sampler.py), and prediction's stacking is checked in
tests/test_predict_context.py.
"""

import numpy as np
import pytest

from bonejax.data import store
from bonejax.io import intensity
from bonejax.data import patches, validation

# Few planes along Z and Y: k = 3 reaches past both ends (and past the far end twice along Z).
SHAPE = (3, 6, 40)
NAMES = ["a", "b"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("ctx")
  rng = np.random.default_rng(1)
  vols = {}
  for name in NAMES:
    img = rng.integers(0, 4000, SHAPE).astype(np.uint16)
    img[:, :, :3] = 0  # zero padding, which zscore_nonzero leaves out of its statistics
    lab = (img > 2000).astype(np.uint8)
    store.write_scan(root / name, img, lab, chunks=(2, 4, 16))
    vols[name] = (img, lab)
  store.write_dataset_json(root, ["background", "bone"], NAMES)
  return root, vols


def reference_planes(vol: np.ndarray, axis: int, plane: int, k: int) -> np.ndarray:
  """(H, W, 2k + 1): the planes around `plane`, mirrored at the ends, as channels."""
  widths = [(0, 0)] * 3
  widths[axis] = (k, k)
  padded = np.pad(vol, widths, mode="reflect")
  return np.stack([np.take(padded, plane + c, axis) for c in range(2 * k + 1)], -1)


def test_context_planes_mirror_at_the_ends():
  np.testing.assert_array_equal(patches.context_planes(0, 5, 2), [2, 1, 0, 1, 2])
  np.testing.assert_array_equal(patches.context_planes(4, 5, 2), [2, 3, 4, 3, 2])
  np.testing.assert_array_equal(patches.context_planes(1, 3, 3), [2, 1, 0, 1, 2, 1, 0])
  np.testing.assert_array_equal(patches.context_planes(0, 1, 2), [0] * 5)
  np.testing.assert_array_equal(patches.context_planes(7, 20, 0), [7])


@pytest.mark.parametrize("k, rule", [(1, "zscore_nonzero"), (3, "percentile")])
def test_stream_stacks_the_planes_around_each_example(data, k, rule):
  root, vols = data
  p = 8
  with patches.PatchStream(root, NAMES, patch_size=p, global_batch_size=64, process_index=0,
                           process_count=1, num_threads=2, patches_per_plane=1,
                           normalization=rule, context_slices=k) as s:
    rows = s.records(s.local_positions(0))
    b = next(s)
  assert b["image"].shape == (64, p, p, 2 * k + 1) and b["label"].shape == (64, p, p)
  edges = 0
  for i, (si, axis, plane, oy, ox) in enumerate(rows):
    img, lab = vols[NAMES[si]]
    stats = intensity.compute_stats(img)
    stack = reference_planes(img, axis, plane, k)
    stack = np.pad(stack, ((p, p), (p, p), (0, 0)), mode="reflect")[oy + p:oy + 2 * p,
                                                                      ox + p:ox + 2 * p]
    want = intensity.normalize(stack, stats, rule)
    np.testing.assert_allclose(b["image"][i], want, rtol=1e-6, atol=1e-6)
    centre = np.pad(np.take(lab, plane, axis), p, mode="reflect")[oy + p:oy + 2 * p,
                                                                  ox + p:ox + 2 * p]
    np.testing.assert_array_equal(b["label"][i], centre)
    edges += plane < k or plane >= SHAPE[axis] - k
  assert edges >= 4  # the mirrored ends are exercised, not only interior planes


def test_validation_stacks_the_same_way(data):
  root, vols = data
  k = 2
  batches = list(validation.validation_batches(root, ["a"], axes=(0, 1), batch_size=4,
                                            normalization="zscore", context_slices=k))
  img, lab = vols["a"]
  stats = intensity.compute_stats(img)
  got = [(axis, plane) for axis in (0, 1) for plane in range(SHAPE[axis])]
  images = np.concatenate([b["image"][:int(b["mask"].any((1, 2)).sum())] for b in batches])
  assert images.shape[-1] == 2 * k + 1 and len(images) == len(got)
  for x, (axis, plane) in zip(images, got):
    want = intensity.normalize(reference_planes(img, axis, plane, k), stats, "zscore")
    h, w = want.shape[:2]
    np.testing.assert_allclose(x[(x.shape[0] - h) // 2:(x.shape[0] - h) // 2 + h,
                                 (x.shape[1] - w) // 2:(x.shape[1] - w) // 2 + w], want,
                               rtol=1e-6, atol=1e-6)
  nbytes = sum(v.nbytes for b in batches for v in b.values())
  assert validation.validation_nbytes(root, ["a"], axes=(0, 1), batch_size=4,
                                   context_slices=k) == nbytes
