"""Predicting whole volumes: plane sets, multi-axis voting, in memory or out of core.

A *plane set* is one way of cutting the volume into 2D planes (BONe DLPred; Scaling the U-net):
- `planes=1`: the planes perpendicular to one axis (`axis` = 0 (Z), 1 (Y) or 2 (X));
- `planes=3`: the three orthogonal stacks;
- `planes=9`: those three plus, for a 45-degree rotation about each axis (bilinear, fill with
  the value that normalises to 0, about the centre, not cropped), the planes perpendicular to
  the two axes the rotation changed, with the probabilities rotated back (see bonejax.rotate);
- `planes=12`: the three stacks, each plane also seen rotated in-plane by 90, 180 and 270
  degrees (and its probabilities rotated back).
Each set gives a probability volume (Z, Y, X, K). `soft` voting averages them; `majority` takes
the most frequent per-set label, ties broken by the averaged probabilities.

The work is streamed in slabs of planes through one `PlaneEngine` (one compiled function per
plane shape): a reader thread fetches the next slab while the device computes, and a writer
thread adds the last slab's probabilities into the accumulator. When everything fits in
`memory_budget_gb` the volume and the accumulators are numpy arrays; otherwise they are
chunk-aligned zarr arrays in a scratch directory, read and written slab by slab (axis-1/2 slabs
span all of Z for a range of Y or X), so host memory stays near the budget whatever the volume
size. Both modes run the same slabs and batches, so they give identical labels.

Python API (for the demo, cross-validation and notebooks):
    probs = predict_planes(model, vol, stats=stats, planes=3)   # one (Z,Y,X,K) per plane set
    labels, mean = fuse(probs, "soft")                           # or "majority"
    labels = predict_volume(model, vol, stats=stats, planes=3, vote="soft")
    result = predict_scan("WORKDIR/model", "DATA/scan_000", output="pred.zarr")
`model` may be an nnx module or a prepared `PlaneEngine` (which keeps its compiled functions
across calls).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

import bonejax
from bonejax import cli, intensity, planes as planes_lib, rotate, store
from bonejax.planes import PlaneEngine

PLANES = (1, 3, 9, 12)
VOTES = ("soft", "majority")
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_BUDGET_GB = 4.0
SCRATCH_CHUNK = 32        # chunk edge of the out-of-core accumulators (shrunk for huge planes)
SLAB_FRACTION = 1 / 5     # of the host budget, per slab of planes (about two are in flight)
CACHE_FRACTION = 1 / 16   # of the host budget, per tensorstore chunk cache (input, scratch)
DEVICE_FRACTION_CPU = 1 / 4  # of the host budget for XLA's buffers when the device is the CPU
AXES = "zyx"


# ---------------------------------------------------------------------------------------------
# Plane sets and voting.
# ---------------------------------------------------------------------------------------------


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
    raise cli.UserError(f"planes={planes!r} must be one of {PLANES}") from None
  if planes not in PLANES:
    raise cli.UserError(f"planes={planes} must be one of {', '.join(map(str, PLANES))}")
  if planes != 1 and axis is not None:
    raise cli.UserError(f"axis={axis} only goes with planes=1 (got planes={planes})")
  if planes == 1:
    axis = 0 if axis is None else axis
    if axis not in (0, 1, 2):
      raise cli.UserError(f"axis={axis} must be 0 (Z), 1 (Y) or 2 (X)")
    return [PlaneSet(int(axis))]
  naive = [PlaneSet(a) for a in range(3)]
  if planes == 3:
    return naive
  if planes == 9:
    return naive + [PlaneSet(b, rot45=a) for a in range(3) for b in range(3) if b != a]
  return [PlaneSet(a, k90=k) for a in range(3) for k in range(4)]


def check_vote(vote: str) -> str:
  if vote not in VOTES:
    raise cli.UserError(f"vote={vote!r} must be one of {', '.join(VOTES)}")
  return vote


def majority_labels(counts: np.ndarray, probsum: np.ndarray) -> np.ndarray:
  """The most voted class; ties go to the highest (summed) probability, then the lowest class."""
  top = counts.max(axis=-1, keepdims=True)
  score = np.where(counts == top, probsum, -np.inf)
  return np.argmax(score, axis=-1).astype(np.uint8)


def _one_hot_argmax(probs: np.ndarray) -> np.ndarray:
  k = probs.shape[-1]
  return (np.argmax(probs, axis=-1)[..., None] == np.arange(k)).astype(np.uint8)


def fuse(probs: Sequence[np.ndarray], vote: str = "soft") -> tuple[np.ndarray, np.ndarray]:
  """Per-set probabilities (Z, Y, X, K) -> (uint8 labels, mean probabilities)."""
  check_vote(vote)
  if not probs:
    raise ValueError("fuse needs at least one probability volume")
  total = np.zeros_like(probs[0], dtype=np.float32)
  counts = np.zeros(probs[0].shape, np.uint8) if vote == "majority" else None
  for p in probs:
    total += p
    if counts is not None:
      counts += _one_hot_argmax(p)
  mean = total * np.float32(1.0 / len(probs))
  if vote == "soft":
    return np.argmax(total, axis=-1).astype(np.uint8), mean
  return majority_labels(counts, total), mean


# ---------------------------------------------------------------------------------------------
# Volumes in memory or on disk, read and written as slabs of planes.
# ---------------------------------------------------------------------------------------------


class _Vol:
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

  def add(self, axis: int, s0: int, planes: np.ndarray) -> None:
    data = np.moveaxis(planes, 0, axis)
    if not self.on_disk:
      self.arr[self._index(axis, s0, s0 + planes.shape[0])] += data
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
      cur += part
      pending.append(self.arr[idx].write(cur))
      if len(pending) > 1:
        pending.pop(0).result()
    for f in pending:
      f.result()


class _Acc:
  """An accumulator: the first contribution of a round is written, the others added."""

  def __init__(self, vol: _Vol):
    self.vol, self.first = vol, True

  def add(self, axis: int, s0: int, planes: np.ndarray) -> None:
    (self.vol.write if self.first else self.vol.add)(axis, s0, planes)


class _Fuser:
  """Sums the plane sets' probabilities (and, for majority voting, their one-hot labels)."""

  def __init__(self, probsum: _Vol, counts: _Vol | None):
    self.probs = _Acc(probsum)
    self.counts = _Acc(counts) if counts is not None else None
    self.n_sets = 0
    self.soft_only = counts is None  # sets may be summed before rotating back

  def begin(self) -> None:
    self.probs.first = self.n_sets == 0
    if self.counts is not None:
      self.counts.first = self.n_sets == 0

  def add(self, axis: int, s0: int, probs: np.ndarray) -> None:
    self.probs.add(axis, s0, probs)
    if self.counts is not None:
      self.counts.add(axis, s0, _one_hot_argmax(probs))

  def end(self, n: int = 1) -> None:
    self.n_sets += n


