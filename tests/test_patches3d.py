"""3D training input: the host patch stream, the device sampler, validation crops, 3D augment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bonejax.core import errors
from bonejax.data import device_sampler3d, patches3d, store
from bonejax.io import intensity
from bonejax.train import augment3d, mesh as mesh_lib

SCANS = ["scan_000", "scan_001"]


def _stream(data, **kw):
  args = dict(patch_size=16, global_batch_size=4, patches_per_scan=6, seed=3,
              process_index=0, process_count=1, prefetch=0)
  return patches3d.PatchStream3d(data, SCANS, **{**args, **kw})


def test_crops_are_the_scans_voxels_and_resume_exactly(tiny_dataset):
  with _stream(tiny_dataset) as s:
    rows = s.records(np.arange(3 * s.records_per_epoch))
    assert (rows[:, 1:] >= 0).all() and (rows[:, 1:] + 16 <= s.shapes[rows[:, 0]]).all()
    # An epoch holds patches_per_scan records of each scan.
    assert np.bincount(rows[:s.records_per_epoch, 0]).tolist() == [6, 6]
    b = s.batch_at(8)
    si, z, y, x = rows[8]
    scan = store.open_dataset(tiny_dataset).open_scan(SCANS[si])
    box = (slice(z, z + 16), slice(y, y + 16), slice(x, x + 16))
    want = intensity.normalize(scan.image[box].read().result(), s.scans[si].norm, "percentile")
    np.testing.assert_array_equal(b["image"][0, ..., 0], want)
    np.testing.assert_array_equal(b["label"][0], scan.labels[box].read().result())
    first = [next(s) for _ in range(3)]
    state = s.get_state()
    after = next(s)
    s.set_state({"position": 4})
    np.testing.assert_array_equal(next(s)["image"], first[1]["image"])
    s.set_state(state)
    np.testing.assert_array_equal(next(s)["label"], after["label"])


def test_foreground_crops_hold_foreground(tmp_path):
  """A scan whose only foreground is a 3^3 cube: uniform 8^3 crops of 32^3 rarely hold it,
  foreground crops always do."""
  image = np.random.default_rng(0).normal(1000, 100, (32, 32, 32)).astype(np.float32)
  labels = np.zeros((32, 32, 32), np.uint8)
  labels[20:23, 5:8, 11:14] = 2
  store.write_scan(tmp_path / "scan_000", image, labels, num_classes=3)
  store.write_dataset_json(tmp_path, ["background", "a", "b"], ["scan_000"])

  def share(fg):
    with patches3d.PatchStream3d(tmp_path, ["scan_000"], patch_size=8, global_batch_size=4,
                                 patches_per_scan=40, foreground=fg, seed=1, process_index=0,
                                 process_count=1, prefetch=0) as s:
      lab = s.read_batch(s.records(np.arange(40)))["label"]
    return float((lab == 2).any(axis=(1, 2, 3)).mean())

  assert share(1.0) == 1.0
  assert share(0.0) < 0.3
  assert 0.1 < share(0.5) < 1.0


def test_two_hosts_split_the_global_batch(tiny_dataset):
  with _stream(tiny_dataset) as one, _stream(tiny_dataset, process_index=1,
                                             process_count=2) as second:
    np.testing.assert_array_equal(second.records(second.local_positions(4)),
                                  one.records(np.arange(6, 8)))


def test_patch_larger_than_a_scan_is_one_error_naming_it(tiny_dataset):
  with pytest.raises(errors.UserError, match=r"3D patch 48x48x48 is larger than scan "
                                             r"'scan_000' \(32x48x48"):
    _stream(tiny_dataset, patch_size=48)
  with pytest.raises(errors.UserError, match="larger than scan"):
    next(patches3d.validation_batches_3d(tiny_dataset, ["scan_002"], patch_size=(16, 64, 16)))


def test_validation_counts_every_voxel_once(tiny_dataset):
  batches = list(patches3d.validation_batches_3d(tiny_dataset, ["scan_002"], patch_size=(16, 20, 32),
                                                 batch_size=4))
  assert sum(float(b["mask"].sum()) for b in batches) == 32 * 48 * 48
  assert {b["image"].shape for b in batches} == {(4, 16, 20, 32, 1)}


def test_device_sampler_gives_the_host_batches(tiny_dataset):
  mesh = mesh_lib.make_mesh(jax.local_devices()[:4])
  with _stream(tiny_dataset, foreground=0.5) as host, \
      device_sampler3d.DeviceSampler3d(_stream(tiny_dataset, foreground=0.5), mesh) as dev:
    for _ in range(3):
      h, d = next(host), next(dev)
      assert d["image"].sharding.spec[0] == "data"
      np.testing.assert_array_equal(np.asarray(d["image"]), h["image"])
      np.testing.assert_array_equal(np.asarray(d["label"]), h["label"])
    assert dev.get_state()["position"] == host.get_state()["position"] == 12


def test_augment3d_moves_labels_with_the_image_and_invents_none():
  rng = np.random.default_rng(0)
  label = rng.integers(0, 3, (4, 8, 8, 8)).astype(np.int32)
  image = label[..., None].astype(np.float32)
  cfg = dict(brightness=0.0, contrast=0.0)
  img, lab = jax.jit(lambda k, x, y: augment3d.augment(k, x, y, cfg))(
      jax.random.key(1), jnp.asarray(image), jnp.asarray(label))
  img, lab = np.asarray(img), np.asarray(lab)
  np.testing.assert_array_equal(img[..., 0], lab)  # the same transform on both
  for a, b in zip(lab, label):  # a rearrangement of the voxels: same class counts
    assert np.bincount(a.ravel(), minlength=3).tolist() == np.bincount(b.ravel(),
                                                                         minlength=3).tolist()
  assert not all((a == b).all() for a, b in zip(lab, label)), "something was transformed"
  img2, _ = augment3d.augment(jax.random.key(1), jnp.asarray(image), jnp.asarray(label),
                              dict(brightness=0.2, contrast=0.0, flip=False, rot90=False,
                                   permute_axes=False))
  shift = np.asarray(img2) - image
  assert np.ptp(shift, axis=(1, 2, 3, 4)).max() < 1e-6 and np.abs(shift).max() <= 0.2
  with pytest.raises(errors.UserError, match="unknown augment option.*rotate_degrees"):
    augment3d.resolve_config({"rotate_degrees": 10})  # a 2D option
