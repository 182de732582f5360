"""The training patch stream (validation batches: validation.py; label maps: label_maps.py).

Training records are (scan, axis, plane, crop origin): 2D patches cut from planes perpendicular
to any of the requested axes, so one 2D model learns all three viewing directions (what
multi-plane prediction votes over). With `context_slices` = k (2.5D, as BONe's DLFit trains), an
example is the 2k + 1 planes plane-k .. plane+k stacked as channels (context.py: mirrored back
into the volume at its ends, never an edge repeat), labelled by the centre plane; the predictor
stacks its planes by the same rule. One epoch enumerates, for every training scan, axis and
plane, `patches_per_plane` crops at random origins (new origins every epoch), plus optional
extra records from planes holding the rarest classes. Grain shuffles the record indices
(a fresh permutation every epoch, forever); whole batches are then read straight from
tensorstore: all crops' reads are issued together and waited on by a thread pool (as in
connectomics), never per-item multiprocessing. A background thread keeps `prefetch` batches in
flight while the device trains.

Everything a batch holds is a pure function of (seed, global record position, host): crop
origins come from a counter-based hash, not from a stateful RNG. So the iterator state is one
integer, `position` (records consumed by all hosts together), and restoring it gives exactly
the batches an uninterrupted run would have seen.

Multi-host: global batch b covers stream positions [b*G, (b+1)*G); host p reads the slice
[b*G + p*L, b*G + (p+1)*L) with L = G / process_count. The hosts' batches are disjoint and
together are the single-host global batch.

Sparse labels (dataset.json `"unlabelled": 255`, store.UNLABELLED): one pass over each
training scan's labels at start (label_map) finds, per axis, the planes holding labelled voxels
and, inside each, the 16 x 16 cells holding them. An epoch then enumerates only those planes,
and each crop is placed over one of the plane's labelled cells (a cell drawn uniformly, then an
origin among those whose crop contains it), so every crop on every axis holds labelled pixels.
A scan may mix fully and sparsely labelled regions: a fully labelled plane has every cell. The
labels travel as stored (255 included): the loss masks them (train/losses.py), validation masks
them and keeps only labelled planes, and class counts (oversample_rare) count labelled voxels.
A training or validation split without a labelled voxel, or a class without one in the training
split, is refused before training.

Edges: crop origins reach past the borders by `edge_margin` x patch (config.edge_margin, default
EDGE_MARGIN = 0.5) and are clamped back onto them (_edge_origin), so the planes' border rows and
columns are trained about a third as often as interior ones, where origins uniform inside the
plane (edge_margin 0) trained them 1/P as often: the cause of issue 28's worse border band
(benchmarks/edges.py). The device sampler cuts the same records, so it follows the same margin.

Choices worth knowing:
- Intensities are normalised on the host into float32 with the scan's stored statistics
  (intensity.normalize). It costs a few ms per batch on the host, keeps mixed-dtype datasets
  (uint8/uint16/float32 scans) on one code path, and keeps the device step free of per-scan
  parameters. Shipping uint16 plus (offset, scale) would halve host->device bytes; at
  32 x 256^2 x 4 B = 8 MiB per batch that is not the bottleneck.
- A scan smaller than the patch is padded by mirror reflection (no edge repeat), image and
  label alike. Constant padding would pair an artificial black border with the background
  label, teaching the model that "dark edge = background", which is wrong for bone cut by the
  field of view; the mirrored image keeps its own, correct labels.
- Reads are 2D boxes from 3D chunks (e.g. 64^3): a 256^2 plane crop touches 16 chunks. The
  shared tensorstore chunk cache (store.context) absorbs this for scans that fit it; for larger
  scans raise BONEJAX_CACHE_BYTES or store the scans with flatter chunks.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import sys
import threading
from typing import Any, Sequence

import grain
import numpy as np

from bonejax.core import errors
from bonejax.data import store
from bonejax.data.label_maps import (class_counts, class_projections, pick_rare_classes, _rare_planes_of_scan, LABEL_BLOCK, LabelMap, label_map, check_labelled)
from bonejax.io import intensity
from bonejax.data import shuffle
from bonejax.data.prefetch import PrefetchedStream
from bonejax.data.context import context_planes, reflect_index  # noqa: F401  (also patches.*)


_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
# Crop origins reach past each border by this fraction of the patch (config.edge_margin's
# default), clamped back onto the border (_edge_origin): border pixels are trained at the
# network's input edge as predicted.
EDGE_MARGIN = 0.5
_WHOLE_EPOCH_RECORDS = 1 << 22  # epochs up to this size keep their whole permutation (32 MiB)
_GRAIN_EPOCH_RECORDS = 4096     # smaller epochs walk ~2^16 / n cycles: grain's C++ is faster


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
  x = x.astype(np.uint64)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def _hash(*keys) -> np.ndarray:
  """A deterministic 64-bit hash of integer keys (scalars or arrays, broadcast)."""
  h = np.asarray(0x9E3779B97F4A7C15, np.uint64)
  with np.errstate(over="ignore"):
    for k in keys:
      h = _mix(h ^ _mix(np.asarray(k, np.int64).astype(np.uint64) + np.uint64(0x632BE59BD9B4E019)))
  return h


def _randint(h: np.ndarray, lo, hi) -> np.ndarray:
  """Integers uniform in [lo, hi] (inclusive) from hashes h."""
  lo = np.asarray(lo, np.int64)
  span = (np.asarray(hi, np.int64) - lo + 1).astype(np.uint64)
  return lo + (h % span).astype(np.int64)


def _plane_dims(axis: int) -> tuple[int, int]:
  return tuple(d for d in range(3) if d != axis)


@dataclasses.dataclass
class _ScanInfo:
  name: str
  scan: store.Scan
  shape: tuple[int, int, int]
  norm: dict[str, Any]


def _open_training_scans(dataset_path, scans: Sequence[str],
                         rule: str | None = None) -> tuple[store.Dataset, list[_ScanInfo]]:
  ds = store.open_dataset(dataset_path)
  if not scans:
    raise errors.UserError("no scans given for the patch stream")
  infos = []
  for name in scans:
    scan = ds.open_scan(name)
    stats = scan.stats
    if rule == "zscore_nonzero" and not intensity.has_stats(stats, rule):
      # A scan imported before the voxels > 0 statistics were stored: computed here (one pass).
      print(f"note: scan {name!r} has no voxels > 0 statistics (imported by an older "
            "bonejax); computing them now (re-import it to store them)", file=sys.stderr,
            flush=True)
      stats = intensity.nonzero_stats(
          stats, lambda z0, z1, scan=scan: store.read_slab(scan.image, 0, z0, z1), scan.shape[0])
    infos.append(_ScanInfo(name, scan, scan.shape, stats))
  return ds, infos


def _read(future, scan: _ScanInfo, what: str) -> np.ndarray:
  """A tensorstore read's result; a damaged chunk is bad input naming the scan, not a crash."""
  try:
    return future.result()
  except Exception as e:  # pylint: disable=broad-except  (tensorstore: ValueError, RuntimeError)
    text = errors.one_line(str(e).split(" [tensorstore_spec=")[0])[:300]
    raise errors.UserError(f"cannot read the {what} of scan {scan.name!r} ({scan.scan.path}): "
                        f"{text}") from None


