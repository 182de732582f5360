"""The run: every plane set of one volume through the engine, slab by slab, on three threads.

A reader thread fetches the next slab of planes while the device computes (`PlaneEngine.stream`
keeps batches in flight), and a writer thread adds the last slab's probabilities into a sink
(`volumes.Fuser` or `volumes.PerSet`). A 45-degree set first rotates the volume into a scratch
volume (on the device, chunk by chunk), runs its planes into a rotated accumulator and rotates
the probabilities back into the sink. Slab sizes depend only on shapes and the budget, never on
the mode, so in-memory and out-of-core runs make identical batches and give identical labels.

A 2.5D engine (`context_slices` = k) gets each plane with its 2k + 1 neighbours as channels: the
reader fetches every slab with k-plane halos (mirrored at the volume's ends, as training does:
bonejax.data.context) and stacks them, for every plane set, rotated ones included.

With several processes (`group`, see `hosts`), every array the run makes is a zarr array in the
shared scratch directory, every pass covers only this process's share of the planes (chunk
aligned, so no chunk has two writers), and the processes meet at a barrier after each pass,
since the next one reads what all of them wrote. A plane's probabilities do not depend on which
process or device computed it, nor on the batch it was in, so the result is the same.
"""

from __future__ import annotations

import concurrent.futures
import math
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from bonejax.core import errors
from bonejax.core.progress import Progress
from bonejax.data import context as context_lib
from bonejax.core.distributed import SINGLE, Group
from bonejax.predict import hosts, memory, rotate
from bonejax.predict.engine import PlaneEngine
from bonejax.predict.planesets import PlaneSet
from bonejax.predict.volumes import Accumulator, SlabVolume, create_scratch