class _PerSet:
  """Keeps every plane set's probabilities apart (in memory): for `predict_planes`."""

  soft_only = False

  def __init__(self, shape: Sequence[int], k: int):
    self.shape, self.k, self.arrays = tuple(shape), k, []

  def begin(self) -> None:
    self.arrays.append(np.zeros(self.shape + (self.k,), np.float32))
    self._vol = _Vol(self.arrays[-1])

  def add(self, axis: int, s0: int, probs: np.ndarray) -> None:
    self._vol.write(axis, s0, probs)

  def end(self, n: int = 1) -> None:
    pass


_HEAP_TUNED = False


def _limit_heap_growth() -> None:
  """Makes glibc return large blocks to the OS as soon as they are freed.

  Slabs of planes are allocated and freed by three threads (reader, main, writer); glibc's
  default raises its mmap threshold after the first free, so later slabs come from per-thread
  arenas that fragment and the resident size creeps upwards over a long run (measured on a
  512x256x256 scan, 0.3 GB budget: peak RSS 733 MB without, 551 MB with a fixed 1 MiB
  threshold, for a 228 MB runtime). Process-wide, harmless; a no-op without glibc.
  """
  global _HEAP_TUNED
  if _HEAP_TUNED:
    return
  _HEAP_TUNED = True
  try:
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(ctypes.c_int(-3), ctypes.c_int(1 << 20))  # M_MMAP_THRESHOLD
  except (OSError, AttributeError):
    pass


def _context(cache_bytes: int) -> ts.Context:
  # Scratch and outputs are rewritten from scratch on failure: no fsync per chunk needed.
  return ts.Context({"cache_pool": {"total_bytes_limit": int(cache_bytes)},
                     "file_io_sync": False})


def _create_zarr(path: Path, shape: Sequence[int], dtype: Any, chunks: Sequence[int],
                 context: ts.Context, compress: bool) -> ts.TensorStore:
  """A zarr v3 array like store.create_array, but in a given (bounded-cache) context."""
  shape = [int(s) for s in shape]
  chunks = [max(1, min(int(c), s)) for c, s in zip(chunks, shape)] + shape[len(chunks):]
  codecs = [{"name": "bytes", "configuration": {"endian": "little"}}]
  if compress:
    codecs.append({"name": "zstd", "configuration": {"level": 1}})
  spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)},
          "metadata": {"shape": shape, "data_type": np.dtype(dtype).name,
                       "chunk_grid": {"name": "regular",
                                      "configuration": {"chunk_shape": chunks}},
                       "codecs": codecs, "fill_value": 0},
          "create": True, "delete_existing": True}
  return ts.open(spec, context=context).result()


def _create_scratch(path: Path, shape: Sequence[int], dtype: Any, chunk: int,
                    context: ts.Context) -> ts.TensorStore:
  """Uncompressed (probabilities do not compress; speed matters here), chunk^3 x channels."""
  return _create_zarr(path, shape, dtype, (chunk,) * 3, context, compress=False)


# ---------------------------------------------------------------------------------------------
# The run: slabs through the engine, with reader and writer threads.
# ---------------------------------------------------------------------------------------------