def check_labels(labels: np.ndarray, scan: _ScanInfo, classes: Sequence[str],
                 unlabelled: int | None = None) -> None:
  """Refuses label values the model has no class for (they would train and score silently);
  the dataset's `unlabelled` value (sparse labels) is allowed: the loss ignores it."""
  top = int(labels.max()) if labels.size else 0
  if top >= len(classes) and unlabelled is not None:
    high = labels[(labels >= len(classes)) & (labels != unlabelled)]
    top = int(high.max()) if high.size else 0
  if top >= len(classes):
    also = f", unlabelled value {unlabelled}" if unlabelled is not None else ""
    raise errors.UserError(f"scan {scan.name!r} has label value {top}, but its dataset has "
                        f"{len(classes)} classes ({', '.join(classes)}{also}): fix the labels "
                        "or the dataset's classes")


def _check_rule(rule: str) -> None:
  if rule not in intensity.RULES:
    raise errors.UserError(f"unknown normalisation rule {rule!r} "
                        f"(known: {', '.join(intensity.RULES)})")


# ---------------------------------------------------------------------------------------------
# Rare-class planes.
# ---------------------------------------------------------------------------------------------


def edge_margin_fraction(edge_margin: float | None) -> float:
  """config.edge_margin checked: a fraction of the patch in [0, 1] (None: EDGE_MARGIN)."""
  frac = EDGE_MARGIN if edge_margin is None else edge_margin
  try:
    frac = float(frac)
  except (TypeError, ValueError):
    raise errors.UserError(f"edge_margin={edge_margin!r} must be a number (a fraction of the "
                           "patch)") from None
  if not 0.0 <= frac <= 1.0:  # NaN fails too
    raise errors.UserError(f"edge_margin={edge_margin!r} must be in [0, 1] (a fraction of the "
                           "patch; 0.5 by default)")
  return frac


