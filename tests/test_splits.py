"""Whole-scan splits: explicit lists, fractions, refused leaks, k folds."""

import pytest

from bonejax.core import errors
from bonejax.data import splits

SCANS = [f"scan_{i:03d}" for i in range(7)]


def test_explicit_lists_win():
  s = splits.make_split(SCANS, train_scans=SCANS[:3], val_scans=[SCANS[5]])
  assert s.train == SCANS[:3] and s.val == [SCANS[5]]


def test_one_list_means_the_other_is_the_rest():
  s = splits.make_split(SCANS, val_scans=[SCANS[2]])
  assert s.val == [SCANS[2]] and s.train == [x for x in SCANS if x != SCANS[2]]
  s = splits.make_split(SCANS, train_scans=SCANS[:5])
  assert s.val == SCANS[5:]


def test_leak_and_unknown_refused():
  with pytest.raises(errors.UserError, match="scan_001.*both"):
    splits.make_split(SCANS, train_scans=SCANS[:3], val_scans=[SCANS[1]])
  with pytest.raises(errors.UserError, match="nope"):
    splits.make_split(SCANS, val_scans=["nope"])
  with pytest.raises(errors.UserError, match="at least 2"):
    splits.make_split(SCANS[:1])
  with pytest.raises(errors.UserError, match="no validation"):
    splits.make_split(SCANS, train_scans=SCANS)


def test_fraction_split_is_whole_scan_and_deterministic():
  a = splits.make_split(SCANS, val_fraction=0.3, seed=4)
  assert a == splits.make_split(SCANS, val_fraction=0.3, seed=4)
  assert len(a.val) == 2 and sorted(a.train + a.val) == sorted(SCANS)
  assert not set(a.train) & set(a.val)
  tiny = splits.make_split(SCANS[:2], val_fraction=0.01)
  assert len(tiny.train) == 1 and len(tiny.val) == 1
  tiny = splits.make_split(SCANS[:2], val_fraction=0.99)
  assert len(tiny.train) == 1 and len(tiny.val) == 1


def test_kfold_covers_every_scan_once_as_val():
  folds = splits.kfold(SCANS, 3, seed=1)
  assert len(folds) == 3
  vals = [s for f in folds for s in f.val]
  assert sorted(vals) == sorted(SCANS)
  for f in folds:
    assert sorted(f.train + f.val) == sorted(SCANS) and not set(f.train) & set(f.val)
  with pytest.raises(errors.UserError, match="folds=8"):
    splits.kfold(SCANS, 8)


def test_save_load_roundtrip(tmp_path):
  s = splits.make_split(SCANS, seed=2)
  splits.save_split(tmp_path / "split.json", s)
  assert splits.load_split(tmp_path / "split.json") == s


def test_nested_kfold_keeps_the_outer_fold_out_of_training_and_selection():
  folds = splits.nested_kfold(SCANS, 3, seed=1, val_fraction=0.3)
  outer = splits.kfold(SCANS, 3, seed=1)
  assert [f.test for f in folds] == [o.val for o in outer]  # the same outer folds as kfold
  assert sorted(s for f in folds for s in f.test) == sorted(SCANS)
  for f in folds:
    assert f.train and f.val
    assert not set(f.test) & (set(f.train) | set(f.val)) and not set(f.train) & set(f.val)
    assert sorted(f.train + f.val + f.test) == sorted(SCANS)
  assert folds == splits.nested_kfold(SCANS, 3, seed=1, val_fraction=0.3)  # deterministic
  assert len({tuple(f.val) for f in folds}) > 1
  with pytest.raises(errors.UserError, match="fold 0 leaves 1 scan"):
    splits.nested_kfold(SCANS[:3], 2)  # 3 scans, 2 folds: one fold keeps a single scan
