"""The array API: a model and a volume in, per-set probabilities or voted labels out.

    engine = make_engine(model, batch_size=8)                    # compiled once, reused
    probs = predict_planes(engine, vol, stats=stats, planes=3)   # one (Z,Y,X,K) per plane set
    labels = predict_volume(engine, vol, stats=stats, planes=3, vote="soft")

`vol` is a numpy array, a tensorstore or a `store.Scan`, (Z, Y, X) or (Z, Y, X, C). `model` is
an nnx module, a `bundle.Bundle` or a prepared `PlaneEngine` (which keeps its compiled functions
across calls). `run_prediction` is the shared core of `predict_volume` and `scan.predict_scan`:
run the sets through a `Runner`, then vote slab by slab into labels (and mean probabilities).
A 2.5D model (a bundle's `context_slices` = k, or `context_slices=k` for a module) predicts a
plain 1-channel volume: the runner stacks each plane's 2k + 1 neighbours as its channels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from flax import nnx

from bonejax.core import errors
from bonejax.core.progress import Progress
from bonejax.data import store
from bonejax.io import intensity
from bonejax.core.distributed import SINGLE, Group
from bonejax.predict import hosts, memory
from bonejax.predict.engine import DEFAULT_BATCH, PlaneEngine
from bonejax.predict.planesets import (DEFAULT_FACE_TAPER, PlaneSet, check_face_taper, check_vote,
                                       plane_sets, run_order)
from bonejax.predict.runner import Runner
from bonejax.predict.volumes import Fuser, PerSet, SlabVolume, scratch_dir as make_scratch


# ---------------------------------------------------------------------------------------------
# Engines.
# ---------------------------------------------------------------------------------------------


def bundle_model(b: Any, dtype: Any = None) -> nnx.Module:
  """A bundle's model computing in `dtype`, built as `load_bundle(dtype=...)` builds it: the
  architecture from model.json in that dtype (its float32 stem and head kept), the weights
  of `b`. None, or the dtype it has: `b.model` itself."""
  from bonejax.models import bundle as bundle_lib
  own = getattr(b.model, "dtype", None)
  if dtype is None or (own is not None and jnp.dtype(own) == jnp.dtype(dtype)):
    return b.model
  abstract = nnx.eval_shape(lambda: bundle_lib.build_model(b.meta, jnp.dtype(dtype).type))
  graphdef, _ = nnx.split(abstract)
  model = nnx.merge(graphdef, nnx.state(b.model))
  model.eval()
  return model


def local_devices(devices: Any = None) -> list:
  """This process's devices to predict on: all (None), the first `devices` (an int), or the
  given list. A count below 1 or above what this process has is bad input."""
  import jax
  local = jax.local_devices()
  if devices is None:
    return local
  if isinstance(devices, (int, np.integer, str)):
    try:
      n = int(devices)
    except ValueError:
      raise errors.UserError(f"devices={devices!r} is not a number of devices") from None
    if n < 1:
      raise errors.UserError(f"devices={n} must be at least 1")
    if n > len(local):
      raise errors.UserError(f"devices={n} but this process has only {len(local)} "
                          f"{local[0].platform} device(s)")
    return local[:n]
  return list(devices)


def make_engine(model: Any, *, in_channels: int | None = None,
                context_slices: int | None = None, batch_size: int = DEFAULT_BATCH,
                dtype: Any = None, memory_budget_gb: float = memory.DEFAULT_BUDGET_GB,
                device_memory_gb: float | None = None, tile_size: int | None = None,
                tile_overlap: int | None = None, stride: int | None = None,
                devices: Any = None, graph: str = "auto") -> PlaneEngine:
  """A PlaneEngine for `model` (returned as is if it already is one).

  A `bundle.Bundle` with a `dtype` is rebuilt in that dtype from its model.json (see
  `bundle_model`), so it predicts exactly as the bundle loaded with `load_bundle(dtype=...)`.
  `devices`: how many of this process's devices (default all), or a list of them; every
  batch is spread over them, `batch_size` planes on each. `graph`: the inference graph's
  convolution policy, or "off" for the model as it is (`engine.GRAPHS`).
  `in_channels`: channels per voxel of the volumes to predict (default: a bundle's, else 1);
  `context_slices`: 2.5D planes each side (default: a bundle's, else 0). The model takes
  in_channels x (2 * context_slices + 1) channels.
  """
  if isinstance(model, PlaneEngine):
    return model
  devices = local_devices(devices)
  if not isinstance(model, nnx.Module):
    from bonejax.models import bundle as bundle_lib
    if isinstance(model, bundle_lib.Bundle):
      if context_slices is None:
        context_slices = model.context_slices
      if in_channels is None:
        in_channels = model.in_channels // (2 * int(context_slices) + 1)
      model, dtype = bundle_model(model, dtype), None
  context_slices = int(context_slices or 0)
  in_channels = 1 if in_channels is None else int(in_channels)
  if stride is None:
    from bonejax import models
    stride = models.STRIDE
  return PlaneEngine(model, in_channels=in_channels * (2 * context_slices + 1),
                     context_slices=context_slices, batch_size=batch_size, dtype=dtype,
                     stride=stride,
                     device_budget_bytes=memory.device_budget_bytes(device_memory_gb,
                                                                    memory_budget_gb, devices),
                     tile_size=tile_size, tile_overlap=tile_overlap, devices=devices,
                     graph=graph)


# ---------------------------------------------------------------------------------------------
# Volumes and statistics.
# ---------------------------------------------------------------------------------------------


def as_volume(volume: Any) -> SlabVolume:
  """A numpy array, tensorstore, `store.Scan` or SlabVolume as a SlabVolume (3D or 4D)."""
  if isinstance(volume, store.Scan):
    volume = volume.image
  if isinstance(volume, SlabVolume):
    return volume
  if not isinstance(volume, ts.TensorStore):
    volume = np.asarray(volume)
  vol = SlabVolume(volume)
  if vol.rank not in (3, 4):
    raise errors.UserError(f"a volume is (Z, Y, X) or (Z, Y, X, C); got shape {tuple(volume.shape)}")
  return vol


def stats_for(vol: SlabVolume, stats: dict[str, Any] | None) -> dict[str, Any]:
  """`stats`, or the volume's intensity statistics computed slab by slab."""
  if stats is not None:
    return stats
  acc = intensity.StatsAccumulator(vol.dtype, math.prod(vol.shape) * vol.channels)
  for z0 in range(0, vol.shape[0], 16):
    acc.update(vol.read(0, z0, min(z0 + 16, vol.shape[0])))
  return acc.finalize()


def check_channels(vol: SlabVolume, engine: PlaneEngine) -> None:
  k = engine.context_slices
  if vol.channels * (2 * k + 1) != engine.in_channels or (k and vol.channels != 1):
    shape = vol.shape + ((vol.channels,) if vol.rank == 4 else ())
    want = (f"a 1-channel volume (a 2.5D model of {2 * k + 1} planes)" if k
            else f"{engine.in_channels}")
    raise errors.UserError(f"the volume has {vol.channels} channel(s) (shape {shape}); the model "
                        f"expects {want}")


# ---------------------------------------------------------------------------------------------
# Per-set probabilities.
# ---------------------------------------------------------------------------------------------


def predict_planes(model: Any, volume: Any, *, stats: dict[str, Any] | None = None,
                   rule: str = "percentile", planes: int = 3, axis: int | None = None,
                   sets: Sequence[PlaneSet] | None = None,
                   memory_budget_gb: float = memory.DEFAULT_BUDGET_GB,
                   progress: bool = False, **engine_kw) -> list[np.ndarray]:
  """Per-plane-set probabilities [(Z, Y, X, K) float32], in `plane_sets(planes, axis)` order.

  In memory (the demo's single-axis vs 3-plane tables). `engine_kw` go to `make_engine`.
  """
  vol = as_volume(volume)
  sets = list(sets) if sets is not None else plane_sets(planes, axis)
  engine = make_engine(model, in_channels=vol.channels, memory_budget_gb=memory_budget_gb,
                       **engine_kw)
  check_channels(vol, engine)
  engine.set_normalization(stats_for(vol, stats), rule)
  sink = PerSet(vol.shape, engine.num_classes)
  runner = Runner(engine, vol, budget_bytes=int(memory_budget_gb * 2**30), out_of_core=False,
                  scratch_dir=None)
  try:
    runner.progress = Progress(total=runner.total_planes(sets), desc="predict",
                                   unit="planes") if progress else None
    runner.run(sets, sink)
  finally:
    runner.close()
  if runner.progress is not None:
    runner.progress.close()
  by_set = dict(zip(run_order(sets), sink.arrays))
  return [by_set[ps] for ps in sets]


def axis_probabilities(model: Any, volume: Any, axis: int, **kw) -> np.ndarray:
  """One plane set's probabilities (Z, Y, X, K): the planes perpendicular to `axis`."""
  return predict_planes(model, volume, sets=[PlaneSet(int(axis))], **kw)[0]


# ---------------------------------------------------------------------------------------------
# Voted labels.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Prediction:
  labels: np.ndarray | None          # (Z, Y, X) uint8, when kept in memory
  probs: np.ndarray | None           # mean probabilities (Z, Y, X, K), when asked for
  info: dict[str, Any]


def run_prediction(engine: PlaneEngine, vol: SlabVolume, sets: Sequence[PlaneSet], vote: str, *,
                   budget_bytes: int, out_of_core: bool, scratch_dir: Path | None,
                   labels_out: Any = None, probs_out: Any = None, keep_labels: bool = True,
                   keep_probs: bool = False, progress: bool | Progress = False,
                   uncertainty_out: Any = None, regrid: Any = None,
                   group: Group = SINGLE, face_taper: int = DEFAULT_FACE_TAPER) -> Prediction:
  """Runs the sets, fuses them and writes labels (and mean probabilities) slab by slab.

  `labels_out` / `probs_out` are tensorstores to fill (or None); labels are also returned in
  memory when `keep_labels`, mean probabilities when `keep_probs`. `uncertainty_out`
  (`uncertainty.UncertaintyWriter`) gets every voted slab. `regrid` (`resample.Regrid`): `vol`
  is the input resampled to the model's voxel size; each set's probabilities are mapped back to
  the input grid (`regrid.out_shape`) before the vote. With several processes (`group`), each
  writes its share of the outputs (whole chunks of them), nothing is kept in memory, and every
  process returns once all outputs are written everywhere. `face_taper`: voxels over which a
  set's soft-vote weight rises from a face its planes cut (`planesets.face_weights`; 0: off).
  """
  face_taper = check_face_taper(face_taper)
  if group.size > 1 and (keep_labels or keep_probs):
    raise ValueError("with several processes the labels go to labels_out, not to memory")
  if group.size > 1 and uncertainty_out is not None:
    raise errors.UserError("--save_uncertainty is not supported with several processes yet "
                        "(its slice ranking needs the whole volume): run it on one host")
  start = time.perf_counter()
  runner = Runner(engine, vol, budget_bytes=budget_bytes, out_of_core=out_of_core,
                  scratch_dir=scratch_dir, group=group)
  k = engine.num_classes
  shape = tuple(regrid.out_shape) if regrid is not None else vol.shape
  try:
    if progress:
      # A caller's own Progress (a GUI's bar; its update may raise to cancel), else a line.
      runner.progress = progress if isinstance(progress, Progress) else Progress(
          desc="predict", unit="planes")
      runner.progress.total = runner.total_planes(sets, mine=True)
    fuser = Fuser.create(runner.array, shape, k, vote, keep_counts=uncertainty_out is not None,
                         face_taper=face_taper)
    runner.run(sets, fuser if regrid is None else regrid.sink(fuser, runner))
    if runner.progress is not None:
      runner.progress.close()
    infer_s = time.perf_counter() - start
    labels = np.empty(shape, np.uint8) if keep_labels else None
    probs = np.empty(shape + (k,), np.float32) if keep_probs else None
    # Each process votes whole output chunks of its own; one process votes everything.
    unit = hosts.unit_of([labels_out, probs_out]) if group.size > 1 else 1
    lo, hi = hosts.share(shape[0], unit, group)
    zs = runner.slab_planes(fuser.probs.vol, 0, unit)
    writes: list = []
    try:
      for z0 in range(lo, hi, zs):
        z1 = min(z0 + zs, hi)
        group.check("the vote")
        lab, mean, counts = fuser.decide(z0, z1)
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
        if uncertainty_out is not None:
          uncertainty_out.add(z0, lab, mean, counts, fuser.n_sets)
    except BaseException:
      # No write may still be in flight when the temporaries are removed after this.
      for w in writes:
        with contextlib.suppress(Exception):
          w.result()
      raise
    for w in writes:
      w.result()
    group.barrier("outputs written")
  finally:
    runner.close()
  info = {"plane_sets": [ps.name for ps in sets], "mode": "out_of_core" if out_of_core
          else "in_memory", "infer_seconds": round(infer_s, 3),
          "face_taper": face_taper,
          "planes_per_second": round(runner.total_planes(sets, mine=True) / max(infer_s, 1e-9),
                                     2),
          "plans": engine.describe(), "device_peak_mb": memory.device_peak_mb(engine.devices),
          "scratch_chunk": runner.chunk if runner.out_of_core else None}
  return Prediction(labels, probs, info)


def predict_volume(model: Any, volume: Any, *, stats: dict[str, Any] | None = None,
                   rule: str = "percentile", planes: int = 3, axis: int | None = None,
                   vote: str = "soft", memory_budget_gb: float = memory.DEFAULT_BUDGET_GB,
                   return_probs: bool = False, out_of_core: bool | None = None,
                   scratch_dir: str | os.PathLike | None = None, progress: bool = False,
                   return_info: bool = False, face_taper: int = DEFAULT_FACE_TAPER,
                   **engine_kw):
  """Labels (Z, Y, X) uint8 of a volume (numpy, tensorstore or Scan), voted over plane sets.

  Returns labels, or (labels, mean probabilities) with `return_probs` (and the run's info
  dict appended with `return_info`). Runs out of core (scratch zarr under `scratch_dir`, default
  the system temp dir) when the in-memory arrays would exceed `memory_budget_gb`, or when
  `out_of_core=True`. `progress`: True (a stderr line) or a `Progress` to update.
  `engine_kw`: batch_size, dtype, device_memory_gb, tile_size, tile_overlap, stride, devices
  (see `make_engine`; default: every batch spread over all local devices).
  """
  check_vote(vote)
  sets = plane_sets(planes, axis)
  vol = as_volume(volume)
  engine = make_engine(model, in_channels=vol.channels, memory_budget_gb=memory_budget_gb,
                       **engine_kw)
  check_channels(vol, engine)
  if not vol.on_disk and np.issubdtype(vol.dtype, np.floating):
    intensity.validate_image(vol.arr)
  engine.set_normalization(stats_for(vol, stats), rule)
  budget = int(memory_budget_gb * 2**30)
  if out_of_core is None:
    need = memory.resident_bytes(vol.shape, vol.channels, vol.dtype.itemsize,
                                 engine.num_classes, sets, vote,
                                 volume_in_memory=not vol.on_disk, keep_probs=return_probs)
    out_of_core = need > memory.resident_limit(budget)
  with make_scratch(scratch_dir, out_of_core) as scratch:
    pred = run_prediction(engine, vol, sets, vote, budget_bytes=budget, out_of_core=out_of_core,
                          scratch_dir=scratch, keep_labels=True, keep_probs=return_probs,
                          progress=progress, face_taper=face_taper)
  out = (pred.labels, pred.probs) if return_probs else (pred.labels,)
  if return_info:
    out = out + (pred.info,)
  return out[0] if len(out) == 1 else out
