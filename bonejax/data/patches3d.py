"""The training stream of 3D patches, and fixed 3D validation crops, for the 3D models.

The 3D twin of `patches.PatchStream`, with the same contract: an infinite, resumable,
per-host-sharded stream whose every batch is a pure function of (seed, stream position, host),
so the iterator state is one integer and a restored run sees the batches an uninterrupted one
would. A record is (scan, z, y, x): the origin of a `patch`^3 crop. One epoch holds
`patches_per_scan` records per training scan, shuffled afresh every epoch. A fraction
`foreground` of the records (nnU-Net's oversampling, 1/3 by default) is centred, with a random
offset, on a voxel of a class > 0 drawn from up to `FG_SAMPLES` locations per class and scan
gathered once at start; the rest have uniform origins, reaching `edge_margin` x patch past each
face and clamped back onto it (config.edge_margin, as the 2D stream: the voxels at a scan's faces
are trained about a third as often as interior voxels, instead of 1 / patch as often, and at
a crop's face, the way sliding-window prediction sees them). Crops are read straight from tensorstore,
all reads issued before any is waited on, normalised on the host (as the 2D stream).

The device sampler (`data.device_sampler3d`) cuts the same records from scans held in device
memory and gives the same batches.

A patch larger than a scan on any axis is refused at start, naming the scan (3D patches are not
mirrored out as 2D crops are: a 3D crop mostly mirrored would train on a made-up volume).
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from typing import Any, Iterator, Sequence

import numpy as np

from bonejax.core import errors
from bonejax.data import patches, store
from bonejax.data.prefetch import PrefetchedStream
from bonejax.io import intensity

FG_SAMPLES = 10_000  # foreground locations kept per class and scan (nnU-Net keeps 10,000)


def patch_shape(patch_size: int | Sequence[int]) -> tuple[int, int, int]:
  p = (int(patch_size),) * 3 if np.isscalar(patch_size) else tuple(int(v) for v in patch_size)
  if len(p) != 3 or min(p) < 1:
    raise errors.UserError(f"patch_size={patch_size} must be one positive side or three (D, H, W)")
  return p


def check_patch_fits(patch: Sequence[int], scans: Sequence[Any]) -> None:
  """One error line naming the first scan smaller than the 3D patch."""
  for s in scans:
    if any(p > n for p, n in zip(patch, s.shape)):
      raise errors.UserError(
          f"the 3D patch {'x'.join(map(str, patch))} is larger than scan {s.name!r} "
          f"({'x'.join(map(str, s.shape))} voxels): use a patch_size no larger than its "
          "smallest side")


def foreground_locations(labels: Any, num_classes: int, seed: int, slab: int = 64) -> np.ndarray:
  """(n, 3) int64 voxel coordinates of classes > 0: up to FG_SAMPLES per class, read slab by
  slab (reservoir-free: every slab keeps its share in proportion, then one seeded draw)."""
  rng = np.random.default_rng(seed)
  per_class: dict[int, list[np.ndarray]] = collections.defaultdict(list)
  z = int(labels.shape[0])
  for z0 in range(0, z, slab):
    lab = store.read_slab(labels, 0, z0, min(z0 + slab, z))
    for c in range(1, num_classes):
      idx = np.argwhere(lab == c)
      if len(idx):
        if len(idx) > FG_SAMPLES:
          idx = idx[rng.choice(len(idx), FG_SAMPLES, replace=False)]
        idx[:, 0] += z0
        per_class[c].append(idx)
  out = []
  for c in sorted(per_class):
    idx = np.concatenate(per_class[c])
    if len(idx) > FG_SAMPLES:
      idx = idx[np.sort(rng.choice(len(idx), FG_SAMPLES, replace=False))]
    out.append(idx)
  return np.concatenate(out).astype(np.int64) if out else np.zeros((0, 3), np.int64)


class PatchStream3d(PrefetchedStream):
  """`next(stream)` -> dict(image=float32 (L, D, H, W, 1) normalised, label=int32 (L, D, H, W)),
  L = global_batch_size // process_count."""

  def __init__(self, dataset_path, scans: Sequence[str], *, patch_size: int | Sequence[int],
               global_batch_size: int, patches_per_scan: int = 16, foreground: float = 1 / 3,
               seed: int = 0, normalization: str = "percentile",
               process_index: int | None = None, process_count: int | None = None,
               num_threads: int = 8, prefetch: int = 2, edge_margin: float | None = None):
    self.patch = patch_shape(patch_size)
    frac = patches.edge_margin_fraction(edge_margin)
    # Voxels per axis that uniform origins reach past each face (clamped back; floor, as 2D).
    self.edge_margin = tuple(int(p * frac) for p in self.patch)
    self.global_batch_size = int(global_batch_size)
    self.patches_per_scan = int(patches_per_scan)
    self.foreground = float(foreground)
    self.seed = int(seed)
    self.normalization = normalization
    if process_index is None or process_count is None:
      import jax  # pylint: disable=import-outside-toplevel  (only when not told)
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    self.process_index, self.process_count = int(process_index), int(process_count)
    if self.patches_per_scan < 1:
      raise errors.UserError(f"patches_per_scan={patches_per_scan} must be >= 1")
    if not 0.0 <= self.foreground <= 1.0:
      raise errors.UserError(f"foreground={foreground} must be in [0, 1]")
    if self.global_batch_size < 1 or self.global_batch_size % self.process_count:
      raise errors.UserError(f"global batch size {global_batch_size} is not a positive multiple "
                             f"of the {self.process_count} processes")
    self.local_batch_size = self.global_batch_size // self.process_count
    self.dataset, self.scans = patches._open_training_scans(  # pylint: disable=protected-access
        dataset_path, scans, normalization)
    self.classes = list(self.dataset.classes)
    for s in self.scans:
      if s.scan.labels is None:
        raise errors.UserError(f"training scan {s.name!r} has no labels")
    check_patch_fits(self.patch, self.scans)
    self.shapes = np.array([s.shape for s in self.scans], np.int64)
    self.fg = [foreground_locations(s.scan.labels, len(self.classes), self.seed + i)
               if self.foreground > 0 else np.zeros((0, 3), np.int64)
               for i, s in enumerate(self.scans)]
    self.records_per_epoch = len(self.scans) * self.patches_per_scan
    self._perm: dict[int, np.ndarray] = {}
    self.position = 0
    self._pool = concurrent.futures.ThreadPoolExecutor(max(1, int(num_threads)), "patch3d-read")
    self._producer = concurrent.futures.ThreadPoolExecutor(1, "patch3d-batch")
    self.prefetch = max(0, int(prefetch))
    self._pending: collections.deque = collections.deque()
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return -(-self.records_per_epoch // self.global_batch_size)

  @property
  def steps_per_epoch(self) -> int:
    return len(self)

  def _shuffled(self, positions: np.ndarray) -> np.ndarray:
    n = self.records_per_epoch
    epoch, index = np.divmod(positions, n)
    out = np.empty(positions.size, np.int64)
    for e in np.unique(epoch).tolist():
      perm = self._perm.get(e)
      if perm is None:  # a permutation per epoch, from the counter-based hash
        perm = np.argsort(patches._hash(self.seed, e, np.arange(n), 0x3D), kind="stable")
        self._perm = {k: v for k, v in self._perm.items() if k >= e - 1}
        self._perm[e] = perm
      sel = epoch == e
      out[sel] = perm[index[sel]]
    return out

  def records(self, positions: np.ndarray) -> np.ndarray:
    """(n, 4) int64 rows (scan, z, y, x origin) for stream positions."""
    positions = np.asarray(positions, np.int64)
    h = lambda *k: patches._hash(self.seed, *k)  # noqa: E731  pylint: disable=protected-access
    epoch = positions // self.records_per_epoch
    rec = self._shuffled(positions)
    si = rec // self.patches_per_scan
    hi = self.shapes[si] - np.array(self.patch)  # the largest origin per axis
    out = np.zeros((positions.size, 4), np.int64)
    out[:, 0] = si
    for d in range(3):  # pylint: disable=protected-access
      out[:, 1 + d] = patches._edge_origin(h(epoch, rec, d), self.shapes[si, d], self.patch[d],
                                           self.edge_margin[d])
    want_fg = (h(epoch, rec, 7) % np.uint64(1 << 20)).astype(np.float64) / (1 << 20) \
        < self.foreground
    for i in np.flatnonzero(want_fg):
      locs = self.fg[si[i]]
      if not len(locs):
        continue  # no foreground in this scan: a uniform crop
      c = locs[int(h(epoch[i], rec[i], 8) % np.uint64(len(locs)))]
      for d in range(3):  # a crop containing the voxel, the voxel anywhere in it
        lo = max(0, int(c[d]) - self.patch[d] + 1)
        top = min(int(c[d]), int(hi[i, d]))
        out[i, 1 + d] = int(patches._randint(h(epoch[i], rec[i], 9 + d), lo, top))
    return out

  def local_positions(self, batch_start: int) -> np.ndarray:
    start = batch_start + self.process_index * self.local_batch_size
    return np.arange(start, start + self.local_batch_size, dtype=np.int64)

  def read_batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    n = len(rows)
    image = np.empty((n,) + self.patch + (1,), np.float32)
    label = np.empty((n,) + self.patch, np.int32)
    futures = []
    for si, z, y, x in rows.tolist():
      s = self.scans[si]
      futures.append((store.read_box(s.scan.image, (z, y, x), self.patch),
                      store.read_box(s.scan.labels, (z, y, x), self.patch)))

    def finish(i: int) -> None:
      s = self.scans[int(rows[i, 0])]
      lab = patches._read(futures[i][1], s, "labels")  # pylint: disable=protected-access
      patches.check_labels(lab, s, self.classes)
      img = patches._read(futures[i][0], s, "image")  # pylint: disable=protected-access
      image[i, ..., 0] = intensity.normalize(img, s.norm, self.normalization)
      label[i] = lab

    list(self._pool.map(finish, range(n)))
    return {"image": image, "label": label}



def _axis_starts(n: int, p: int) -> list[int]:
  """Non-overlapping starts covering n, the last flush with the far side."""
  starts = list(range(0, max(n - p, 0) + 1, p))
  if starts[-1] + p < n:
    starts.append(n - p)
  return starts


def validation_crops(shape: Sequence[int], patch: Sequence[int]) -> list[tuple[int, int, int]]:
  """Origins of a fixed grid of crops covering the scan (the last one along each axis flush
  with the far side, so it may overlap its neighbour)."""
  axes = [_axis_starts(n, p) for n, p in zip(shape, patch)]
  return [(z, y, x) for z in axes[0] for y in axes[1] for x in axes[2]]


def _first_seen(n: int, p: int, start: int) -> np.ndarray:
  """(p,) 1 where no smaller start of the axis covers the voxel: a voxel is counted in the
  first crop of the grid holding it, which is the first along every axis (so separable)."""
  earlier = [s for s in _axis_starts(n, p) if s < start]
  covered = max((s + p for s in earlier), default=0)
  return (np.arange(start, start + p) >= covered).astype(np.float32)


def validation_batches_3d(dataset_path, scans: Sequence[str], *,
                          patch_size: int | Sequence[int], batch_size: int = 2,
                          normalization: str = "percentile", max_crops: int = 0,
                          ) -> Iterator[dict[str, np.ndarray]]:
  """A fixed validation set: a grid of `patch`^3 crops over each scan (every voxel seen; the
  voxels a flush last crop sees twice have mask 0 the second time). Yields dict(image (B, D, H,
  W, 1), label (B, D, H, W), mask (B, D, H, W)); the last batch is filled with mask-0 crops.
  `max_crops` > 0 keeps that many per scan, evenly spread (a cheaper estimate)."""
  patch = patch_shape(patch_size)
  batch_size = int(batch_size)
  if batch_size < 1:
    raise errors.UserError(f"validation batch_size={batch_size} must be positive")
  ds, infos = patches._open_training_scans(  # pylint: disable=protected-access
      dataset_path, scans, normalization)
  check_patch_fits(patch, infos)
  items = []
  for s in infos:
    if s.scan.labels is None:
      raise errors.UserError(f"validation scan {s.name!r} has no labels")
    crops = validation_crops(s.shape, patch)
    if max_crops and len(crops) > max_crops:
      crops = [crops[i] for i in np.linspace(0, len(crops) - 1, max_crops).round().astype(int)]
    for o in crops:
      if max_crops:
        mask = np.ones(patch, np.float32)
      else:
        mz, my, mx = (_first_seen(n, p, a) for n, p, a in zip(s.shape, patch, o))
        mask = mz[:, None, None] * my[None, :, None] * mx[None, None, :]
      items.append((s, o, mask))
  for b0 in range(0, len(items), batch_size):
    chunk = items[b0:b0 + batch_size]
    image = np.zeros((batch_size,) + patch + (1,), np.float32)
    label = np.zeros((batch_size,) + patch, np.int32)
    mask = np.zeros((batch_size,) + patch, np.float32)
    futures = [(store.read_box(s.scan.image, o, patch), store.read_box(s.scan.labels, o, patch))
               for s, o, _ in chunk]
    for i, ((s, _, m), (fi, fl)) in enumerate(zip(chunk, futures)):
      lab = patches._read(fl, s, "labels")  # pylint: disable=protected-access
      patches.check_labels(lab, s, ds.classes)
      image[i, ..., 0] = intensity.normalize(patches._read(fi, s, "image"), s.norm,  # noqa
                                             normalization)  # pylint: disable=W0212
      label[i], mask[i] = lab, m
    yield {"image": image, "label": label, "mask": mask}
