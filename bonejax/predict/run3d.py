"""The run stage of a 3D bundle: sliding windows (`windows3d`) into the prediction's outputs, on
one process or several, on the input's grid or on the bundle's.

Several processes (`group`, as `hosts` describes for the plane sets): each finishes its own Z
range of the output (`hosts.share`: contiguous, whole chunks of the arrays it writes, so no chunk
has two writers), running every window that reaches it (`predict_volume_3d(z_range=...)`; the
halo windows at a boundary run on both sides). A voxel's weighted sum adds the same windows in
the same order whichever process finishes it, so the result is the single process's.

Resampled (the bundle records a voxel size the input's differs from: `plan.plan_scan` made
`job.model_src` the input on the bundle's grid and `job.regrid`): the windows run on the
bundle's grid and their blended probabilities are staged there (in memory, or a scratch zarr
when out of core or shared); then each Z slab of the input grid is interpolated back from the
staged probabilities (trilinear, `resample.Resampler`, the map the 2D predictor uses) and voted
(argmax) there, so the labels match the input voxel for voxel. With test-time flips the flip
votes are staged and mapped back alike (the uncertainty's disagreement channel). The slab is
sized by `core.memory_plan` from `resample.working_bytes`, within the host budget's slab share.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bonejax.core import memory_plan
from bonejax.core.distributed import Group
from bonejax.io import resample
from bonejax.predict import hosts, memory, windows3d
from bonejax.predict.volumes import create_scratch


@dataclasses.dataclass
class Run3d:
  labels: np.ndarray | None  # (Z, Y, X) uint8 on the input grid, when kept in memory
  summary: dict[str, Any]    # Prediction3d.summary() of this process's windows


def run(engine: windows3d.WindowEngine, volume: Any, stats: dict[str, Any],
        window_args: dict[str, Any], *, writers: Any, regrid: Any, out_of_core: bool,
        scratch: Path | None, group: Group, progress: Callable | None) -> Run3d:
  """Predicts `volume` (Z slabs: `read_slab`, on the model's grid) into `writers`' outputs
  (`writers.Writers`: labels_ts, probs_out, unc, want_memory); `regrid`: `resample.Regrid` back
  to the input grid, or None. Every process returns once all outputs are written."""
  shared = group.size > 1
  checked = _checking(group, progress) if shared else progress
  staged = (0 if regrid is None or out_of_core or shared else
            math.prod(regrid.model_shape[:3]) * engine.num_classes * 4
            * (2 if writers.unc is not None else 1))
  require_windows_fit(engine, volume.shape, window_args, writers.unc is not None, staged)
  if regrid is None:
    depth = int(volume.shape[0])
    lo, hi = hosts.share(depth, _unit(writers) if shared else 1, group)
    pred = None
    if hi > lo:
      pred = windows3d.predict_volume_3d(
          engine, volume, stats=stats, labels_out=writers.labels_ts,
          probs_out=writers.probs_out, uncertainty_out=writers.unc,
          keep_labels=writers.want_memory, progress=checked,
          z_range=(lo, hi) if shared else None, **window_args)
    group.barrier("outputs written")
    return Run3d(pred.labels if pred is not None else None, _summary(pred, engine))
  return _run_resampled(engine, volume, stats, window_args, writers=writers, regrid=regrid,
                        out_of_core=out_of_core, scratch=scratch, group=group,
                        progress=checked)


def require_windows_fit(engine: windows3d.WindowEngine, shape, window_args: dict[str, Any],
                        votes: bool, staged_bytes: int = 0) -> None:
  """Refuses (one line, before any allocation) a run whose smallest unit does not fit this
  machine: one window-deep Z group of accumulators (`windows3d.make_plan`; the budget sizes
  the groups but cannot go below one) and, resampled in memory, the staged probabilities."""
  plan = windows3d.make_plan(shape, window_args["window"], window_args["overlap"],
                             engine.stride, engine.num_classes, engine.in_channels,
                             window_args["batch_size"], engine.num_devices,
                             window_args["memory_budget_gb"], votes)
  memory_plan.require_fits(
      f"3D windows {'x'.join(map(str, plan.window))} over {tuple(plan.padded)} voxels"
      + (" (probabilities staged on the bundle's grid)" if staged_bytes else ""),
      plan.host_bytes + int(staged_bytes),
      hint="use a smaller predict window, crop or downsample the volume")


def _unit(writers: Any) -> int:
  """The Z chunk edge every output a process writes shares (no chunk gets two writers)."""
  return hosts.unit_of([writers.labels_ts, writers.probs_out])


def _checking(group: Group, progress: Callable | None) -> Callable:
  """The window progress, also stopping this process when another has failed or died."""
  def update(done: int, total: int) -> None:
    group.check("the 3D windows")
    if progress is not None:
      progress(done, total)
  return update


def _summary(pred: windows3d.Prediction3d | None, engine: windows3d.WindowEngine) -> dict:
  if pred is not None:
    return pred.summary()
  # A process whose share is empty (a scan of fewer chunks than processes) ran no window.
  return {"mode": "3d_windows", "windows": 0, "devices": engine.num_devices}


class _Staging:
  """The blended probabilities (and flip votes) on the model's grid, written by
  `predict_volume_3d` (as its probs_out / uncertainty_out) and read back slab by slab."""

  def __init__(self, shape3, k: int, votes: bool, *, on_disk: bool, scratch: Path | None,
               group: Group, context: Any):
    self.chunk = memory.SCRATCH_CHUNK
    self.nvote = 1
    self.probs = self._array("regrid-probs", shape3, k, on_disk, scratch, group, context)
    self.votes = (self._array("regrid-votes", shape3, k, on_disk, scratch, group, context)
                  if votes else None)

  def _array(self, name, shape3, k, on_disk, scratch, group, context):
    shape = tuple(int(s) for s in shape3) + (int(k),)
    if not on_disk:
      return np.zeros(shape, np.float32)
    path = scratch / f"{name}.zarr"
    make = lambda: create_scratch(path, shape, np.float32, self.chunk, context)  # noqa: E731
    return hosts.shared_array(group, path, make, context) if group.size > 1 else make()

  def add(self, z0: int, labels, mean, counts, n_votes: int) -> None:
    """The uncertainty writer's call: keeps the vote fractions (counts / n_votes)."""
    del labels, mean  # staged through probs_out; the labels are voted on the input grid
    self.nvote = int(n_votes)
    part = np.asarray(counts, np.float32) / np.float32(n_votes)
    if isinstance(self.votes, np.ndarray):
      self.votes[z0:z0 + part.shape[0]] = part
    else:
      self.votes[z0:z0 + part.shape[0]].write(part).result()

  @staticmethod
  def reader(arr) -> Callable[[int, int], np.ndarray]:
    if isinstance(arr, np.ndarray):
      return lambda a, b: arr[a:b]
    return lambda a, b: arr[a:b].read().result()


def back_slab_planes(model_shape, out_shape, k: int, votes: bool, budget_bytes: int) -> int:
  """Input-grid planes mapped back at a time: as many as the slab share of the host budget
  holds (`resample.working_bytes` per map, the labels and the written copies), at least one,
  which must fit the whole budget."""
  fixed, per = resample.working_bytes(tuple(model_shape[:3]) + (k,), tuple(out_shape[:3]) + (k,),
                                      4, 4)
  maps = 2 if votes else 1
  per_plane = maps * per + int(out_shape[1]) * int(out_shape[2]) * (1 + 4 * k * maps)
  memory_plan.require_fits(
      f"mapping the 3D probabilities from the bundle's grid {tuple(model_shape[:3])} back to "
      f"the input's {tuple(out_shape[:3])}", maps * fixed + per_plane, budget_bytes / 2**30,
      hint="crop or downsample the volume, or raise the budget")
  n = memory_plan.largest_fitting(per_plane, maps * fixed, int(out_shape[0]),
                                  int(budget_bytes * memory.SLAB_FRACTION))
  return max(1, n)


def _run_resampled(engine, volume, stats, window_args, *, writers, regrid, out_of_core, scratch,
                   group, progress) -> Run3d:
  shared, k = group.size > 1, engine.num_classes
  model_shape, out_shape = tuple(regrid.model_shape), tuple(regrid.out_shape)
  budget = int(float(window_args["memory_budget_gb"]) * 2**30)
  stage = _Staging(model_shape, k, writers.unc is not None, on_disk=out_of_core or shared,
                   scratch=scratch, group=group, context=memory.cache_context(budget))
  # This process's Z range of the model grid: whole chunks of the staging arrays.
  lo, hi = hosts.share(model_shape[0], stage.chunk, group)
  pred = None
  if hi > lo:
    pred = windows3d.predict_volume_3d(
        engine, volume, stats=stats, probs_out=stage.probs,
        uncertainty_out=stage if stage.votes is not None else None, keep_labels=False,
        progress=progress, z_range=(lo, hi), **window_args)
  group.barrier("3d staged")  # every share staged before any is read back
  stage.nvote = len(engine.flips)
  labels = np.zeros(out_shape, np.uint8) if writers.want_memory else None
  back = resample.Resampler(model_shape, out_shape, 1)
  read_probs = _Staging.reader(stage.probs)
  read_votes = _Staging.reader(stage.votes) if stage.votes is not None else None
  slab = back_slab_planes(model_shape, out_shape, k, read_votes is not None, budget)
  lo, hi = hosts.share(out_shape[0], _unit(writers) if shared else 1, group)
  for z0 in range(lo, hi, slab):
    z1 = min(z0 + slab, hi)
    group.check("mapping the 3D probabilities back")
    mean = back.read(read_probs, z0, z1, np.float32)
    lab = np.argmax(mean, axis=-1).astype(np.uint8)
    if labels is not None:
      labels[z0:z1] = lab
    if writers.labels_ts is not None:
      writers.labels_ts[z0:z1].write(lab).result()
    if writers.probs_out is not None:
      writers.probs_out[z0:z1].write(mean).result()
    if writers.unc is not None:
      counts = back.read(read_votes, z0, z1, np.float32) * np.float32(stage.nvote)
      writers.unc.add(z0, lab, mean, counts, stage.nvote)
  group.barrier("outputs written")
  return Run3d(labels, _summary(pred, engine))
