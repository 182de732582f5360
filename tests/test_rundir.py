"""Clean-up after failed runs: only what the run created, and only its own kind of output."""

import pytest

from bonejax.train import rundir


def _run(path, make, worth_keeping=lambda: False):
  """A run under removed_on_failure that makes things, then fails."""
  with pytest.raises(RuntimeError, match="the run fails"):
    with rundir.removed_on_failure(path, worth_keeping):
      make()
      raise RuntimeError("the run fails")


def test_new_outputs_and_new_directories_go(tmp_path):
  run = tmp_path / "a" / "b"

  def make():
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "checkpoints").mkdir()

  _run(run, make)
  assert not (tmp_path / "a").exists()


def test_what_existed_or_is_not_ours_stays(tmp_path):
  (tmp_path / "config.json").write_text("an older run's")
  (tmp_path / "notes.txt").write_text("mine")

  def make():
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "split.json").write_text("{}")
    (tmp_path / "photo.png").write_text("written meanwhile by someone else")

  _run(tmp_path, make)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "notes.txt", "photo.png"]


def test_nothing_goes_once_something_is_worth_keeping(tmp_path):
  def make():
    (tmp_path / "checkpoints" / "4").mkdir(parents=True)
    (tmp_path / "config.json").write_text("{}")

  _run(tmp_path, make, lambda: rundir.has_checkpoint(tmp_path))
  assert (tmp_path / "config.json").exists() and (tmp_path / "checkpoints" / "4").exists()
