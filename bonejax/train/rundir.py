"""Clean-up after a run that fails before it has produced anything worth keeping.

A training (or cross-validation, or demo) run creates its work directory, the parents it lacked,
and files in it (config.json, split.json, metrics.csv, checkpoints/, a phantom dataset ...). If it
fails before its first checkpoint, nothing there can be resumed or used, and a directory left
behind only misleads the next run ("holds a run with another split") or the user. So on failure
the run removes what it created: the entries of the directory that were not there when it
started and that bear the names of its own outputs, then the directory and its parents if it
made them and they are empty. What existed before, and anything else that appeared meanwhile, is
never touched; once something is worth keeping (a checkpoint), nothing is removed.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

from bonejax.core import outputs

# What a training run writes in its work directory (trainer.py, checkpoint.py, best.py).
TRAIN_OUTPUTS = ("config.json", "split.json", "metrics.csv", "curves.png", "checkpoints",
                 "checkpoints.corrupt", "best", "model", "data", "tensorboard", "profile")


def has_checkpoint(workdir: str | os.PathLike) -> bool:
  """Whether a training run in `workdir` has a finished checkpoint (a numbered step)."""
  d = Path(workdir) / "checkpoints"
  return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


class Created:
  """Notes what exists under `path` now, to remove later only what appeared since (and matches
  one of the glob patterns `names`)."""

  def __init__(self, path: str | os.PathLike, names: Sequence[str] = TRAIN_OUTPUTS):
    self.path = Path(path).absolute()
    self.names = tuple(names)
    # The topmost directory of `path`'s chain that does not exist yet (None: path exists).
    self.first_new = None
    for p in [self.path, *self.path.parents]:
      if p.exists():
        break
      self.first_new = p
    self.before = set(os.listdir(self.path)) if self.path.is_dir() else set()

  def remove(self) -> None:
    if self.path.is_dir():
      for name in sorted(set(os.listdir(self.path)) - self.before):
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.names):
          outputs.remove_path(self.path / name)
    if self.first_new is None:
      return
    # The directories this run made, if now empty; also when the run failed before making
    # `path` itself but after its parents (the workdir lock lives beside it).
    for p in [self.path, *self.path.parents]:
      if p.exists():
        try:
          p.rmdir()
        except OSError:
          break
      if p == self.first_new:
        break


@contextlib.contextmanager
def removed_on_failure(path: str | os.PathLike, worth_keeping: Callable[[], bool],
                       names: Sequence[str] = TRAIN_OUTPUTS,
                       enabled: bool = True) -> Iterator[Created]:
  """Removes what the block created under `path` (entries matching `names`) if it raises and
  `worth_keeping()` is False."""
  created = Created(path, names)
  try:
    yield created
  except BaseException:
    if enabled and not worth_keeping():
      created.remove()
    raise
