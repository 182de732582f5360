"""Volumes in memory or on disk, moved as slabs of planes; the accumulators that sum plane sets.

When everything fits the host budget, the volume and the accumulators are numpy arrays;
otherwise they are chunk-aligned zarr arrays in a scratch directory, read and written slab by
slab (axis-1/2 slabs span all of Z for a range of Y or X), so host memory stays near the budget
whatever the volume size. `SlabVolume` hides the difference: both modes run the same slabs.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import tensorstore as ts

from bonejax.core import outputs
from bonejax.data import store
from bonejax.predict.planesets import (PlaneSet, face_weights, mean_of, one_hot_argmax,
                                       tapered, vote_labels)


class SlabVolume:
  """(Z, Y, X) or (Z, Y, X, C): a numpy array or a tensorstore, moved in slabs of planes.

  `read(axis, s0, s1)` returns the planes s0..s1-1 perpendicular to `axis`, plane-major and
  contiguous, (n, H, W[, C]); `write` and `add` take the same layout. On disk, `write` and `add`
  go piece by piece along another axis (`piece` indices at a time, chunk-aligned), so the
  read-modify-write of an accumulator needs memory for a piece, not for a second slab.
  """

  def __init__(self, arr: Any, path: Path | None = None, piece: int | None = None):
    self.arr, self.path = arr, path
    self.on_disk = isinstance(arr, ts.TensorStore)
    self.rank = arr.rank if self.on_disk else arr.ndim
    shape = tuple(int(s) for s in arr.shape)
    self.shape = shape[:3]
    self.channels = shape[3] if self.rank == 4 else 1
    self.dtype = np.dtype(arr.dtype.numpy_dtype) if self.on_disk else np.dtype(arr.dtype)
    self.piece = piece

  def plane_shape(self, axis: int) -> tuple[int, int]:
    h, w = (s for a, s in enumerate(self.shape) if a != axis)
    return h, w

  def _index(self, axis: int, s0: int, s1: int) -> tuple:
    return store.slab_index(axis, s0, s1, self.rank)

  def read(self, axis: int, s0: int, s1: int) -> np.ndarray:
    region = self.arr[self._index(axis, s0, s1)]
    data = region.read().result() if self.on_disk else region
    return np.ascontiguousarray(np.moveaxis(data, axis, 0))

  def _pieces(self, axis: int, s0: int, data: np.ndarray) -> Iterator[tuple[tuple, np.ndarray]]:
    """(index, data) of the slab's pieces along the first other axis."""
    other = 1 if axis == 0 else 0
    n, step = self.shape[other], self.piece or self.shape[other]
    for p0 in range(0, n, step):
      idx = list(self._index(axis, s0, s0 + data.shape[axis]))
      idx[other] = slice(p0, min(p0 + step, n))
      sub = [slice(None)] * data.ndim
      sub[other] = idx[other]
      yield tuple(idx), data[tuple(sub)]

  def write(self, axis: int, s0: int, planes: np.ndarray) -> None:
    data = np.moveaxis(planes, 0, axis)
    if not self.on_disk:
      self.arr[self._index(axis, s0, s0 + planes.shape[0])] = data
      return
    pending = []
    for idx, part in self._pieces(axis, s0, data):
      pending.append(self.arr[idx].write(np.ascontiguousarray(part)))
      if len(pending) > 1:
        pending.pop(0).result()
    for f in pending:
      f.result()

  def add(self, axis: int, s0: int, planes: np.ndarray, op: Any = np.add) -> None:
    """Combines `planes` into the volume in place with `op` (np.add; np.maximum for max)."""
    data = np.moveaxis(planes, 0, axis)
    if not self.on_disk:
      region = self.arr[self._index(axis, s0, s0 + planes.shape[0])]
      op(region, data, out=region)
      return
    pending = []
    pieces = self._pieces(axis, s0, data)
    nxt = next(pieces, None)
    current = self.arr[nxt[0]].read() if nxt else None
    while nxt is not None:
      idx, part = nxt
      cur = current.result()
      nxt = next(pieces, None)
      if nxt is not None:
        current = self.arr[nxt[0]].read()  # the next piece is read while this one is added
      op(cur, part, out=cur)
      pending.append(self.arr[idx].write(cur))
      if len(pending) > 1:
        pending.pop(0).result()
    for f in pending:
      f.result()


def create_scratch(path: Path, shape: Sequence[int], dtype: Any, chunk: int,
                   context: ts.Context) -> ts.TensorStore:
  """A scratch zarr array: chunk^3 x all channels, uncompressed (probabilities do not compress;
  speed matters here), in the run's bounded-cache context."""
  return store.create_array(path, shape, dtype, (chunk,) * 3, compression_level=None,
                            context=context)


@contextlib.contextmanager
def scratch_dir(parent: str | os.PathLike | None, needed: bool) -> Iterator[Path | None]:
  """A fresh hidden scratch directory under `parent` (default: the system temp dir), removed
  afterwards whatever happens; None when not `needed`. Scratch directories of crashed runs in
  the same place (owner process gone) are removed first (bonejax.core.outputs.scratch_dir)."""
  if not needed:
    yield None
    return
  with outputs.scratch_dir(Path(parent) if parent else Path(tempfile.gettempdir())) as path:
    yield path