class _Runner:
  """Executes plane sets for one volume; owns the threads, the scratch space and progress."""

  def __init__(self, engine: PlaneEngine, src: _Vol, *, budget_bytes: int, out_of_core: bool,
               scratch_dir: Path | None, progress: cli.Progress | None):
    _limit_heap_growth()
    self.engine, self.src = engine, src
    self.budget = int(budget_bytes)
    self.out_of_core = out_of_core
    self.scratch_dir = scratch_dir
    self.progress = progress
    self.k = engine.num_classes
    self.fill = float(engine.offset)  # the raw value that normalises to 0: the rotation's fill
    self.check_finite = np.issubdtype(src.dtype, np.floating)
    biggest = max(math.prod(src.plane_shape(a)) for a in range(3))
    # Chunk edge of the scratch arrays, and the unit of slab thickness (aligned slabs avoid
    # partial-chunk rewrites): 32, or less when a slab that thick would not fit its budget.
    self.chunk = SCRATCH_CHUNK
    while self.chunk > 1 and self.chunk * biggest * self._plane_bytes(src) > self.slab_bytes:
      self.chunk //= 2
    self.context = _context(max(4 << 20, int(self.budget * CACHE_FRACTION)))
    self.reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bonejax-read")
    self.writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bonejax-write")
    self._scratch: list[Path] = []

  def close(self) -> None:
    self.reader.shutdown(wait=True)
    self.writer.shutdown(wait=True)
    for p in self._scratch:
      shutil.rmtree(p, ignore_errors=True)

  # -- arrays ----------------------------------------------------------------------------------

  @property
  def slab_bytes(self) -> int:
    return int(self.budget * SLAB_FRACTION)

  def _plane_bytes(self, vol: _Vol) -> int:
    """Host bytes per plane pixel in flight: raw planes and their probabilities."""
    return vol.channels * vol.dtype.itemsize + self.k * 4

  def array(self, name: str, shape3: Sequence[int], dtype: Any, channels: int | None) -> _Vol:
    shape = tuple(shape3) + ((channels,) if channels else ())
    if not self.out_of_core:
      return _Vol(np.zeros(shape, dtype))
    path = self.scratch_dir / f"{name}-{uuid.uuid4().hex[:6]}.zarr"
    self._scratch.append(path)
    return _Vol(_create_scratch(path, shape, dtype, self.chunk, self.context), path,
                piece=self.chunk)

  def free(self, vol: _Vol) -> None:
    if vol.path is not None:
      shutil.rmtree(vol.path, ignore_errors=True)
      self._scratch.remove(vol.path)

  # -- slabs -----------------------------------------------------------------------------------

  def slab_planes(self, vol: _Vol, axis: int, batch: int) -> int:
    """Planes per slab: a multiple of the chunk edge (and of the batch when that fits), about
    `slab_bytes` of raw planes and probabilities.

    Depends only on shapes and the budget (not on the mode), so in-memory and out-of-core runs
    make identical slabs and batches.
    """
    h, w = vol.plane_shape(axis)
    per_plane = h * w * self._plane_bytes(vol)
    unit = math.lcm(int(batch), self.chunk)
    if unit * per_plane > self.slab_bytes:
      unit = self.chunk  # the last batch of each slab is padded instead
    n = int(self.slab_bytes // max(per_plane, 1)) // unit * unit
    return max(unit, n)

  def _slabs(self, vol: _Vol, axis: int, slab: int, check: bool) -> Iterator:
    n = vol.shape[axis]
    if n == 0:
      return
    future = self.reader.submit(vol.read, axis, 0, min(slab, n))
    for s0 in range(0, n, slab):
      planes = future.result()
      if s0 + slab < n:
        future = self.reader.submit(vol.read, axis, s0 + slab, min(s0 + 2 * slab, n))
      if check and not np.isfinite(planes).all():
        raise cli.UserError(f"the image contains {'NaN' if np.isnan(planes).any() else 'Inf'} "
                            f"values (planes {s0}-{s0 + len(planes) - 1} along axis {axis})")
      yield s0, planes

  def _write_behind(self, writes: list, fn: Callable, *args) -> None:
    """One slab is written while the next is computed; never more (memory)."""
    while writes:
      writes.pop(0).result()
    writes.append(self.writer.submit(fn, *args))

  def run_planes(self, vol: _Vol, axis: int, k90: int, sink: Callable, check: bool) -> None:
    """Every plane of `vol` perpendicular to `axis` through the engine, into `sink`."""
    plan = self.engine.plan(vol.plane_shape(axis), vol.dtype, k90)
    slab = self.slab_planes(vol, axis, plan.batch)
    writes: list = []
    try:
      for s0, probs in self.engine.stream(self._slabs(vol, axis, slab, check), k90):
        self._write_behind(writes, sink, axis, s0, probs)
        if self.progress is not None:
          self.progress.update(len(probs))
    finally:
      for w in writes:
        w.result()

  def _rot_chunk(self, rot: rotate.Rotation, channels: int) -> int:
    """Planes per rotation call: a power of two with ~64 MiB of float32 samples in flight."""
    p2, q2 = rot.out_plane
    per = p2 * q2 * max(channels, self.k) * 4 * 6
    n = 1
    while n < 64 and 2 * n * per <= (64 << 20):
      n *= 2
    return n

  def _rotate_pass(self, src: _Vol, dst_add: Callable, rot: rotate.Rotation, fn: Callable,
                   out_plane: Sequence[int], channels: int) -> None:
    """Chunks of planes perpendicular to rot.axis: read, transform on the device, write."""
    chunk = self._rot_chunk(rot, channels)
    a = rot.axis
    writes: list = []
    try:
      for a0, part in self._slabs(src, a, chunk, check=False):
        m = part.shape[0]
        if m < chunk:
          part = np.concatenate([part, np.zeros((chunk - m,) + part.shape[1:], part.dtype)])
        out = np.asarray(fn(part))[:m]
        if src.rank == 3 and out.ndim == 4 and channels == 1 and out.shape[-1] == 1:
          out = out[..., 0]
        self._write_behind(writes, dst_add, a, a0, out)
    finally:
      for w in writes:
        w.result()

  # -- plane sets ------------------------------------------------------------------------------

  @staticmethod
  def order(sets: Sequence[PlaneSet]) -> list[PlaneSet]:
    """The order sets run in: the naive ones, then the rotated ones grouped by rotation."""
    rotations = sorted({ps.rot45 for ps in sets if ps.rot45 is not None})
    return ([ps for ps in sets if ps.rot45 is None]
            + [ps for a in rotations for ps in sets if ps.rot45 == a])

  def run(self, sets: Sequence[PlaneSet], sink) -> None:
    for ps in sets:
      if ps.rot45 is None:
        sink.begin()
        self.run_planes(self.src, ps.axis, ps.k90, sink.add, self.check_finite)
        sink.end()
    for a in sorted({ps.rot45 for ps in sets if ps.rot45 is not None}):
      self._run_rotated(a, [ps for ps in sets if ps.rot45 == a], sink)

  def _run_rotated(self, a: int, group: Sequence[PlaneSet], sink) -> None:
    src, c = self.src, self.src.channels
    rot = rotate.Rotation(a, src.shape)
    rvol = self.array("rotated", rot.rotated_shape, src.dtype, c if src.rank == 4 else None)
    fill = np.float32(self.fill)

    def forward(x):
      x = x if x.ndim == 4 else x[..., None]
      return rotate.rotate_chunk(x, fill, rot=rot)

    def backward(y):
      return rotate.unrotate_chunk(y, rot=rot)

    self._rotate_pass(src, rvol.write, rot, forward, rot.out_plane, c)
    rprobs = _Acc(self.array("rotated_probs", rot.rotated_shape, np.float32, self.k))
    share = sink.soft_only  # soft voting: sum both sets, rotate back once
    for i, ps in enumerate(group):
      rprobs.first = i == 0 or not share
      self.run_planes(rvol, ps.axis, ps.k90, rprobs.add, self.check_finite)
      if not share:
        sink.begin()
        self._rotate_pass(rprobs.vol, sink.add, rot, backward, rot.in_plane, self.k)
        sink.end()
    if share:
      sink.begin()
      self._rotate_pass(rprobs.vol, sink.add, rot, backward, rot.in_plane, self.k)
      sink.end(len(group))
    self.free(rvol)
    self.free(rprobs.vol)

  def total_planes(self, sets: Sequence[PlaneSet]) -> int:
    total = 0
    for ps in sets:
      shape = (self.src.shape if ps.rot45 is None
               else rotate.Rotation(ps.rot45, self.src.shape).rotated_shape)
      total += shape[ps.axis]
    return total


# ---------------------------------------------------------------------------------------------
# Memory planning.
# ---------------------------------------------------------------------------------------------


def resident_bytes(shape: Sequence[int], channels: int, itemsize: int, k: int,
                   sets: Sequence[PlaneSet], vote: str, per_set: bool = False,
                   volume_in_memory: bool = True) -> int:
  """Host bytes an in-memory run keeps for the whole run (volume, accumulators, rotations)."""
  v = math.prod(shape)
  total = v * channels * itemsize if volume_in_memory else 0
  total += v * k * 4 * (len(sets) if per_set else 1)
  total += v * k if vote == "majority" and not per_set else 0
  total += v  # the labels
  rot = 0
  for a in {ps.rot45 for ps in sets if ps.rot45 is not None}:
    rv = math.prod(rotate.Rotation(a, shape).rotated_shape)
    rot = max(rot, rv * (channels * itemsize + k * 4))
  return total + rot


def resident_limit(budget_bytes: int) -> int:
  """Host bytes in-memory arrays may take: the budget less two slabs in flight and, on CPU
  (where the device's buffers are host memory too), the device's share."""
  cpu = jax.devices()[0].platform == "cpu"
  return int(budget_bytes * (1 - 2 * SLAB_FRACTION - (DEVICE_FRACTION_CPU if cpu else 0)))


def device_budget_bytes(device_memory_gb: float | None, memory_budget_gb: float) -> int:
  """Device memory for one call: given, else 70 % of an accelerator's, else a quarter of the
  host budget on CPU."""
  if device_memory_gb:
    return int(float(device_memory_gb) * 2**30)
  dev = jax.devices()[0]
  if dev.platform != "cpu":
    try:
      limit = (dev.memory_stats() or {}).get("bytes_limit")
    except Exception:  # pylint: disable=broad-except
      limit = None
    if limit:
      return int(0.7 * limit)
  return int(float(memory_budget_gb) * 2**30 * DEVICE_FRACTION_CPU)


def make_engine(model: Any, *, in_channels: int = 1, batch_size: int = planes_lib.DEFAULT_BATCH,
                dtype: Any = None, memory_budget_gb: float = DEFAULT_BUDGET_GB,
                device_memory_gb: float | None = None, tile_size: int | None = None,
                tile_overlap: int | None = None, stride: int | None = None) -> PlaneEngine:
  """A PlaneEngine for `model` (returned as is if it already is one)."""
  if isinstance(model, PlaneEngine):
    return model
  if stride is None:
    try:
      from bonejax import models
      stride = int(getattr(models, "STRIDE", planes_lib.STRIDE))
    except ImportError:
      stride = planes_lib.STRIDE
  return PlaneEngine(model, in_channels=in_channels, batch_size=batch_size, dtype=dtype,
                     stride=stride,
                     device_budget_bytes=device_budget_bytes(device_memory_gb, memory_budget_gb),
                     tile_size=tile_size, tile_overlap=tile_overlap)


# ---------------------------------------------------------------------------------------------
# Python API.
# ---------------------------------------------------------------------------------------------


def _as_vol(volume: Any) -> _Vol:
  if isinstance(volume, store.Scan):
    volume = volume.image
  if isinstance(volume, _Vol):
    return volume
  if not isinstance(volume, ts.TensorStore):
    volume = np.asarray(volume)
  vol = _Vol(volume)
  if vol.rank not in (3, 4):
    raise cli.UserError(f"a volume is (Z, Y, X) or (Z, Y, X, C); got shape {tuple(volume.shape)}")
  return vol


def _stats_for(vol: _Vol, stats: dict[str, Any] | None) -> dict[str, Any]:
  if stats is not None:
    return stats
  acc = intensity.StatsAccumulator(vol.dtype, math.prod(vol.shape) * vol.channels)
  for z0 in range(0, vol.shape[0], 16):
    acc.update(vol.read(0, z0, min(z0 + 16, vol.shape[0])))
  return acc.finalize()


@contextlib.contextmanager
def _scratch(scratch_dir: str | os.PathLike | None, needed: bool) -> Iterator[Path | None]:
  if not needed:
    yield None
    return
  parent = Path(scratch_dir) if scratch_dir else Path(tempfile.gettempdir())
  parent.mkdir(parents=True, exist_ok=True)
  path = Path(tempfile.mkdtemp(prefix=".bonejax-predict-", dir=parent))
  try:
    yield path
  finally:
    shutil.rmtree(path, ignore_errors=True)


def _check_channels(vol: _Vol, engine: PlaneEngine) -> None:
  if vol.channels != engine.in_channels:
    raise cli.UserError(f"the volume has {vol.channels} channel(s) (shape "
                        f"{vol.shape + ((vol.channels,) if vol.rank == 4 else ())}); the model "
                        f"expects {engine.in_channels}")


def predict_planes(model: Any, volume: Any, *, stats: dict[str, Any] | None = None,
                   rule: str = "percentile", planes: int = 3, axis: int | None = None,
                   sets: Sequence[PlaneSet] | None = None,
                   memory_budget_gb: float = DEFAULT_BUDGET_GB,
                   progress: bool = False, **engine_kw) -> list[np.ndarray]:
  """Per-plane-set probabilities [(Z, Y, X, K) float32], in `plane_sets(planes, axis)` order.

  In memory (the demo's single-axis vs 3-plane tables). `engine_kw` go to `make_engine`.
  """
  vol = _as_vol(volume)
  sets = list(sets) if sets is not None else plane_sets(planes, axis)
  engine = make_engine(model, in_channels=vol.channels, memory_budget_gb=memory_budget_gb,
                       **engine_kw)
  _check_channels(vol, engine)
  engine.set_normalization(_stats_for(vol, stats), rule)
  sink = _PerSet(vol.shape, engine.num_classes)
  runner = _Runner(engine, vol, budget_bytes=int(memory_budget_gb * 2**30), out_of_core=False,
                   scratch_dir=None, progress=None)
  try:
    runner.progress = cli.Progress(total=runner.total_planes(sets), desc="predict",
                                   unit="planes") if progress else None
    runner.run(sets, sink)
  finally:
    runner.close()
  if runner.progress is not None:
    runner.progress.close()
  by_set = dict(zip(_Runner.order(sets), sink.arrays))
  return [by_set[ps] for ps in sets]


def axis_probabilities(model: Any, volume: Any, axis: int, **kw) -> np.ndarray:
  """One plane set's probabilities (Z, Y, X, K): the planes perpendicular to `axis`."""
  return predict_planes(model, volume, sets=[PlaneSet(int(axis))], **kw)[0]


@dataclasses.dataclass
class Prediction:
  labels: np.ndarray | None          # (Z, Y, X) uint8, when kept in memory
  probs: np.ndarray | None           # mean probabilities (Z, Y, X, K), when asked for
  info: dict[str, Any]


def _predict(engine: PlaneEngine, vol: _Vol, sets: Sequence[PlaneSet], vote: str, *,
             budget_bytes: int, out_of_core: bool, scratch_dir: Path | None,
             labels_out: Any = None, probs_out: Any = None, keep_labels: bool = True,
             keep_probs: bool = False, progress: bool = False) -> Prediction:
  """Runs the sets, fuses them and writes labels (and mean probabilities) slab by slab.

  `labels_out` / `probs_out` are tensorstores to fill (or None); labels are also returned in
  memory when `keep_labels`, mean probabilities when `keep_probs`.
  """
  start = time.perf_counter()
  runner = _Runner(engine, vol, budget_bytes=budget_bytes, out_of_core=out_of_core,
                   scratch_dir=scratch_dir, progress=None)
  k = engine.num_classes
  try:
    if progress:
      runner.progress = cli.Progress(total=runner.total_planes(sets), desc="predict",
                                     unit="planes")
    probsum = runner.array("probsum", vol.shape, np.float32, k)
    counts = runner.array("votes", vol.shape, np.uint8, k) if vote == "majority" else None
    fuser = _Fuser(probsum, counts)
    runner.run(sets, fuser)
    if runner.progress is not None:
      runner.progress.close()
    infer_s = time.perf_counter() - start
    labels = np.empty(vol.shape, np.uint8) if keep_labels else None
    probs = np.empty(vol.shape + (k,), np.float32) if keep_probs else None
    scale = np.float32(1.0 / fuser.n_sets)
    zs = runner.slab_planes(probsum, 0, 1)
    writes: list = []
    for z0 in range(0, vol.shape[0], zs):
      z1 = min(z0 + zs, vol.shape[0])
      ps = probsum.read(0, z0, z1)
      lab = (np.argmax(ps, axis=-1).astype(np.uint8) if counts is None
             else majority_labels(counts.read(0, z0, z1), ps))
      mean = ps * scale
      if labels is not None:
        labels[z0:z1] = lab
      if probs is not None:
        probs[z0:z1] = mean
      while len(writes) > 2:
        writes.pop(0).result()
      if labels_out is not None:
        writes.append(labels_out[z0:z1].write(lab))
      if probs_out is not None:
        writes.append(probs_out[z0:z1].write(mean))
    for w in writes:
      w.result()
  finally:
    runner.close()
  info = {"plane_sets": [ps.name for ps in sets], "mode": "out_of_core" if out_of_core
          else "in_memory", "infer_seconds": round(infer_s, 3),
          "planes_per_second": round(runner.total_planes(sets) / max(infer_s, 1e-9), 2),
          "plans": engine.describe(), "scratch_chunk": runner.chunk if out_of_core else None}
  return Prediction(labels, probs, info)


def predict_volume(model: Any, volume: Any, *, stats: dict[str, Any] | None = None,
                   rule: str = "percentile", planes: int = 3, axis: int | None = None,
                   vote: str = "soft", memory_budget_gb: float = DEFAULT_BUDGET_GB,
                   return_probs: bool = False, out_of_core: bool | None = None,
                   scratch_dir: str | os.PathLike | None = None, progress: bool = False,
                   return_info: bool = False, **engine_kw):
  """Labels (Z, Y, X) uint8 of a volume (numpy, tensorstore or Scan), voted over plane sets.

  Returns labels, or (labels, mean probabilities) with `return_probs` (and the run's info
  dict appended with `return_info`). Runs out of core (scratch zarr under `scratch_dir`, default
  the system temp dir) when the in-memory arrays would exceed `memory_budget_gb`, or when
  `out_of_core=True`. `engine_kw`: batch_size, dtype, device_memory_gb, tile_size, tile_overlap,
  stride (see `make_engine`).
  """
  check_vote(vote)
  sets = plane_sets(planes, axis)
  vol = _as_vol(volume)
  engine = make_engine(model, in_channels=vol.channels, memory_budget_gb=memory_budget_gb,
                       **engine_kw)
  _check_channels(vol, engine)
  if not vol.on_disk and np.issubdtype(vol.dtype, np.floating):
    intensity.validate_image(vol.arr)
  engine.set_normalization(_stats_for(vol, stats), rule)
  budget = int(memory_budget_gb * 2**30)
  if out_of_core is None:
    need = resident_bytes(vol.shape, vol.channels, vol.dtype.itemsize, engine.num_classes,
                          sets, vote, volume_in_memory=not vol.on_disk)
    out_of_core = need > resident_limit(budget)
  with _scratch(scratch_dir, out_of_core) as scratch:
    pred = _predict(engine, vol, sets, vote, budget_bytes=budget, out_of_core=out_of_core,
                    scratch_dir=scratch, keep_labels=True, keep_probs=return_probs,
                    progress=progress)
  out = (pred.labels, pred.probs) if return_probs else (pred.labels,)
  if return_info:
    out = out + (pred.info,)
  return out[0] if len(out) == 1 else out


# ---------------------------------------------------------------------------------------------
# Scans and files: what launch/predict.py runs.
# ---------------------------------------------------------------------------------------------


def _peek_shape(path: Path) -> tuple[int, ...] | None:
  """The raw array shape of an .npy / zarr array / TIFF, cheaply (None if unknown)."""
  try:
    if path.is_dir():
      meta = json.loads((path / "zarr.json").read_text())
      return tuple(meta["shape"]) if meta.get("node_type") == "array" else None
    if path.suffix.lower() == ".npy":
      return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
    if path.suffix.lower() in (".tif", ".tiff", ".btf", ".tf8"):
      import tifffile
      with tifffile.TiffFile(path) as tif:
        return tuple(tif.series[0].shape) if tif.series else None
  except Exception:  # pylint: disable=broad-except  # the real reader reports it properly
    return None
  return None


class _ChannelSource:
  """A (Z, Y, X, C) .npy or zarr array for multi-channel models (read along Z)."""

  def __init__(self, path: Path):
    from bonejax import volume_io
    self.path = path
    if path.is_dir():
      self._arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}},
                          open=True, read=True, context=store.context()).result()
      src_dtype = np.dtype(self._arr.dtype.numpy_dtype)
    else:
      self._arr = np.load(path, mmap_mode="r", allow_pickle=False)
      src_dtype = self._arr.dtype
    self.shape = tuple(int(s) for s in self._arr.shape)
    self.dtype = volume_io.image_dtype_for(src_dtype)

  def read_slab(self, z0: int, z1: int) -> np.ndarray:
    part = self._arr[z0:z1]
    part = part.read().result() if isinstance(part, ts.TensorStore) else np.asarray(part)
    return part.astype(self.dtype)

  def close(self) -> None:
    pass


