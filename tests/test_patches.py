"""The training patch stream and validation batches, against plain numpy crops."""

import numpy as np
import pytest

from bonejax.core import errors
from bonejax.data import store
from bonejax.io import intensity
from bonejax.data import label_maps, patches, validation

SHAPE = (20, 40, 36)
NAMES = ["s0", "s1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("ds")
  rng = np.random.default_rng(0)
  vols = {}
  for i, name in enumerate(NAMES):
    img = rng.integers(1000, 50000, SHAPE).astype(np.uint16)
    lab = (img > 30000).astype(np.uint8)
    lab[3 + i:5 + i, 10:14, 20:23] = 2  # the rare class, in a small blob
    store.write_scan(root / name, img, lab, chunks=(8, 16, 16))
    vols[name] = (img, lab)
  store.write_dataset_json(root, ["background", "bone", "pore"], NAMES)
  return root, vols


def _stream(root, **kw):
  args = dict(patch_size=16, global_batch_size=6, process_index=0, process_count=1,
              num_threads=2, patches_per_plane=1)
  args.update(kw)
  return patches.PatchStream(root, NAMES, **args)


def _reference(vols, stats, row, p, rule="percentile"):
  si, axis, plane, oy, ox = row
  img, lab = vols[NAMES[si]]
  out = []
  for v in (img, lab):
    v2 = np.take(v, plane, axis)
    v2 = np.pad(v2, p, mode="reflect")  # numpy mirrors repeatedly when p > size
    out.append(v2[oy + p:oy + 2 * p, ox + p:ox + 2 * p])
  return intensity.normalize(out[0], stats[si], rule), out[1].astype(np.int32)


@pytest.mark.parametrize("p,rule", [(16, "percentile"), (48, "zscore")])
def test_batches_match_numpy_crops(data, p, rule):
  root, vols = data
  with _stream(root, patch_size=p, normalization=rule) as s:
    rows = s.records(s.local_positions(0))
    b = next(s)
  assert b["image"].shape == (6, p, p, 1) and b["image"].dtype == np.float32
  assert b["label"].shape == (6, p, p) and b["label"].dtype == np.int32
  stats = [sc.norm for sc in s.scans]
  for i, row in enumerate(rows):
    img, lab = _reference(vols, stats, row, p, rule)
    np.testing.assert_allclose(b["image"][i, ..., 0], img, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(b["label"][i], lab)


def test_epoch_enumerates_every_plane_once(data):
  root, _ = data
  s = _stream(root, axes=(0, 2))
  n = s.records_per_epoch
  assert n == 2 * (20 + 36) and len(s) == -(-n // 6)
  rows = s.records(np.arange(n))
  assert len({tuple(r[:3]) for r in rows}) == n
  nxt = s.records(np.arange(n, 2 * n))  # next epoch: other order, other crop origins
  assert len({tuple(r[:3]) for r in nxt}) == n and not np.array_equal(rows, nxt)
  s.close()


@pytest.mark.parametrize("path", ["grain", "whole_epochs", "positions"])
def test_shuffle_is_grains(data, monkeypatch, path):
  # records() computes grain's shuffle with numpy (50x faster); the order must stay grain's.
  from grain._src.python.experimental.index_shuffle.python import index_shuffle_module as g
  from bonejax.data import shuffle
  root, _ = data
  if path != "grain":  # this test's epochs are small: grain's own loop unless told otherwise
    monkeypatch.setattr(patches, "_GRAIN_EPOCH_RECORDS", 0)
  if path == "positions":  # epochs too large to keep whole: the positions asked for only
    monkeypatch.setattr(patches, "_WHOLE_EPOCH_RECORDS", 0)
  with _stream(root, seed=7) as s:
    assert s._fast_shuffle
    positions = np.arange(0, 3 * s.records_per_epoch + 5, 3)
    np.testing.assert_array_equal(s._shuffled(positions),
                                  [s._order[int(p)] for p in positions])
  if path != "grain":
    return
  # Block sizes 16..24 bits, one past a power of two, the extreme seeds, cycle walking.
  for n in (1, 5000, 65536, 65537, 2**20, 2**20 + 1, 3_000_001):
    for seed in (0, 2**32 - 1, 123456789):
      idx = np.unique(np.linspace(0, n - 1, 300).astype(np.int64))
      np.testing.assert_array_equal(
          shuffle.index_shuffle(idx, n - 1, seed),
          [g.index_shuffle(int(i), max_index=n - 1, seed=seed, rounds=4) for i in idx])


def test_deterministic_and_resumable(data):
  root, _ = data
  a = _stream(root, seed=3)
  start = a.records_per_epoch - 8  # the next batches straddle an epoch boundary
  a.set_state({"position": start})
  ref = [next(a) for _ in range(4)]
  b = _stream(root, seed=3)
  b.set_state({"position": start})
  next(b), next(b)
  state = b.get_state()
  assert state["position"] == start + 12 and state["epoch"] == 1
  c = _stream(root, seed=3)
  c.set_state(state)
  for r, x in zip(ref[2:], [next(c), next(c)]):
    np.testing.assert_array_equal(r["image"], x["image"])
    np.testing.assert_array_equal(r["label"], x["label"])
  b.set_state(state)  # in-process rewind drops prefetched batches
  np.testing.assert_array_equal(next(b)["image"], ref[2]["image"])
  d = _stream(root, seed=4)
  d.set_state({"position": start})
  assert not np.array_equal(next(d)["image"], ref[0]["image"])
  for s in (a, b, c, d):
    s.close()


def test_hosts_split_the_global_batch(data):
  root, _ = data
  whole = _stream(root, global_batch_size=8)
  hosts = [_stream(root, global_batch_size=8, process_index=i, process_count=2)
           for i in range(2)]
  for _ in range(2):
    w = next(whole)
    parts = [next(h) for h in hosts]
    assert parts[0]["image"].shape[0] == 4
    np.testing.assert_array_equal(np.concatenate([q["label"] for q in parts]), w["label"])
    np.testing.assert_array_equal(np.concatenate([q["image"] for q in parts]), w["image"])
  for s in [whole] + hosts:
    s.close()
  with pytest.raises(errors.UserError, match="multiple"):
    _stream(root, global_batch_size=7, process_index=0, process_count=2)


def test_class_projections_and_rare_oversampling(data):
  root, vols = data
  img, lab = vols["s0"]
  counts, zy, zx, yx = label_maps.class_projections(store.open_scan(root / "s0").labels, 3, slab=7)
  np.testing.assert_array_equal(counts, np.bincount(lab.ravel(), minlength=3))
  for c in range(3):
    m = lab == c
    np.testing.assert_array_equal(zy[c], m.any(2))
    np.testing.assert_array_equal(zx[c], m.any(1))
    np.testing.assert_array_equal(yx[c], m.any(0))

  s = _stream(root, oversample_rare=0.5, patch_size=8, global_batch_size=8)
  assert s.rare_classes == [2]
  assert s.rare_records == s.uniform_records
  rows = s.records(np.arange(s.records_per_epoch))
  b = s.read_batch(rows[:200])
  hit = (b["label"] == 2).any((1, 2))
  rec = np.array([s._order[i] for i in range(200)])
  # Every oversampled crop overlaps the rare blob (it is a box, so its bounding box is itself).
  assert hit[rec >= s.uniform_records].all()
  assert hit[rec >= s.uniform_records].mean() > 5 * hit[rec < s.uniform_records].mean()
  s.close()


def test_validation_batches(data):
  root, vols = data
  out = list(validation.validation_batches(root, ["s1"], axes=(0, 1), batch_size=4, stride=4))
  # axis 0: planes 2, 6, 10, 14, 18 -> 2 batches of 40x36 padded to 64x64;
  # axis 1: 10 planes -> 3 batches of 20x36 padded to 32x64.
  assert [b["image"].shape for b in out] == [(4, 64, 64, 1)] * 2 + [(4, 32, 64, 1)] * 3
  img, lab = vols["s1"]
  stats = store.open_scan(root / "s1").stats
  first = out[0]
  np.testing.assert_array_equal(first["mask"][0].sum(), 40 * 36)
  assert out[1]["mask"][1:].sum() == 0  # filler examples
  r0, c0 = (64 - 40) // 2, (64 - 36) // 2
  np.testing.assert_allclose(first["image"][1, r0:r0 + 40, c0:c0 + 36, 0],
                             intensity.normalize(img[6], stats), atol=1e-6)
  np.testing.assert_array_equal(first["label"][1, r0:r0 + 40, c0:c0 + 36], lab[6])
  assert first["label"][first["mask"] == 0].max() == 0
  crops = list(validation.validation_batches(root, NAMES, crop=30, batch_size=8, stride=3))
  assert all(b["image"].shape == (8, 32, 32, 1) for b in crops)
  assert crops[0]["mask"][0].sum() == 30 * 30
  assert validation.num_validation_batches(root, NAMES, batch_size=8, stride=3) == len(crops)
  nbytes = sum(v.nbytes for b in crops for v in b.values())
  assert validation.validation_nbytes(root, NAMES, crop=30, batch_size=8, stride=3) == nbytes


def _copy_with(tmp_path, data, edit):
  """A copy of the dataset with `edit(root)` applied to it."""
  import shutil
  root = tmp_path / "ds"
  shutil.copytree(data[0], root)
  edit(root)
  return root


def _set_label(root, value):
  arr = store.open_array(root / "s1" / "labels", write=True)
  arr[5, 0:40, 0:36].write(np.full((40, 36), value, np.uint8)).result()


def test_labels_without_a_class_are_refused(data, tmp_path):
  # Label 3 in a 3-class dataset: the stream and the validation set name the scan (issue 13.3).
  root = _copy_with(tmp_path, data, lambda r: _set_label(r, 3))
  with pytest.raises(errors.UserError, match=r"scan 's1' has label value 3.*3 classes"):
    with _stream(root, axes=(0,), patches_per_plane=1, global_batch_size=40) as s:
      for _ in range(3):  # two epochs' worth: every plane of both scans
        next(s)
  with pytest.raises(errors.UserError, match=r"scan 's1' has label value 3"):
    list(validation.validation_batches(root, ["s1"], batch_size=4))
  with pytest.raises(errors.UserError, match=r"scan 's1'.*label value 3"):
    _stream(root, oversample_rare=0.3)


def test_a_damaged_chunk_is_bad_input(data, tmp_path):
  def garbage(r):
    chunk = sorted(p for p in (r / "s0" / "image" / "c").rglob("*") if p.is_file())[0]
    chunk.write_bytes(b"not a zstd frame")
  root = _copy_with(tmp_path, data, garbage)
  with pytest.raises(errors.UserError, match=r"cannot read the image of scan 's0'"):
    with _stream(root, axes=(0,), global_batch_size=40) as s:
      for _ in range(2):
        next(s)
  with pytest.raises(errors.UserError, match=r"cannot read the image of scan 's0'"):
    list(validation.validation_batches(root, ["s0"], batch_size=4))
