"""The "open" stage: a model bundle and an input found, opened and read once.

`open_source` opens any input `registry.open_volume` reads (a scan brings its stored intensity
statistics; other inputs get theirs computed while they are read) and checks its channels
against the model; `load_source` reads it once, into memory or (out of core) into a scratch
zarr, validating the intensities on the way. `find_bundle` accepts a training workdir for its
bundle.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from bonejax.core import errors
from bonejax.core.progress import Progress
from bonejax.data import store
from bonejax.io import intensity, registry
from bonejax.predict import memory
from bonejax.predict.volumes import SlabVolume, create_scratch

_STATS_VOXELS = 1 << 22  # voxels per statistics update (it makes float64 temporaries)


def find_bundle(path: str | os.PathLike) -> Path:
  """A bundle directory, or the bundle of a training workdir (WORKDIR/model)."""
  from bonejax.models import bundle as bundle_lib
  p = Path(path)
  if not (p / bundle_lib.MODEL_JSON).exists() and (p / "model" / bundle_lib.MODEL_JSON).exists():
    p = p / "model"
  return p


def source_name(source: Any) -> str:
  """The path of an input as the outputs' attributes record it."""
  return str(source.path) if isinstance(source, store.Scan) else str(source)


def open_source(source: Any, in_channels: int, budget_bytes: int,
                image_key: str | None = None) -> tuple[Any, str]:
  """(io source with .stats, input kind) for a path or an opened `store.Scan`."""
  context = memory.cache_context(budget_bytes)  # a chunk cache bounded by the budget
  if isinstance(source, store.Scan):
    src = registry.open_volume(source.path, channels=None, context=context)
    src.stats = source.attrs.get("intensity")
  else:
    src = registry.open_volume(errors.require_exists(source, "input"), channels=None,
                               context=context, key=image_key)
  if src.channels != in_channels:
    shape = src.shape
    src.close()
    what = "scan" if src.kind == "scan" else "input"
    raise errors.UserError(f"{what} {str(src.path)!r} has {src.channels} channel(s) (shape "
                           f"{shape}); the model expects in_channels={in_channels}")
  kind = "scan" if src.kind == "scan" else ("channels" if src.channels > 1 else "file")
  return src, kind


def load_source(src: Any, stats: dict[str, Any] | None, *, out_of_core: bool,
                scratch_dir: Path | None, budget_bytes: int,
                progress: bool) -> tuple[SlabVolume, dict[str, Any]]:
  """Reads the input once: into memory, or (out of core) into a scratch zarr unless it is a scan
  already; computes intensity statistics on the way when none are stored."""
  if out_of_core and stats is not None and src.kind == "scan" and src.tensorstore is not None:
    return SlabVolume(src.tensorstore), stats
  shape, dtype = tuple(src.shape), np.dtype(src.dtype)
  acc = intensity.StatsAccumulator(dtype, math.prod(shape)) if stats is None else None
  if out_of_core:
    target = create_scratch(scratch_dir / "input.zarr", shape, dtype, memory.SCRATCH_CHUNK,
                            memory.cache_context(8 << 20, 1.0))
  else:
    target = np.empty(shape, dtype)
  plane_bytes = math.prod(shape[1:]) * dtype.itemsize
  slab = max(1, min(64, int(budget_bytes * memory.SLAB_FRACTION // max(plane_bytes, 1))))
  bar = Progress(total=shape[0], desc="read", unit="slices") if progress else None
  pending = None
  try:
    for z0 in range(0, shape[0], slab):
      z1 = min(z0 + slab, shape[0])
      data = np.asarray(src.read_slab(z0, z1))
      _check_slab(data, acc, f"(slices {z0}-{z1 - 1})")
      if out_of_core:
        if pending is not None:
          pending.result()
        pending = target[z0:z1].write(data)
      else:
        target[z0:z1] = data
      if bar is not None:
        bar.update(z1 - z0)
  finally:
    if pending is not None:  # never leave a write in flight behind a failure (clean-up follows)
      pending.result()
  if bar is not None:
    bar.close()
  return SlabVolume(target), (stats if stats is not None else acc.finalize())


def _check_slab(data: np.ndarray, acc: Any, where: str) -> None:
  """Adds a slab to the statistics being computed, or validates it against stored ones."""
  try:
    if acc is not None:
      step = max(1, _STATS_VOXELS // max(1, math.prod(data.shape[1:])))
      for p0 in range(0, data.shape[0], step):
        acc.update(data[p0:p0 + step])
    else:
      intensity.validate_image(data)
  except errors.UserError as e:
    raise errors.UserError(f"{e} {where}") from None