def open_input(path: str | os.PathLike, in_channels: int = 1):
  """(source with .shape/.dtype/.read_slab, stored statistics or None, kind) for any input."""
  from bonejax import volume_io
  p = cli.require_exists(path, "input")
  if store.is_scan(p):
    scan = store.open_scan(p)
    if in_channels != 1:
      raise cli.UserError(f"scan {str(p)!r} has 1 channel; the model expects {in_channels}")
    return scan, scan.attrs.get("intensity"), "scan"
  shape = _peek_shape(p)
  if shape is not None:
    kept = [s for s in shape if s != 1]
    channels = shape[-1] if len(kept) >= 4 and shape[-1] != 1 else 1
    if len(kept) > 4:
      raise cli.UserError(f"input {str(p)!r} has shape {shape}: not a (Z, Y, X[, C]) volume")
    if channels != in_channels:
      raise cli.UserError(f"input {str(p)!r} has {channels} channel(s) (shape {shape}); the "
                          f"model expects in_channels={in_channels}")
    if channels > 1:
      if p.suffix.lower() in (".tif", ".tiff", ".btf", ".tf8"):
        raise cli.UserError(f"multi-channel TIFF {str(p)!r}: give a (Z, Y, X, C) .npy or zarr")
      return _ChannelSource(p), None, "channels"
  elif in_channels != 1:
    raise cli.UserError(f"input {str(p)!r} is not a (Z, Y, X, {in_channels}) .npy or zarr; "
                        f"the model expects {in_channels} channels")
  return volume_io.open_volume(p), None, "file"


