"""Sparse labels (issue 28): the unlabelled value in dataset.json and at import, ignored by every
loss, by validation and by the confusion matrix; crops that hold labelled pixels on every axis;
one error line for a split or a class without labelled voxels."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bonejax.core import errors
from bonejax.data import importer, label_maps, patches, store, validation
from bonejax.evaluate import metrics
from bonejax.train import losses

U = store.UNLABELLED
CLASSES = ["background", "bone", "pore"]
SHAPE = (20, 40, 36)


# ---- losses ---------------------------------------------------------------------------------


def _logits_labels(seed=0, shape=(3, 8, 8), c=3):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 2, shape + (c,)).astype(np.float32)
  labels = rng.integers(0, c, shape).astype(np.int32)
  unl = rng.random(shape) < 0.4
  return logits, labels, unl


def test_cross_entropy_is_the_mean_over_labelled_pixels():
  logits, labels, unl = _logits_labels()
  got = float(losses.cross_entropy(logits, np.where(unl, U, labels)))
  x = logits.astype(np.float64)
  logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
  per = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
  assert got == pytest.approx(per[~unl].mean(), rel=1e-5)


@pytest.mark.parametrize("name", list(losses.LOSSES))
def test_every_loss_ignores_unlabelled_pixels(name):
  logits, labels, unl = _logits_labels(1)
  fn = losses.LOSSES[name]
  sparse = np.where(unl, U, labels)
  # The same as masking those pixels out, whatever class they would have had.
  want = fn(logits, np.where(unl, 0, labels), mask=~unl)
  np.testing.assert_allclose(fn(logits, sparse), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(fn(logits, sparse, mask=np.ones(unl.shape, bool)), want,
                             rtol=1e-5, atol=1e-6)
  # No gradient reaches the logits of unlabelled pixels.
  g = jax.grad(lambda z: fn(z, sparse))(jnp.asarray(logits))
  assert np.all(np.asarray(g)[unl] == 0) and np.any(np.asarray(g)[~unl] != 0)


def test_make_loss_stats_ignore_unlabelled():
  logits, labels, unl = _logits_labels(2)
  fn = losses.make_loss({"ce": 1.0, "dice": 1.0, "lovasz": 1.0})
  sparse = np.where(unl, U, labels)
  total, _ = fn.finish(fn.stats(logits, sparse, np.ones(unl.shape, np.float32)))
  want, _ = fn.finish(fn.stats(logits, np.where(unl, 0, labels), (~unl).astype(np.float32)))
  assert float(total) == pytest.approx(float(want), rel=1e-5)


def test_confusion_matrix_ignores_the_unlabelled_truth():
  rng = np.random.default_rng(0)
  pred, truth = rng.integers(0, 3, (2, 50)).astype(np.uint8)
  sparse = truth.copy()
  sparse[::3] = U
  keep = np.arange(50) % 3 != 0
  want = metrics.confusion_matrix(pred[keep], truth[keep], 3)
  np.testing.assert_array_equal(metrics.confusion_matrix(pred, sparse, 3, ignore=U), want)
  with pytest.raises(errors.UserError, match="255"):
    metrics.confusion_matrix(pred, sparse, 3)


# ---- dataset.json and import ----------------------------------------------------------------


def test_dataset_json_round_trip_and_collision(tmp_path):
  store.write_dataset_json(tmp_path, CLASSES, [], U)
  assert json.loads((tmp_path / "dataset.json").read_text())["unlabelled"] == U
  assert store.open_dataset(tmp_path).unlabelled == U
  store.write_dataset_json(tmp_path, CLASSES, [])
  assert store.open_dataset(tmp_path).unlabelled is None
  (tmp_path / "dataset.json").write_text(json.dumps({"classes": CLASSES, "unlabelled": 2}))
  with pytest.raises(errors.UserError,
                     match=r"unlabelled value 2 collides with class 2 \('pore'\)"):
    store.open_dataset(tmp_path)
  (tmp_path / "dataset.json").write_text(json.dumps({"classes": CLASSES, "unlabelled": 300}))
  with pytest.raises(errors.UserError, match="0..255"):
    store.open_dataset(tmp_path)


def test_import_accepts_only_the_unlabelled_value(tmp_path):
  img = np.arange(4 * 6 * 5, dtype=np.uint16).reshape(4, 6, 5)
  lab = np.zeros(img.shape, np.uint8)
  lab[1] = 2
  lab[2:] = U
  np.save(tmp_path / "img.npy", img)
  np.save(tmp_path / "lab.npy", lab)
  args = dict(image=tmp_path / "img.npy", labels=tmp_path / "lab.npy", classes=CLASSES,
              voxel_size_um=1.0, progress_every_s=0)
  with pytest.raises(errors.UserError, match="label value 255 >= number of classes 3"):
    importer.import_volume(out=tmp_path / "a", scan="s", **args)
  assert not (tmp_path / "a").exists()
  with pytest.raises(errors.UserError, match="unlabelled value 1 collides with class 1"):
    importer.import_volume(out=tmp_path / "b", scan="s", unlabelled=1, **args)
  importer.import_volume(out=tmp_path / "c", scan="s", unlabelled=U, **args)
  ds = store.open_dataset(tmp_path / "c")
  assert ds.unlabelled == U
  np.testing.assert_array_equal(ds.open_scan("s").read_labels(), lab)
  # A second scan takes the dataset's value without the flag; another value is refused.
  importer.import_volume(out=tmp_path / "c", scan="t", **args)
  with pytest.raises(errors.UserError, match="disagrees"):
    importer.import_volume(out=tmp_path / "c", scan="u", unlabelled=254, **args)
  lab[0, 0, 0] = 7
  np.save(tmp_path / "lab.npy", lab)
  with pytest.raises(errors.UserError, match="label value 7 >= number of classes 3 "
                     r"\(the unlabelled value is 255\)"):
    importer.import_volume(out=tmp_path / "c", scan="v", **args)


# ---- where the labels are, and the crops -----------------------------------------------------


def _sparse_labels(rng, shape):
  """Dense labels (3 classes, rare class 2 in a blob); then every 7th plane of each axis kept in
  the half x < 18, and everything kept in the half x >= 18 (a scan mixing both)."""
  lab = (rng.random(shape) > 0.6).astype(np.uint8)
  lab[5:8, 10:14, 3:8] = 2
  z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
  keep = (z % 7 == 3) | (y % 7 == 3) | (x % 7 == 3) | (x >= 18)
  return np.where(keep, lab, U).astype(np.uint8)


@pytest.fixture(scope="module")
def sparse_data(tmp_path_factory):
  root = tmp_path_factory.mktemp("sparse")
  rng = np.random.default_rng(0)
  vols = {}
  for name in ("s0", "s1"):
    img = rng.integers(1000, 50000, SHAPE).astype(np.uint16)
    lab = _sparse_labels(rng, SHAPE)
    store.write_scan(root / name, img, lab, chunks=(8, 16, 16))
    vols[name] = lab
  # s2: only plane z = 10 labelled (a single painted slice).
  img = rng.integers(1000, 50000, SHAPE).astype(np.uint16)
  lab = np.full(SHAPE, U, np.uint8)
  lab[10] = (rng.random(SHAPE[1:]) > 0.5).astype(np.uint8)
  lab[10, :4, :4] = 2
  store.write_scan(root / "s2", img, lab, chunks=(8, 16, 16))
  vols["s2"] = lab
  store.write_dataset_json(root, CLASSES, ["s0", "s1", "s2"], U)
  return root, vols


def test_label_map_against_numpy(sparse_data):
  root, vols = sparse_data
  scan = store.open_dataset(root).open_scan("s0")
  b = 8
  m = label_maps.label_map(scan.labels, 3, U, block=b)
  lab = vols["s0"]
  known = lab != U
  np.testing.assert_array_equal(m.counts, np.bincount(lab[known], minlength=3))
  assert m.unlabelled == int((~known).sum())
  for axis in range(3):
    planes = np.moveaxis(known, axis, 0)
    n0, n1 = planes.shape[1:]
    want = np.zeros((planes.shape[0], -(-n0 // b), -(-n1 // b)), bool)
    for p, i, j in zip(*np.nonzero(planes)):
      want[p, i // b, j // b] = True
    np.testing.assert_array_equal(m.occupancy[axis], want)
    np.testing.assert_array_equal(m.planes(axis), np.flatnonzero(planes.any((1, 2))))


@pytest.mark.parametrize("patch", [8, 16, 48])
def test_every_crop_holds_labelled_pixels(sparse_data, patch):
  root, vols = sparse_data
  names = ["s0", "s1", "s2"]
  with patches.PatchStream(root, names, patch_size=patch, global_batch_size=8, process_index=0,
                           process_count=1, num_threads=2, patches_per_plane=2,
                           oversample_rare=0.2) as s:
    n = s.records_per_epoch
    rows = s.records(np.arange(2 * n))
    assert set(rows[:, 1]) == {0, 1, 2}
    # s2 has one labelled z plane: its axis-0 records are all on it.
    z2 = rows[(rows[:, 0] == 2) & (rows[:, 1] == 0)]
    assert len(z2) and set(z2[:, 2]) == {10}
    b = s.read_batch(rows[:64])
    for row, lab in zip(rows[:64], b["label"]):
      assert (lab != U).any(), row
      assert set(np.unique(lab)) <= {0, 1, 2, U}
    # Every labelled plane of every (scan, axis) is in an epoch, once per patches_per_plane.
    for si, name in enumerate(names):
      known = vols[name] != U
      for axis in range(3):
        sel = rows[:n][(rows[:n, 0] == si) & (rows[:n, 1] == axis)]
        planes = np.flatnonzero(np.moveaxis(known, axis, 0).any((1, 2)))
        uni = sel[np.isin(sel[:, 2], planes)]
        assert set(uni[:, 2]) == set(planes)


def test_crops_read_the_labels_as_stored(sparse_data):
  root, vols = sparse_data
  with patches.PatchStream(root, ["s0"], patch_size=16, global_batch_size=4, process_index=0,
                           process_count=1, num_threads=2) as s:
    rows = s.records(np.arange(4))
    b = s.read_batch(rows)
  for (si, axis, plane, oy, ox), lab in zip(rows, b["label"]):
    ref = np.take(vols["s0"], plane, axis)
    ref = np.pad(ref, 16, mode="reflect")[oy + 16:oy + 32, ox + 16:ox + 32]
    np.testing.assert_array_equal(lab, ref)


def test_validation_masks_unlabelled_and_keeps_labelled_planes(sparse_data):
  root, vols = sparse_data
  kw = dict(axes=(0, 2), batch_size=4, stride=2)
  batches = list(validation.validation_batches(root, ["s2", "s0"], num_threads=2, **kw))
  assert len(batches) == validation.num_validation_batches(root, ["s2", "s0"], **kw)
  assert sum(b["image"].nbytes + b["label"].nbytes + b["mask"].nbytes for b in batches) == \
      validation.validation_nbytes(root, ["s2", "s0"], **kw)
  # s2 along z: its one labelled plane only; the mask is exactly its labelled pixels.
  first = batches[0]
  (_, _, m0), (_, _, m1), valid = validation._val_geometry(SHAPE, 0, None)  # centred, mirrored
  want = (vols["s2"][10][m0][:, m1] != U) * valid
  assert want.sum() == valid.sum()  # the painted slice is labelled everywhere
  np.testing.assert_array_equal(first["mask"][0], want)
  assert first["mask"][1:].sum() == 0  # the filler rows
  for b in batches:
    assert set(np.unique(b["label"])) <= {0, 1, 2}
    assert np.all(b["label"][b["mask"] == 0] == 0)
  # Every mask-1 pixel of the whole set is a labelled voxel: the counts agree with numpy.
  total = sum(float(b["mask"].sum()) for b in batches)
  ref = 0
  for name, axes in (("s2", (0, 2)), ("s0", (0, 2))):
    known = vols[name] != U
    for a in axes:
      planes = np.flatnonzero(np.moveaxis(known, a, 0).any((1, 2)))
      picked = planes[validation._val_planes(len(planes), 2)]
      ref += int(np.moveaxis(known, a, 0)[picked].sum())
  assert total == ref


def _dataset(root, labels_by_scan):
  for name, lab in labels_by_scan.items():
    img = np.full(lab.shape, 1000, np.uint16)
    img[::2] = 3000
    store.write_scan(root / name, img, lab, chunks=(8, 8, 8))
  store.write_dataset_json(root, CLASSES, list(labels_by_scan), U)
  return root


def test_bad_input_one_line_before_training(tmp_path):
  shape = (6, 8, 8)
  empty = np.full(shape, U, np.uint8)
  some = empty.copy()
  some[2] = 1
  some[2, :2] = 0
  full = np.zeros(shape, np.uint8)
  full[:, :4] = 1
  full[:, 6:] = 2
  root = _dataset(tmp_path / "d", {"a": empty, "b": some, "c": full})
  kw = dict(patch_size=8, global_batch_size=2, process_index=0, process_count=1)
  with pytest.raises(errors.UserError, match=r"the training scans \(a\) have no labelled voxel"):
    patches.PatchStream(root, ["a"], **kw)
  with pytest.raises(errors.UserError, match=r"class pore has no labelled voxel in the training "
                     r"scans \(a, b\)"):
    patches.PatchStream(root, ["a", "b"], **kw)
  with pytest.raises(errors.UserError, match="the validation scans .a. have no labelled voxel"):
    list(validation.validation_batches(root, ["a"]))
  # A scan without labelled voxels among others is fine: it gets no records.
  with patches.PatchStream(root, ["a", "b", "c"], **kw, oversample_rare=0.0) as s:
    rows = s.records(np.arange(2 * s.records_per_epoch))
    assert set(rows[:, 0]) == {1, 2}
    # b: plane z=2, every y and x plane; c: every plane; 4 patches per plane
    assert s.records_per_epoch == 4 * ((1 + 8 + 8) + sum(shape))
    for row, lab in zip(rows, s.read_batch(rows)["label"]):
      assert (lab != U).any(), row
  # A value that is neither a class nor the unlabelled value, met while mapping the labels.
  bad = full.copy()
  bad[0, 0, 0] = 9
  root2 = _dataset(tmp_path / "e", {"x": bad})
  with pytest.raises(errors.UserError, match="scan 'x'.*label value 9"):
    patches.PatchStream(root2, ["x"], **kw)
  msg = None
  try:
    patches.PatchStream(root2, ["x"], **kw)
  except errors.UserError as e:
    msg = str(e)
  assert msg is not None and "\n" not in msg


def test_rare_class_counts_labelled_voxels_only(sparse_data):
  root, vols = sparse_data
  scan = store.open_dataset(root).open_scan("s0")
  counts = label_maps.class_projections(scan.labels, 3, unlabelled=U)[0]
  lab = vols["s0"]
  np.testing.assert_array_equal(counts, np.bincount(lab[lab != U], minlength=3))


def test_fully_labelled_training_scans_without_a_class_are_refused(tmp_path):
  # No unlabelled value: every voxel is labelled, and still no training voxel is a pore.
  shape = (6, 8, 8)
  lab = np.zeros(shape, np.uint8)
  lab[:, :4] = 1
  root = tmp_path / "d"
  for name in ("a", "b"):
    store.write_scan(root / name, np.full(shape, 1000, np.uint16), lab, chunks=(8, 8, 8))
  store.write_dataset_json(root, CLASSES, ["a", "b"])
  kw = dict(patch_size=8, global_batch_size=2, process_index=0, process_count=1)
  with pytest.raises(errors.UserError, match=r"class pore has no labelled voxel in the training "
                     r"scans \(a, b\)"):
    patches.PatchStream(root, ["a", "b"], **kw)
  np.testing.assert_array_equal(label_maps.class_counts(store.open_dataset(root).open_scan("a")
                                                        .labels, 3),
                                [6 * 8 * 4, 6 * 8 * 4, 0])