# ---------------------------------------------------------------------------------------------
# Sinks: where a plane set's probabilities go, slab by slab.
# ---------------------------------------------------------------------------------------------


class Accumulator:
  """The first contribution of a round is written, the others combined with `op`."""

  def __init__(self, vol: SlabVolume, op: Any = np.add):
    self.vol, self.first, self.op = vol, True, op

  def add(self, axis: int, s0: int, planes: np.ndarray) -> None:
    if self.first:
      self.vol.write(axis, s0, planes)
    else:
      self.vol.add(axis, s0, planes, self.op)


class Fuser:
  """Accumulates what the vote needs from every plane set: the summed probabilities, the summed
  one-hot labels (majority voting, and the uncertainty map's disagreement), the per-class
  maximum (max-probability fusion).

  A sink: `begin(ps)` before a plane set (`ps` None: sets summed together, weight 1),
  `add(axis, s0, probs)` per slab, `end(n)` after `n` sets. `soft_only`: sets may be summed
  before rotating back (only the sum is needed). `decide(z0, z1)` then votes a Z slab: (labels,
  mean probabilities, counts or None). With `face_taper`, an axis-aligned set's probabilities
  enter the sum weighted by `planesets.face_weights` (the counts and the maxima unweighted), and
  the mean divides by the summed weights.
  """

  def __init__(self, probsum: SlabVolume, counts: SlabVolume | None,
               probmax: SlabVolume | None = None, vote: str | None = None,
               face_taper: int = 0):
    self.probs = Accumulator(probsum)
    self.counts = Accumulator(counts) if counts is not None else None
    self.max = Accumulator(probmax, np.maximum) if probmax is not None else None
    self.vote = vote or ("majority" if counts is not None else "soft")
    self.n_sets = 0
    self.soft_only = counts is None and probmax is None
    self.face_taper = int(face_taper)
    self._set: PlaneSet | None = None
    self._weighted: list[PlaneSet] = []  # the sets whose weights are not all 1

  @classmethod
  def create(cls, array: Callable, shape: Sequence[int], k: int, vote: str,
             keep_counts: bool = False, face_taper: int = 0) -> "Fuser":
    """The accumulators `vote` needs (with the counts also when `keep_counts`: uncertainty),
    made by `array(name, shape, dtype, channels)` (`Runner.array`: memory or scratch zarr)."""
    probsum = array("probsum", shape, np.float32, k)
    counts = (array("votes", shape, np.uint8, k) if vote == "majority" or keep_counts
              else None)
    probmax = array("probmax", shape, np.float32, k) if vote == "max" else None
    return cls(probsum, counts, probmax, vote, face_taper)

  @property
  def shape(self) -> tuple[int, ...]:
    return self.probs.vol.shape

  def begin(self, ps: PlaneSet | None = None) -> None:
    for acc in (self.probs, self.counts, self.max):
      if acc is not None:
        acc.first = self.n_sets == 0
    self._set = ps if tapered(ps, self.face_taper) else None

  def add(self, axis: int, s0: int, probs: np.ndarray) -> None:
    w = face_weights(self.shape, self._set, self.face_taper, axis, s0, s0 + probs.shape[0])
    self.probs.add(axis, s0, probs if np.isscalar(w) else probs * w)
    if self.counts is not None:
      self.counts.add(axis, s0, one_hot_argmax(probs))
    if self.max is not None:
      self.max.add(axis, s0, probs)

  def end(self, n: int = 1) -> None:
    self.n_sets += n
    if self._set is not None:
      self._weighted.append(self._set)
      self._set = None

  def weight(self, z0: int, z1: int):
    """The summed weights of slices z0..z1-1: the number of sets when all weigh 1."""
    total = float(self.n_sets - len(self._weighted))
    for ps in self._weighted:
      total = total + face_weights(self.shape, ps, self.face_taper, 0, z0, z1)
    return total

  def decide(self, z0: int, z1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Labels (uint8), mean probabilities and the per-class vote counts of slices z0..z1-1."""
    ps = self.probs.vol.read(0, z0, z1)
    counts = self.counts.vol.read(0, z0, z1) if self.counts is not None else None
    top = self.max.vol.read(0, z0, z1) if self.max is not None else None
    labels = vote_labels(self.vote, ps, counts, top)
    return labels, mean_of(ps, self.weight(z0, z1)), counts


class PerSet:
  """A sink keeping every plane set's probabilities apart (in memory): for `predict_planes`."""

  soft_only = False

  def __init__(self, shape: Sequence[int], k: int):
    self.shape, self.k, self.arrays = tuple(shape), k, []

  def begin(self, ps: PlaneSet | None = None) -> None:
    self.arrays.append(np.zeros(self.shape + (self.k,), np.float32))
    self._vol = SlabVolume(self.arrays[-1])

  def add(self, axis: int, s0: int, probs: np.ndarray) -> None:
    self._vol.write(axis, s0, probs)

  def end(self, n: int = 1) -> None:
    pass