_STATS_VOXELS = 1 << 22


def _load_source(source, stats: dict[str, Any] | None, *, out_of_core: bool,
                 scratch_dir: Path | None, budget_bytes: int, progress: bool):
  """Reads the input once: into memory, or (out of core) into a scratch zarr unless it is a scan
  already; computes intensity statistics on the way when none are stored. Returns (_Vol, stats).
  """
  if isinstance(source, store.Scan):
    # Reopened in a context whose chunk cache is bounded by the budget.
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(source.path / "image")}}
    arr = ts.open(spec, open=True, read=True,
                  context=_context(max(4 << 20, int(budget_bytes * CACHE_FRACTION)))).result()
    if out_of_core and stats is not None:
      return _Vol(arr), stats
    shape, dtype = tuple(arr.shape), np.dtype(arr.dtype.numpy_dtype)
    read = lambda z0, z1: arr[z0:z1].read().result()  # noqa: E731
  else:
    shape, dtype, read = tuple(source.shape), np.dtype(source.dtype), source.read_slab
  acc = intensity.StatsAccumulator(dtype, math.prod(shape)) if stats is None else None
  if out_of_core:
    target = _create_scratch(scratch_dir / "input.zarr", shape, dtype, SCRATCH_CHUNK,
                             _context(8 << 20))
  else:
    target = np.empty(shape, dtype)
  plane_bytes = math.prod(shape[1:]) * dtype.itemsize
  slab = max(1, min(64, int(budget_bytes * SLAB_FRACTION // max(plane_bytes, 1))))
  bar = cli.Progress(total=shape[0], desc="read", unit="slices") if progress else None
  pending = None
  for z0 in range(0, shape[0], slab):
    z1 = min(z0 + slab, shape[0])
    data = np.asarray(read(z0, z1))
    where = f"(slices {z0}-{z1 - 1})"
    try:
      if acc is not None:
        step = max(1, _STATS_VOXELS // max(1, math.prod(shape[1:])))
        for p0 in range(0, data.shape[0], step):
          acc.update(data[p0:p0 + step])
      else:
        intensity.validate_image(data)
    except cli.UserError as e:
      raise cli.UserError(f"{e} {where}") from None
    if out_of_core:
      if pending is not None:
        pending.result()
      pending = target[z0:z1].write(data)
    else:
      target[z0:z1] = data
    if bar is not None:
      bar.update(z1 - z0)
  if pending is not None:
    pending.result()
  if bar is not None:
    bar.close()
  return _Vol(target), (stats if stats is not None else acc.finalize())


def _output_kind(path: str | os.PathLike) -> str:
  suffix = Path(path).suffix.lower()
  if suffix in (".tif", ".tiff"):
    return "tiff"
  if suffix == ".zarr":
    return "zarr"
  raise cli.UserError(f"output {str(path)!r} must end in .zarr (zarr v3 labels) or .tif/.tiff")


def _find_bundle(path: str | os.PathLike) -> Path:
  from bonejax import bundle as bundle_lib
  p = Path(path)
  if not (p / bundle_lib.MODEL_JSON).exists() and (p / "model" / bundle_lib.MODEL_JSON).exists():
    p = p / "model"  # a training workdir
  return p


def predict_scan(model: Any, source: Any, *, output: str | os.PathLike | None = None,
                 save_probs: str | os.PathLike | None = None, planes: int = 3,
                 axis: int | None = None, vote: str = "soft", batch_size: int = 8,
                 memory_budget_gb: float = DEFAULT_BUDGET_GB,
                 device_memory_gb: float | None = None, dtype: str = "float32",
                 tile_size: int | None = None, tile_overlap: int | None = None,
                 out_of_core: bool | None = None, overwrite: bool = False,
                 progress: bool = True, keep_labels: bool | None = None) -> dict[str, Any]:
  """Predicts a scan or volume file with a model bundle; what `launch/predict.py` runs.

  `model`: a bundle directory (WORKDIR/model or WORKDIR) or a loaded `bundle.Bundle`.
  `source`: a scan directory, a .tif/.npy/zarr path (statistics computed while reading), or an
  opened `store.Scan`. Writes `output` (.zarr labels with attributes, or .tif) and `save_probs`
  (.zarr (Z, Y, X, K) float32 mean probabilities) atomically. Returns the result dict; with
  `keep_labels` (default: when no output is given) it also holds "labels" (numpy).
  """
  from bonejax import bundle as bundle_lib
  start = time.perf_counter()
  sets = plane_sets(planes, axis)
  check_vote(vote)
  if dtype not in DTYPES:
    raise cli.UserError(f"dtype={dtype!r} must be one of {', '.join(DTYPES)}")
  if not memory_budget_gb or memory_budget_gb <= 0:
    raise cli.UserError(f"memory_budget_gb={memory_budget_gb} must be positive")
  if int(batch_size) < 1:
    raise cli.UserError(f"batch_size={batch_size} must be positive")
  if output is not None:
    out_kind = _output_kind(output)
    cli.check_output(output, overwrite)
  if save_probs is not None:
    if Path(save_probs).suffix.lower() != ".zarr":
      raise cli.UserError(f"save_probs {str(save_probs)!r} must end in .zarr")
    cli.check_output(save_probs, overwrite)
  if output is not None and save_probs is not None and \
      Path(output).resolve() == Path(save_probs).resolve():
    raise cli.UserError("output and save_probs are the same path")

  # Bundle metadata first: a bad bundle fails before any data is read.
  if isinstance(model, bundle_lib.Bundle):
    meta, bundle_path = model.meta, None
  else:
    bundle_path = _find_bundle(model)
    meta = bundle_lib.read_meta(bundle_path)
  in_channels = int(meta.get("in_channels", 1))
  classes = list(meta["classes"])
  rule = str(meta.get("normalization", "percentile"))

  if isinstance(source, store.Scan):
    if in_channels != 1:
      raise cli.UserError(f"scan {source.name!r} has 1 channel; the model expects {in_channels}")
    src, stats, kind = source, source.attrs.get("intensity"), "scan"
  else:
    src, stats, kind = open_input(source, in_channels)
  shape = tuple(int(s) for s in src.shape)
  channels = shape[3] if len(shape) == 4 else 1
  itemsize = np.dtype(src.dtype).itemsize
  budget = int(float(memory_budget_gb) * 2**30)
  if out_of_core is None:
    need = resident_bytes(shape[:3], channels, itemsize, len(classes), sets, vote)
    out_of_core = need > resident_limit(budget)
  if keep_labels is None:
    keep_labels = output is None

  anchor = Path(output if output is not None else (save_probs or tempfile.gettempdir()))
  scratch_parent = anchor.parent if output is not None or save_probs is not None else anchor
  labels = None
  try:
    with _scratch(scratch_parent, out_of_core) as scratch:
      vol, stats = _load_source(src, stats, out_of_core=out_of_core, scratch_dir=scratch,
                                budget_bytes=budget, progress=progress)
      if isinstance(model, bundle_lib.Bundle):
        net, engine_dtype = model.model, (None if dtype == "float32" else dtype)
      else:
        net = bundle_lib.load_bundle(bundle_path, dtype=jnp.dtype(dtype).type).model
        engine_dtype = None
      engine = make_engine(net, in_channels=in_channels, batch_size=batch_size,
                           dtype=engine_dtype, memory_budget_gb=memory_budget_gb,
                           device_memory_gb=device_memory_gb, tile_size=tile_size,
                           tile_overlap=tile_overlap)
      if engine.num_classes != len(classes):
        raise cli.UserError(f"the model gives {engine.num_classes} classes but its bundle lists "
                            f"{len(classes)}")
      engine.set_normalization(stats, rule)
      attrs = {"model": str(bundle_path) if bundle_path else meta.get("model"),
               "architecture": meta.get("model"), "planes": int(planes),
               "plane_sets": [ps.name for ps in sets], "vote": vote, "classes": classes,
               "source": str(source) if not isinstance(source, store.Scan) else str(source.path),
               "bonejax_version": bonejax.__version__}
      out_ctx = _context(max(4 << 20, int(budget * CACHE_FRACTION / 2)))
      with contextlib.ExitStack() as stack:
        labels_out = probs_out = None
        out_tmp = probs_tmp = None
        if output is not None:
          out_tmp = stack.enter_context(cli.atomic_output(output, overwrite))
          if out_kind == "zarr":
            labels_out = _create_zarr(out_tmp, shape[:3], np.uint8, store.DEFAULT_CHUNKS,
                                      out_ctx, compress=True)
        if save_probs is not None:
          probs_tmp = stack.enter_context(cli.atomic_output(save_probs, overwrite))
          probs_out = _create_zarr(probs_tmp, shape[:3] + (len(classes),), np.float32,
                                   store.DEFAULT_CHUNKS, out_ctx, compress=True)
        want_memory = keep_labels or (output is not None and out_kind == "tiff"
                                      and not out_of_core)
        labels_ts = labels_out
        if output is not None and out_kind == "tiff" and out_of_core:
          labels_ts = _create_zarr(scratch / "labels.zarr", shape[:3], np.uint8,
                                   store.DEFAULT_CHUNKS, out_ctx, compress=True)
        pred = _predict(engine, vol, sets, vote, budget_bytes=budget, out_of_core=out_of_core,
                        scratch_dir=scratch, labels_out=labels_ts, probs_out=probs_out,
                        keep_labels=want_memory, keep_probs=False, progress=progress)
        labels = pred.labels
        if output is not None and out_kind == "zarr":
          store.set_array_attrs(out_tmp, attrs)
        if probs_out is not None:
          store.set_array_attrs(probs_tmp,
                                {**attrs, "content": "mean probabilities (Z, Y, X, K)"})
        if output is not None and out_kind == "tiff":
          from bonejax import volume_io
          volume_io.export_tiff(labels if labels is not None else labels_ts, out_tmp,
                                overwrite=True)
  finally:
    if hasattr(src, "close"):
      src.close()
  seconds = time.perf_counter() - start
  voxels = math.prod(shape[:3])
  result = {"output": str(output) if output is not None else None, "shape": list(shape[:3]),
            "seconds": round(seconds, 3), "voxels_per_second": round(voxels / seconds, 1),
            "planes": int(planes), "axis": sets[0].axis if int(planes) == 1 else None,
            "vote": vote, "classes": classes, "save_probs": str(save_probs) if save_probs else None,
            "dtype": dtype, "batch_size": int(batch_size), "memory_budget_gb": memory_budget_gb,
            "input_kind": kind, "device": str(jax.devices()[0].device_kind),
            **pred.info}
  if keep_labels:
    result["labels"] = labels
  return result