class Runner:
  """Executes plane sets for one volume; owns the threads, the scratch arrays and progress."""

  def __init__(self, engine: PlaneEngine, src: SlabVolume, *, budget_bytes: int,
               out_of_core: bool, scratch_dir: Path | None,
               progress: Progress | None = None, group: Group = SINGLE):
    memory.limit_heap_growth()
    self.engine, self.src = engine, src
    self.budget = int(budget_bytes)
    self.group = group
    self.shared = group.size > 1
    self.out_of_core = out_of_core or self.shared  # shared accumulators live in files
    self.scratch_dir = scratch_dir
    self.progress = progress
    self.k = engine.num_classes
    self.check_finite = np.issubdtype(src.dtype, np.floating)
    biggest = max(math.prod(src.plane_shape(a)) for a in range(3))
    # Chunk edge of the scratch arrays, and the unit of slab thickness (aligned slabs avoid
    # partial-chunk rewrites): 32, or less when a slab that thick would not fit its budget.
    self.chunk = memory.SCRATCH_CHUNK
    while self.chunk > 1 and self.chunk * biggest * self._plane_bytes(
        src, engine.context_slices) > self.slab_bytes:
      self.chunk //= 2
    if self.shared:  # process 0's chunk edge (the budgets of the hosts may differ)
      self.chunk = int(group.broadcast_json("scratch chunk", self.chunk))
    self.context = memory.cache_context(self.budget)
    self.reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bonejax-read")
    self.writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bonejax-write")
    self._scratch: list[Path] = []
    self._made = 0

  def close(self) -> None:
    self.reader.shutdown(wait=True)
    self.writer.shutdown(wait=True)
    if self.group.is_main:  # shared scratch is process 0's to remove
      for p in self._scratch:
        shutil.rmtree(p, ignore_errors=True)

  def sync(self, name: str) -> None:
    """The end of a pass: every process's writes are done before anyone reads them."""
    self.group.barrier(name)

  def share(self, n: int) -> tuple[int, int]:
    """This process's planes [lo, hi) of a pass over `n` (whole chunks of the arrays)."""
    return hosts.share(n, self.chunk, self.group)

  # -- arrays ----------------------------------------------------------------------------------

  @property
  def slab_bytes(self) -> int:
    return int(self.budget * memory.SLAB_FRACTION)

  def _plane_bytes(self, vol: SlabVolume, context: int = 0) -> int:
    """Host bytes per plane pixel in flight: raw planes (with 2.5D context) and their
    probabilities."""
    return vol.channels * (2 * context + 1) * vol.dtype.itemsize + self.k * 4

  def array(self, name: str, shape3: Sequence[int], dtype: Any,
            channels: int | None) -> SlabVolume:
    """A zeroed volume for the run: numpy in memory, else a scratch zarr (removed on close)."""
    shape = tuple(shape3) + ((channels,) if channels else ())
    if not self.out_of_core:
      return SlabVolume(np.zeros(shape, dtype))
    self._made += 1
    # Shared: the same name in every process; process 0 creates it, the others open it.
    tag = str(self._made) if self.shared else uuid.uuid4().hex[:6]
    path = self.scratch_dir / f"{name}-{tag}.zarr"
    self._scratch.append(path)
    create = lambda: create_scratch(path, shape, dtype, self.chunk, self.context)  # noqa: E731
    arr = (hosts.shared_array(self.group, path, create, self.context) if self.shared
           else create())
    return SlabVolume(arr, path, piece=self.chunk)

  def free(self, vol: SlabVolume) -> None:
    """Removes a scratch array once no process needs it (after the pass's barrier)."""
    if vol.path is not None:
      if self.group.is_main:
        shutil.rmtree(vol.path, ignore_errors=True)
      self._scratch.remove(vol.path)

  # -- slabs -----------------------------------------------------------------------------------

  def slab_planes(self, vol: SlabVolume, axis: int, batch: int, context: int = 0) -> int:
    """Planes per slab: a multiple of the chunk edge (and of the batch when that fits), about
    `slab_bytes` of raw planes and probabilities.

    Depends only on shapes and the budget (not on the mode), so in-memory and out-of-core runs
    make identical slabs and batches.
    """
    h, w = vol.plane_shape(axis)
    per_plane = h * w * self._plane_bytes(vol, context)
    unit = math.lcm(int(batch), self.chunk)
    if unit * per_plane > self.slab_bytes:
      unit = self.chunk  # the last batch of each slab is padded instead
    n = int(self.slab_bytes // max(per_plane, 1)) // unit * unit
    return max(unit, n)

  def _slabs(self, vol: SlabVolume, axis: int, slab: int, check: bool,
             context: int = 0) -> Iterator:
    """This process's share of the planes along `axis`, `slab` at a time, read ahead; with
    `context` = k, each plane with its 2k + 1 neighbours as the last axis."""
    lo, n = self.share(vol.shape[axis])
    if n <= lo:
      return
    read = vol.read
    if context:
      def read(a, s0, s1):  # pylint: disable=function-redefined
        return context_lib.read_with_context(
            lambda p0, p1: _one_channel(vol.read(a, p0, p1)), vol.shape[a], s0, s1, context)
    future = self.reader.submit(read, axis, lo, min(lo + slab, n))
    for s0 in range(lo, n, slab):
      self.group.check(f"the planes along axis {axis}")  # another process failed: stop now
      planes = future.result()
      if s0 + slab < n:
        future = self.reader.submit(read, axis, s0 + slab, min(s0 + 2 * slab, n))
      if check and not np.isfinite(planes).all():
        raise errors.UserError(f"the image contains {'NaN' if np.isnan(planes).any() else 'Inf'} "
                            f"values (planes {s0}-{s0 + len(planes) - 1} along axis {axis})")
      yield s0, planes

  def _write_behind(self, writes: list, fn: Callable, *args) -> None:
    """One slab is written while the next is computed; never more (memory)."""
    while writes:
      writes.pop(0).result()
    writes.append(self.writer.submit(fn, *args))

  def run_planes(self, vol: SlabVolume, axis: int, k90: int, sink: Callable,
                 check: bool) -> None:
    """Every plane of `vol` perpendicular to `axis` through the engine, into `sink`."""
    plan = self.engine.plan(vol.plane_shape(axis), vol.dtype, k90)
    ctx = self.engine.context_slices
    slab = self.slab_planes(vol, axis, self.engine.global_batch(plan), ctx)
    writes: list = []
    try:
      for s0, probs in self.engine.stream(self._slabs(vol, axis, slab, check, ctx), k90):
        self._write_behind(writes, sink, axis, s0, probs)
        if self.progress is not None:
          self.progress.update(len(probs))
    finally:
      for w in writes:
        w.result()

  # -- rotations -------------------------------------------------------------------------------

  def _rot_chunk(self, rot: rotate.Rotation, channels: int) -> int:
    """Planes per rotation call: a power of two with ~64 MiB of float32 samples in flight."""
    p2, q2 = rot.out_plane
    per = p2 * q2 * max(channels, self.k) * 4 * 6
    n = 1
    while n < 64 and 2 * n * per <= (64 << 20):
      n *= 2
    return n

  def _rotate_pass(self, src: SlabVolume, dst_add: Callable, rot: rotate.Rotation,
                   fn: Callable, channels: int) -> None:
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

  def _run_rotated(self, a: int, members: Sequence[PlaneSet], sink) -> None:
    src, c = self.src, self.src.channels
    rot = rotate.Rotation(a, src.shape)
    rvol = self.array("rotated", rot.rotated_shape, src.dtype, c if src.rank == 4 else None)
    # New voxels show the model background, not the value that normalises to 0 (under z-score
    # that is the mean intensity: mid-grey corners).
    fill = np.float32(self.engine.background)

    def forward(x):
      x = x if x.ndim == 4 else x[..., None]
      return rotate.rotate_chunk(x, fill, rot=rot)

    def backward(y):
      return rotate.unrotate_chunk(y, rot=rot)

    self._rotate_pass(src, rvol.write, rot, forward, c)
    self.sync(f"rotated {rot.axis}")
    rprobs = Accumulator(self.array("rotated_probs", rot.rotated_shape, np.float32, self.k))
    share = sink.soft_only  # soft voting: sum both sets, rotate back once
    for i, ps in enumerate(members):
      rprobs.first = i == 0 or not share
      self.run_planes(rvol, ps.axis, ps.k90, rprobs.add, self.check_finite)
      self.sync(f"set {ps.name}")
      if not share:
        sink.begin()
        self._rotate_pass(rprobs.vol, sink.add, rot, backward, self.k)
        sink.end()
        self.sync(f"set {ps.name} back")
    if share:
      sink.begin()
      self._rotate_pass(rprobs.vol, sink.add, rot, backward, self.k)
      sink.end(len(members))
      self.sync(f"rotation {rot.axis} back")
    self.free(rvol)
    self.free(rprobs.vol)

  # -- plane sets ------------------------------------------------------------------------------

  def run(self, sets: Sequence[PlaneSet], sink) -> None:
    """Every set into `sink`, in `planesets.run_order(sets)`."""
    for ps in sets:
      if ps.rot45 is None:
        sink.begin(ps)
        self.run_planes(self.src, ps.axis, ps.k90, sink.add, self.check_finite)
        sink.end()
        self.sync(f"set {ps.name}")
    for a in sorted({ps.rot45 for ps in sets if ps.rot45 is not None}):
      self._run_rotated(a, [ps for ps in sets if ps.rot45 == a], sink)

  def total_planes(self, sets: Sequence[PlaneSet], mine: bool = False) -> int:
    """Planes the sets have (`mine`: only this process's shares of them)."""
    total = 0
    for ps in sets:
      shape = (self.src.shape if ps.rot45 is None
               else rotate.Rotation(ps.rot45, self.src.shape).rotated_shape)
      lo, hi = self.share(shape[ps.axis]) if mine else (0, shape[ps.axis])
      total += max(0, hi - lo)
    return total



def _one_channel(planes: np.ndarray) -> np.ndarray:
  """(n, H, W) of a one-channel volume's planes, stored (n, H, W) or (n, H, W, 1)."""
  return planes[..., 0] if planes.ndim == 4 else planes