def _edge_origin(h: np.ndarray, n: np.ndarray, pp: int, margin: int,
                 first: np.ndarray | None = None, last: np.ndarray | None = None) -> np.ndarray:
  """A crop origin along a side of n pixels: uniform over the origins inside the side (mirrored
  where it is shorter than the patch) widened by `margin` at both ends, then clamped back.

  The clamp puts the crops that would stick out at the border, so a border pixel is in about
  (margin + 1) / (patch + margin) as many crops as an interior pixel, instead of 1 / patch, and
  always at a crop's edge: the way prediction sees it (whole planes: the border at the network's
  input edge, the same zero padding of its convolutions). `first`/`last` (sparse labels) keep the crop over
  the pixels [first, last] (a labelled cell, shorter than the patch); clamping keeps that.
  """
  n = np.asarray(n, np.int64)
  lo, hi = np.minimum(0, n - pp), np.maximum(0, n - pp)
  a, b = lo - margin, hi + margin
  if first is not None:
    a, b = np.maximum(a, np.asarray(last, np.int64) - pp + 1), np.minimum(b, first)
  return np.clip(_randint(h, a, b), lo, hi)


# ---------------------------------------------------------------------------------------------
# The training stream.
# ---------------------------------------------------------------------------------------------


class PatchStream(PrefetchedStream):
  """Infinite, resumable, per-host-sharded stream of training batches.

  `next(stream)` -> dict(image=float32 (L, P, P, C) normalised, label=int32 (L, P, P)),
  L = global_batch_size // process_count, C = 2 * context_slices + 1 (1 for 2D).
  """

  def __init__(self, dataset_path, scans: Sequence[str], *, patch_size: int,
               global_batch_size: int, axes: Sequence[int] = (0, 1, 2),
               patches_per_plane: int = 4, oversample_rare: float = 0.0, seed: int = 0,
               normalization: str = "percentile", process_index: int | None = None,
               process_count: int | None = None, num_threads: int = 8, prefetch: int = 2,
               rare_classes: Sequence[int] | None = None, context_slices: int = 0,
               edge_margin: float | None = None):
    self.patch_size = int(patch_size)
    # self.edge_margin is in pixels; floor, as before the config key.
    self.edge_margin = int(self.patch_size * edge_margin_fraction(edge_margin))
    self.global_batch_size = int(global_batch_size)
    self.axes = tuple(int(a) for a in axes)
    self.patches_per_plane = int(patches_per_plane)
    self.oversample_rare = float(oversample_rare)
    self.seed = int(seed)
    self.normalization = normalization
    self.context_slices = int(context_slices)
    self.channels = 2 * self.context_slices + 1
    if process_index is None or process_count is None:
      import jax  # only when not told: keeps the data side importable without a backend
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    self.process_index, self.process_count = int(process_index), int(process_count)

    if self.patch_size < 1:
      raise errors.UserError(f"patch_size={patch_size} must be positive")
    if not self.axes or any(a not in (0, 1, 2) for a in self.axes) or \
        len(set(self.axes)) != len(self.axes):
      raise errors.UserError(f"axes={tuple(axes)} must be distinct values from 0, 1, 2")
    if self.patches_per_plane < 1:
      raise errors.UserError(f"patches_per_plane={patches_per_plane} must be >= 1")
    if self.context_slices < 0:
      raise errors.UserError(f"context_slices={context_slices} must be >= 0")
    if not 0.0 <= self.oversample_rare < 1.0:
      raise errors.UserError(f"oversample_rare={oversample_rare} must be in [0, 1)")
    if not 0 <= self.process_index < self.process_count:
      raise errors.UserError(f"process_index={process_index} not in [0, {process_count})")
    if self.global_batch_size < 1 or self.global_batch_size % self.process_count:
      raise errors.UserError(f"global batch size {global_batch_size} is not a positive multiple "
                          f"of the {self.process_count} processes")
    self.local_batch_size = self.global_batch_size // self.process_count
    _check_rule(normalization)

    self.dataset, self.scans = _open_training_scans(dataset_path, scans, normalization)
    self.classes = list(self.dataset.classes)
    for s in self.scans:
      if s.scan.labels is None:
        raise errors.UserError(f"training scan {s.name!r} has no labels")

    # Sparse labels: records only on planes holding labelled voxels, crops over a labelled cell.
    self.unlabelled = self.dataset.unlabelled
    self.label_maps: list[LabelMap] | None = None
    names = [s.name for s in self.scans]
    if self.unlabelled is not None:
      self.label_maps = [self._label_map(s) for s in self.scans]
      check_labelled([m.counts for m in self.label_maps], names, self.classes, "training")
    else:  # fully labelled: a class no training voxel has is refused all the same
      check_labelled([self._class_counts(s) for s in self.scans], names, self.classes,
                     "training")

    # Uniform records: one block of planes * patches_per_plane per (scan, axis); the planes are
    # all of the axis's (dense labels) or those holding labelled voxels (sparse labels).
    blocks = [(si, a, self._block_planes(si, a)) for si, s in enumerate(self.scans)
              for a in self.axes]
    self._sparse_tables([b[2] for b in blocks])
    blocks = [(si, a, len(planes)) for si, a, planes in blocks]
    self._blk_scan = np.array([b[0] for b in blocks], np.int64)
    self._blk_axis = np.array([b[1] for b in blocks], np.int64)
    sizes = np.array([b[2] * self.patches_per_plane for b in blocks], np.int64)
    self._blk_start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    self.uniform_records = int(sizes.sum())

    # Rare records: drawn from planes holding the rarest classes, crops overlapping them.
    self.rare_classes: list[int] = []
    self._rare = np.zeros((0, 7), np.int64)
    self.rare_records = 0
    if self.oversample_rare > 0:
      self._find_rare_planes(rare_classes)
      self.rare_records = int(round(self.oversample_rare / (1 - self.oversample_rare)
                                    * self.uniform_records))
    self.records_per_epoch = self.uniform_records + self.rare_records

    # Grain picks the indices: a fresh permutation of the epoch's records every epoch.
    self._shuffle_seed = int(_hash(self.seed, 0x5EED) % np.uint64(2**32))
    self._order = grain.MapDataset.range(self.records_per_epoch).shuffle(seed=self._shuffle_seed)
    n = self.records_per_epoch
    probe = np.array([0, n // 3, n - 1, n, 2 * n + n // 2], np.int64)
    self._fast_shuffle, self._epoch_perm = True, {}
    self._fast_shuffle = bool(np.array_equal(self._shuffled(probe),
                                             [self._order[int(p)] for p in probe]))

    self.position = 0  # records consumed by all hosts together
    self.num_threads = max(1, int(num_threads))
    self.prefetch = max(0, int(prefetch))
    self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads, "patch-read")
    self._producer = concurrent.futures.ThreadPoolExecutor(1, "patch-batch")
    self._pending: collections.deque = collections.deque()
    self._lock = threading.Lock()

  # -- set-up ---------------------------------------------------------------------------------

  def _label_map(self, s: _ScanInfo) -> LabelMap:
    try:
      return label_map(s.scan.labels, len(self.classes), self.unlabelled,
                       min(LABEL_BLOCK, self.patch_size))
    except Exception as e:  # pylint: disable=broad-except  (bad values, damaged chunks)
      text = errors.one_line(str(e).split(" [tensorstore_spec=")[0])[:300]
      raise errors.UserError(f"scan {s.name!r} ({s.scan.path}): {text} ({', '.join(self.classes)}"
                             f"; unlabelled {self.unlabelled})") from None

  def _class_counts(self, s: _ScanInfo) -> np.ndarray:
    try:
      return class_counts(s.scan.labels, len(self.classes))
    except Exception as e:  # pylint: disable=broad-except  (damaged chunks)
      text = errors.one_line(str(e).split(" [tensorstore_spec=")[0])[:300]
      raise errors.UserError(f"scan {s.name!r} ({s.scan.path}): {text}") from None

  def _block_planes(self, si: int, axis: int) -> np.ndarray:
    if self.label_maps is None:
      return np.arange(self.scans[si].shape[axis])
    return self.label_maps[si].planes(axis)

  def _sparse_tables(self, planes_per_block: list[np.ndarray]) -> None:
    """Flat tables for records(): every block's labelled planes (`_sp_planes`, from
    `_sp_plane_off[block]`), and every plane's labelled cells (`_sp_cells` (n, 2) rows
    `_sp_cell_start[k]` .. + `_sp_cell_count[k]`, k the plane's index in `_sp_planes`)."""
    self._sp_plane_off = np.zeros(len(planes_per_block), np.int64)
    if self.label_maps is None:
      return
    planes, starts, counts, cells, off, n_cells = [], [], [], [], 0, 0
    for bi, ((si, a), pl) in enumerate(zip(
        [(si, a) for si in range(len(self.scans)) for a in self.axes], planes_per_block)):
      self._sp_plane_off[bi] = off
      k, r, c = np.nonzero(self.label_maps[si].occupancy[a][pl])
      cnt = np.bincount(k, minlength=len(pl))
      planes.append(pl)
      counts.append(cnt)
      starts.append(n_cells + np.cumsum(cnt) - cnt)
      cells.append(np.stack([r, c], 1))
      off += len(pl)
      n_cells += len(k)
    self._sp_planes = np.concatenate(planes).astype(np.int64)
    self._sp_cell_start = np.concatenate(starts).astype(np.int64)
    self._sp_cell_count = np.concatenate(counts).astype(np.int64)
    self._sp_cells = np.concatenate(cells).astype(np.int64).reshape(-1, 2)

  def _find_rare_planes(self, rare_classes) -> None:
    nc = self.dataset.num_classes
    projections = []
    for s in self.scans:
      try:
        projections.append(class_projections(s.scan.labels, nc, unlabelled=self.unlabelled))
      except Exception as e:  # pylint: disable=broad-except  (bad values, damaged chunks)
        text = errors.one_line(str(e).split(" [tensorstore_spec=")[0])[:300]
        raise errors.UserError(f"scan {s.name!r} ({s.scan.path}): {text} ({', '.join(self.classes)})"
                            ) from None
    counts = sum(p[0] for p in projections)
    if rare_classes is None:
      rare = pick_rare_classes(counts)
    else:
      rare = [int(c) for c in rare_classes]
      bad = [c for c in rare if not 0 <= c < nc]
      if bad:
        raise errors.UserError(f"rare_classes {bad} not in [0, {nc})")
    self.rare_classes = rare
    rows = []
    for si, (_, zy, zx, yx) in enumerate(projections):
      sel = lambda m: m[rare].any(0)  # noqa: E731  union of the rare classes' masks
      for plane in _rare_planes_of_scan(sel(zy), sel(zx), sel(yx), self.axes):
        rows.append((si,) + plane)
    if not rows:
      raise errors.UserError(f"oversample_rare: no plane of the training scans holds any of the "
                          f"rare classes {rare}")
    self._rare = np.array(rows, np.int64)
    logging.info("patch stream: rare classes %s in %d planes", rare, len(rows))

  # -- records --------------------------------------------------------------------------------

  def __len__(self) -> int:
    """Global batches per epoch (rounded up)."""
    return -(-self.records_per_epoch // self.global_batch_size)

  @property
  def steps_per_epoch(self) -> int:
    return len(self)

  def records(self, positions: np.ndarray) -> np.ndarray:
    """(n, 5) int64 rows (scan, axis, plane, row origin, col origin) for stream positions."""
    positions = np.asarray(positions, np.int64)
    n = self.records_per_epoch
    epoch = positions // n
    rec = self._shuffled(positions)
    out = np.zeros((positions.size, 5), np.int64)
    pp = self.patch_size
    shapes = np.array([s.shape for s in self.scans], np.int64)

    uni = rec < self.uniform_records
    if uni.any():
      r = rec[uni]
      blk = np.searchsorted(self._blk_start, r, side="right") - 1
      si, ax = self._blk_scan[blk], self._blk_axis[blk]
      plane = (r - self._blk_start[blk]) // self.patches_per_plane
      rows_n, cols_n = self._plane_sizes(shapes[si], ax)
      e = epoch[uni]
      m = self.edge_margin
      if self.label_maps is None:
        oy = _edge_origin(_hash(self.seed, e, r, 0), rows_n, pp, m)
        ox = _edge_origin(_hash(self.seed, e, r, 1), cols_n, pp, m)
      else:  # a labelled cell of the plane, then a crop over it
        k = self._sp_plane_off[blk] + plane
        plane = self._sp_planes[k]
        cell = self._sp_cells[self._sp_cell_start[k] + (
            _hash(self.seed, e, r, 7) % self._sp_cell_count[k].astype(np.uint64)).astype(np.int64)]
        b = np.array([lm.block for lm in self.label_maps], np.int64)[si]
        y0, x0 = cell[:, 0] * b, cell[:, 1] * b
        oy = _edge_origin(_hash(self.seed, e, r, 0), rows_n, pp, m, y0,
                          np.minimum(y0 + b, rows_n) - 1)
        ox = _edge_origin(_hash(self.seed, e, r, 1), cols_n, pp, m, x0,
                          np.minimum(x0 + b, cols_n) - 1)
      out[uni] = np.stack([si, ax, plane, oy, ox], 1)

    rare = ~uni
    if rare.any():
      r, e = rec[rare], epoch[rare]
      row = self._rare[_randint(_hash(self.seed, e, r, 2), 0, len(self._rare) - 1)]
      si, ax, plane = row[:, 0], row[:, 1], row[:, 2]
      rows_n, cols_n = self._plane_sizes(shapes[si], ax)
      # A point of the plane's rare-class bounding box, then any crop that contains it.
      cy = _randint(_hash(self.seed, e, r, 3), row[:, 3], row[:, 4])
      cx = _randint(_hash(self.seed, e, r, 4), row[:, 5], row[:, 6])
      oy = _randint(_hash(self.seed, e, r, 5), np.maximum(cy - pp + 1, np.minimum(0, rows_n - pp)),
                    np.minimum(cy, np.maximum(0, rows_n - pp)))
      ox = _randint(_hash(self.seed, e, r, 6), np.maximum(cx - pp + 1, np.minimum(0, cols_n - pp)),
                    np.minimum(cx, np.maximum(0, cols_n - pp)))
      out[rare] = np.stack([si, ax, plane, oy, ox], 1)
    return out

  def _shuffled(self, positions: np.ndarray) -> np.ndarray:
    """self._order[p] for every p: grain's shuffle, computed for whole arrays by
    shuffle.index_shuffle (grain answers one index per call, the host's main cost per record);
    grain's own call if the two ever disagree (checked at start)."""
    positions = np.asarray(positions, np.int64)
    if not self._fast_shuffle:
      return np.array([self._order[int(p)] for p in positions], np.int64)
    n = self.records_per_epoch
    epoch, index = np.divmod(positions, n)
    out = np.empty(positions.size, np.int64)
    for e in np.unique(epoch).tolist():  # each epoch has its own seed, as in ShuffleMapDataset
      sel = epoch == e
      seed = (self._shuffle_seed + e) % 2**32
      if n > _WHOLE_EPOCH_RECORDS:
        out[sel] = shuffle.index_shuffle(index[sel], n - 1, seed).astype(np.int64)
        continue
      # Small epochs: the whole permutation once (cycle walking repeats most for small n).
      perm = self._epoch_perm.get(e)
      if perm is None and n < _GRAIN_EPOCH_RECORDS:  # many cycle-walking rounds: grain's loop
        perm = np.array([self._order[e * n + i] for i in range(n)], np.int64)
      elif perm is None:
        perm = shuffle.index_shuffle(np.arange(n), n - 1, seed).astype(np.int64)
        self._epoch_perm = {k: v for k, v in self._epoch_perm.items() if k >= e - 1}
        self._epoch_perm[e] = perm
      out[sel] = perm[index[sel]]
    return out

  @staticmethod
  def _plane_sizes(shapes: np.ndarray, axes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dims = np.array([_plane_dims(a) for a in range(3)], np.int64)[axes]
    idx = np.arange(len(axes))
    return shapes[idx, dims[:, 0]], shapes[idx, dims[:, 1]]

  def local_positions(self, batch_start: int) -> np.ndarray:
    start = batch_start + self.process_index * self.local_batch_size
    return np.arange(start, start + self.local_batch_size, dtype=np.int64)

  # -- reading --------------------------------------------------------------------------------

  def _crop_request(self, row):
    """Box to read, and the index maps that mirror it out to P x P (and, for 2.5D, pick the
    context planes along the axis: the box spans them, the map orders them)."""
    si, axis, plane, oy, ox = (int(v) for v in row)
    s = self.scans[si]
    d0, d1 = _plane_dims(axis)
    starts, sizes = [0, 0, 0], [0, 0, 0]
    planes = context_planes(plane, s.shape[axis], self.context_slices)
    starts[axis], sizes[axis] = int(planes.min()), int(planes.max() - planes.min()) + 1
    maps = [planes - int(planes.min())]
    for d, o in ((d0, oy), (d1, ox)):
      idx = reflect_index(np.arange(o, o + self.patch_size), s.shape[d])
      lo = int(idx.min())
      starts[d], sizes[d] = lo, int(idx.max()) - lo + 1
      identity = lo == o and sizes[d] == self.patch_size
      maps.append(None if identity else idx - lo)
    return s, axis, plane, starts, sizes, maps

  def read_batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Reads and normalises the crops of `rows` (from records()) as one batch."""
    n, pp = len(rows), self.patch_size
    image = np.empty((n, pp, pp, self.channels), np.float32)
    label = np.empty((n, pp, pp), np.int32)
    requests = [self._crop_request(r) for r in rows]

    def label_box(axis, plane, st, sz):  # the centre plane only
      st, sz = list(st), list(sz)
      st[axis], sz[axis] = plane, 1
      return st, sz

    # Issue every read before waiting on any: tensorstore overlaps the chunk I/O and decoding.
    futures = [(store.read_box(s.scan.image, st, sz),
                store.read_box(s.scan.labels, *label_box(a, p, st, sz)))
               for s, a, p, st, sz, _ in requests]

    def finish(i: int) -> None:
      s, axis, _, _, _, maps = requests[i]
      # (rows, cols, C): the context planes become the channels, in plane order.
      img = np.moveaxis(np.take(_read(futures[i][0], s, "image"), maps[0], axis), axis, -1)
      lab = _read(futures[i][1], s, "labels").squeeze(axis)
      check_labels(lab, s, self.classes, self.unlabelled)
      if maps[1] is not None:
        img, lab = img[maps[1]], lab[maps[1]]
      if maps[2] is not None:
        img, lab = img[:, maps[2]], lab[:, maps[2]]
      image[i] = intensity.normalize(img, s.norm, self.normalization)
      label[i] = lab

    list(self._pool.map(finish, range(n)))
    return {"image": image, "label": label}

  def set_state(self, state: dict[str, Any]) -> None:
    if int(state.get("records_per_epoch", self.records_per_epoch)) != self.records_per_epoch:
      logging.warning("patch stream: records_per_epoch changed since the checkpoint (%s -> %s); "
                      "resuming at the same position, but the batches differ from before",
                      state["records_per_epoch"], self.records_per_epoch)
    super().set_state(state)


# ---------------------------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------------------------


