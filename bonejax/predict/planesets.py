"""Plane sets and voting: which stacks of 2D planes the model sees, and how their answers combine.

A *plane set* is one way of cutting the volume into 2D planes (BONe DLPred; Scaling the U-net):
- `planes=1`: the planes perpendicular to one axis (`axis` = 0 (Z), 1 (Y) or 2 (X));
- `planes=3`: the three orthogonal stacks;
- `planes=9`: those three plus, for a 45-degree rotation about each axis, the planes
  perpendicular to the two axes the rotation changed (see `rotate`);
- `planes=12`: the three stacks, each plane also seen turned in-plane by 90, 180 and 270 degrees.
Each set gives a probability volume (Z, Y, X, K). `soft` voting averages them; `majority` takes
the most frequent per-set label, ties broken by the summed probabilities; `max` (max-probability
fusion, as volume-segmantics fuses its planes) takes the class of the single highest probability
any set gave, ties broken by the summed probabilities. The streaming path (`volumes.Fuser`)
accumulates the same quantities slab by slab and decides with the same functions.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from bonejax.core import errors

PLANES = (1, 3, 9, 12)
VOTES = ("soft", "majority", "max")
AXES = "zyx"


@dataclasses.dataclass(frozen=True)
class PlaneSet:
  """Planes perpendicular to `axis`; of the volume rotated 45 deg about `rot45` when given;
  each plane turned in-plane by `k90` x 90 degrees before the model (and back after)."""
  axis: int
  rot45: int | None = None
  k90: int = 0

  @property
  def name(self) -> str:
    name = f"{AXES[self.axis]}"
    if self.rot45 is not None:
      name = f"rot45{AXES[self.rot45]}:{name}"
    if self.k90:
      name += f":rot{90 * self.k90}"
    return name


def plane_sets(planes: int, axis: int | None = None) -> list[PlaneSet]:
  """The plane sets of `planes` = 1 (with `axis`, default 0), 3, 9 or 12."""
  try:
    planes = int(planes)
  except (TypeError, ValueError):
    raise errors.UserError(f"planes={planes!r} must be one of {PLANES}") from None
  if planes not in PLANES:
    raise errors.UserError(f"planes={planes} must be one of {', '.join(map(str, PLANES))}")
  if planes != 1 and axis is not None:
    raise errors.UserError(f"axis={axis} only goes with planes=1 (got planes={planes})")
  if planes == 1:
    axis = 0 if axis is None else axis
    if axis not in (0, 1, 2):
      raise errors.UserError(f"axis={axis} must be 0 (Z), 1 (Y) or 2 (X)")
    return [PlaneSet(int(axis))]
  naive = [PlaneSet(a) for a in range(3)]
  if planes == 3:
    return naive
  if planes == 9:
    return naive + [PlaneSet(b, rot45=a) for a in range(3) for b in range(3) if b != a]
  return [PlaneSet(a, k90=k) for a in range(3) for k in range(4)]


def run_order(sets: Sequence[PlaneSet]) -> list[PlaneSet]:
  """The order sets are computed in: the naive ones, then the rotated ones grouped by rotation
  (each rotated volume is made once)."""
  rotations = sorted({ps.rot45 for ps in sets if ps.rot45 is not None})
  return ([ps for ps in sets if ps.rot45 is None]
          + [ps for a in rotations for ps in sets if ps.rot45 == a])


def check_vote(vote: str) -> str:
  if vote not in VOTES:
    raise errors.UserError(f"vote={vote!r} must be one of {', '.join(VOTES)}")
  return vote


def one_hot_argmax(probs: np.ndarray) -> np.ndarray:
  """(..., K) probabilities -> (..., K) uint8 one-hot of the most probable class."""
  k = probs.shape[-1]
  return (np.argmax(probs, axis=-1)[..., None] == np.arange(k)).astype(np.uint8)


def majority_labels(counts: np.ndarray, probsum: np.ndarray) -> np.ndarray:
  """The most voted class; ties go to the highest (summed) probability, then the lowest class."""
  top = counts.max(axis=-1, keepdims=True)
  score = np.where(counts == top, probsum, -np.inf)
  return np.argmax(score, axis=-1).astype(np.uint8)


def max_labels(probmax: np.ndarray, probsum: np.ndarray) -> np.ndarray:
  """The class of the highest single-set probability; ties go to the highest summed probability
  (two sets both certain of different classes), then the lowest class."""
  top = probmax.max(axis=-1, keepdims=True)
  score = np.where(probmax == top, probsum, -np.inf)
  return np.argmax(score, axis=-1).astype(np.uint8)


def vote_labels(vote: str, probsum: np.ndarray, counts: np.ndarray | None,
                probmax: np.ndarray | None = None) -> np.ndarray:
  """uint8 labels from the summed probabilities (and, for majority, the summed one-hot votes;
  for max, the per-class maximum over the sets)."""
  if vote == "soft":
    return np.argmax(probsum, axis=-1).astype(np.uint8)
  if vote == "max":
    return max_labels(probmax, probsum)
  return majority_labels(counts, probsum)


def fuse(probs: Sequence[np.ndarray], vote: str = "soft") -> tuple[np.ndarray, np.ndarray]:
  """Per-set probabilities (Z, Y, X, K) -> (uint8 labels, mean probabilities)."""
  check_vote(vote)
  if not probs:
    raise ValueError("fuse needs at least one probability volume")
  total = np.zeros_like(probs[0], dtype=np.float32)
  counts = np.zeros(probs[0].shape, np.uint8) if vote == "majority" else None
  top = np.full(probs[0].shape, -np.inf, np.float32) if vote == "max" else None
  for p in probs:
    total += p
    if counts is not None:
      counts += one_hot_argmax(p)
    if top is not None:
      np.maximum(top, p, out=top)
  mean = total * np.float32(1.0 / len(probs))
  return vote_labels(vote, total, counts, top), mean
