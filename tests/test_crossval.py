"""Nested cross-validation: the outer fold's scans never reach training or model selection;
they are only scored. And a failed run leaves no directory behind."""

import json
from pathlib import Path

import numpy as np
import pytest

from bonejax.core import errors, jsonable
from bonejax.data import store
from bonejax.train import crossval
from bonejax.data import patches, validation
from bonejax.train import trainer
from train_helpers import phantom_dataset, smoke_config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return phantom_dataset(tmp_path_factory, "cv", num_scans=4)


def test_outer_scans_are_only_scored(dataset, tmp_path, monkeypatch):
  # Every scan that reaches a fold's patch stream or its validation (model selection, early
  # stopping, plateau), and every scan it scores, recorded per fold.
  fold, used, scored = [None], {}, {}
  train, stream_init, val = trainer.train, patches.PatchStream.__init__, validation.validation_batches
  score = crossval.score_fold

  def spy_train(config, workdir, **kw):
    fold[0] = Path(workdir).name
    used[fold[0]] = set()
    return train(config, workdir, **kw)

  def spy_stream(self, path, scans, **kw):
    used[fold[0]].update(scans)
    return stream_init(self, path, scans, **kw)

  def spy_val(path, scans, **kw):
    used[fold[0]].update(scans)
    return val(path, scans, **kw)

  def spy_score(model_dir, ds, scans, planes, vote):
    scored[model_dir.parent.name] = list(scans)
    return score(model_dir, ds, scans, planes, vote)

  monkeypatch.setattr(trainer, "train", spy_train)
  monkeypatch.setattr(patches.PatchStream, "__init__", spy_stream)
  monkeypatch.setattr(validation, "validation_batches", spy_val)
  monkeypatch.setattr(crossval, "score_fold", spy_score)

  out = crossval.run(smoke_config(dataset), 2, tmp_path / "cv", planes=3, vote="soft")
  json.dumps(jsonable.to_jsonable(out))
  assert out["selection"].startswith("nested")
  rows = out["folds"]
  assert sorted(s for r in rows for s in r["test_scans"]) == store.open_dataset(dataset).scans
  for r in rows:
    name = f"fold_{r['fold']}"
    assert not used[name] & set(r["test_scans"]), (name, used[name], r["test_scans"])
    assert used[name] == set(r["train_scans"]) | set(r["inner_val_scans"])
    assert r["inner_val_scans"] and not set(r["inner_val_scans"]) & set(r["train_scans"])
    assert scored[name] == r["test_scans"] == r["val_scans"]
    meta = json.loads((tmp_path / "cv" / name / "model" / "model.json").read_text())
    assert meta["val_scans"] == r["inner_val_scans"] and meta["train_scans"] == r["train_scans"]
    # The fold's score is the pooled matrix's mean foreground IoU; with one outer scan it is
    # that scan's own score.
    fg = [v for c, v in r["iou"].items() if c != "background"]
    assert r["miou_fg"] == pytest.approx(np.nanmean(fg), abs=1e-12) and len(fg) == 2
    if len(r["test_scans"]) == 1:
      assert r["per_scan_miou_fg"] == {r["test_scans"][0]: r["miou_fg"]}
  values = np.array([r["miou_fg"] for r in rows])
  assert out["mean_miou_fg"] == pytest.approx(values.mean(), abs=1e-12)
  assert out["std_miou_fg"] == pytest.approx(values.std(ddof=1), abs=1e-12)
  assert json.loads((tmp_path / "cv" / "crossval.json").read_text())["folds"][0]["test_scans"] \
      == rows[0]["test_scans"]


def test_failed_crossval_removes_its_directory(dataset, tmp_path):
  workdir = tmp_path / "new" / "cv"
  with pytest.raises(errors.UserError, match="unknown model"):
    crossval.run(smoke_config(dataset, model=dict(name="vgg", kwargs={})), 2, workdir)
  assert not (tmp_path / "new").exists()
