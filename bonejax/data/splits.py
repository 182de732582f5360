"""Train/validation splits by whole scans.

Splitting by scan, never by slice, is BONe's fix for slice-level leakage: neighbouring planes of
one scan are nearly identical, so a plane-level split puts near-copies of the training data into
validation and overstates accuracy. A scan named in both partitions is therefore an error, not a
silent leak.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from bonejax.core import errors, outputs


@dataclasses.dataclass
class Split:
  train: list[str]
  val: list[str]


def _check_known(names: Sequence[str], all_scans: Sequence[str], what: str) -> list[str]:
  names = [str(n) for n in names]
  unknown = [n for n in names if n not in all_scans]
  if unknown:
    raise errors.UserError(f"{what} scan(s) {', '.join(map(repr, unknown))} not in the dataset "
                        f"(has {', '.join(all_scans) or 'none'})")
  dups = sorted({n for n in names if names.count(n) > 1})
  if dups:
    raise errors.UserError(f"{what} scan(s) listed twice: {', '.join(map(repr, dups))}")
  return names


def make_split(all_scans: Sequence[str], train_scans: Sequence[str] = (),
               val_scans: Sequence[str] = (), val_fraction: float = 0.25,
               seed: int = 0) -> Split:
  """Explicit lists win; one list alone means the other is the rest; none: split by fraction."""
  all_scans = [str(s) for s in all_scans]
  train = _check_known(train_scans, all_scans, "train")
  val = _check_known(val_scans, all_scans, "val")
  both = [s for s in train if s in val]
  if both:
    raise errors.UserError(f"scan(s) {', '.join(map(repr, both))} are in both train_scans and "
                        "val_scans: that leaks validation data into training")
  if train and not val:
    val = [s for s in all_scans if s not in train]
  elif val and not train:
    train = [s for s in all_scans if s not in val]
  elif not train and not val:
    if len(all_scans) < 2:
      raise errors.UserError(f"need at least 2 scans to split into train and val, got "
                          f"{len(all_scans)}; add scans or give train_scans/val_scans")
    if not 0.0 < float(val_fraction) < 1.0:
      raise errors.UserError(f"val_fraction={val_fraction} must be in (0, 1)")
    order = np.random.default_rng(seed).permutation(len(all_scans))
    n_val = min(max(1, int(round(val_fraction * len(all_scans)))), len(all_scans) - 1)
    val_idx = set(order[:n_val].tolist())
    # Keep dataset order inside each partition: stable, readable logs.
    val = [s for i, s in enumerate(all_scans) if i in val_idx]
    train = [s for i, s in enumerate(all_scans) if i not in val_idx]
  if not train:
    raise errors.UserError("the split leaves no training scan")
  if not val:
    raise errors.UserError("the split leaves no validation scan")
  return Split(train, val)


def kfold(all_scans: Sequence[str], k: int, seed: int = 0) -> list[Split]:
  """k folds by whole scans; every scan is validation in exactly one fold."""
  all_scans = [str(s) for s in all_scans]
  k = int(k)
  if k < 2:
    raise errors.UserError(f"folds={k}: need at least 2 folds")
  if k > len(all_scans):
    raise errors.UserError(f"folds={k} is more than the {len(all_scans)} scans in the dataset")
  order = np.random.default_rng(seed).permutation(len(all_scans))
  fold_of = np.empty(len(all_scans), int)
  for f, part in enumerate(np.array_split(order, k)):
    fold_of[part] = f
  return [Split([s for i, s in enumerate(all_scans) if fold_of[i] != f],
                [s for i, s in enumerate(all_scans) if fold_of[i] == f]) for f in range(k)]


@dataclasses.dataclass
class Fold:
  """One fold of nested cross-validation, by whole scans."""
  train: list[str]  # trains the fold's model
  val: list[str]    # inner validation: model selection, early stopping, the plateau schedule
  test: list[str]   # the outer fold: only ever scored


def nested_kfold(all_scans: Sequence[str], k: int, seed: int = 0,
                 val_fraction: float = 0.2) -> list[Fold]:
  """k outer folds (as kfold); each fold's inner validation scans come from its training scans.

  Choosing the model, when to stop and when to cut the learning rate on the scans that are then
  reported makes the reported score optimistic; here the outer fold's scans take no part in
  any of it. The inner split takes `val_fraction` of the fold's training scans (at least one,
  never all), drawn with (seed, fold): deterministic, and different across folds.
  """
  if not 0.0 < float(val_fraction) < 1.0:
    raise errors.UserError(f"val_fraction={val_fraction} must be in (0, 1)")
  folds = []
  for f, outer in enumerate(kfold(all_scans, k, seed)):
    rest = outer.train
    if len(rest) < 2:
      raise errors.UserError(f"nested cross-validation: fold {f} leaves {len(rest)} scan(s) to "
                          "train and select the model on; needs at least 2 (use fewer folds "
                          "or more scans)")
    order = np.random.default_rng([int(seed), f]).permutation(len(rest))
    n_val = min(max(1, int(round(float(val_fraction) * len(rest)))), len(rest) - 1)
    val_idx = set(order[:n_val].tolist())
    folds.append(Fold(train=[s for i, s in enumerate(rest) if i not in val_idx],
                      val=[s for i, s in enumerate(rest) if i in val_idx], test=outer.val))
  return folds


def save_split(path: str | Path, split: Split) -> None:
  outputs.atomic_write_json(path, dataclasses.asdict(split))


def load_split(path: str | Path) -> Split:
  p = Path(path)
  if not p.exists():
    raise errors.UserError(f"split file {str(p)!r} does not exist")
  try:
    d = json.loads(p.read_text())
    return Split([str(s) for s in d["train"]], [str(s) for s in d["val"]])
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise errors.UserError(f"{str(p)!r} is not a split file: {e}") from None
