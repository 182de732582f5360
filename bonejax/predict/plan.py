"""The "plan" stage: what one prediction will do, decided before any voxel is read.

`Settings` are a `Predictor`'s choices (plane sets, vote, dtype, budgets, ...), checked once;
`ModelInfo` is what the bundle's model.json says (channels, classes, normalisation, voxel
size); `Outputs` are the paths one prediction writes, checked before any work; `plan_scan`
opens the input and decides the rest for that input: resampling to the bundle's voxel size,
in memory or out of core, the scratch directory, and (several processes) that every process
was given the same job.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from bonejax.core import errors, memory_plan, outputs
from bonejax.core.distributed import Group
from bonejax.evaluate import uncertainty
from bonejax.io import intensity, registry, resample as resample_lib
from bonejax.predict import hosts, memory, source as source_lib
from bonejax.predict.engine import DTYPES
from bonejax.predict.planesets import (DEFAULT_FACE_TAPER, PlaneSet, check_face_taper,
                                       check_vote, plane_sets)
from bonejax.predict.volumes import scratch_dir as make_scratch


def output_kind(path: str | os.PathLike) -> str:
  kind = registry.output_format(path)
  if kind is not None:
    return kind
  raise errors.UserError(f"output {str(path)!r} must end in .zarr (zarr v3 labels), .ome.zarr "
                         f"(OME-NGFF 0.5) or .tif/.tiff")


@dataclasses.dataclass(frozen=True)
class Settings:
  """How a `Predictor` predicts every input (see `Predictor` for each field)."""
  planes: int = 3
  axis: int | None = None
  vote: str = "soft"
  batch_size: int = 8
  memory_budget_gb: float = memory.DEFAULT_BUDGET_GB
  device_memory_gb: float | None = None
  dtype: str = "float32"
  tile_size: int | None = None
  tile_overlap: int | None = None
  out_of_core: bool | None = None
  resample: bool = True
  image_key: str | None = None
  graph: str = "auto"
  progress: bool = True
  face_taper: int = DEFAULT_FACE_TAPER

  def check(self) -> list[PlaneSet]:
    """Fails on a bad value (one line); returns the plane sets."""
    sets = plane_sets(self.planes, self.axis)
    check_vote(self.vote)
    check_face_taper(self.face_taper)
    if self.dtype not in DTYPES:
      raise errors.UserError(f"dtype={self.dtype!r} must be one of {', '.join(DTYPES)}")
    if not self.memory_budget_gb or self.memory_budget_gb <= 0:
      raise errors.UserError(f"memory_budget_gb={self.memory_budget_gb} must be positive")
    if int(self.batch_size) < 1:
      raise errors.UserError(f"batch_size={self.batch_size} must be positive")
    return sets

  @property
  def budget_bytes(self) -> int:
    return int(float(self.memory_budget_gb) * 2**30)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What the bundle's model.json says; a bad bundle fails here, before any data is read."""
  meta: dict[str, Any]
  path: Path | None          # None for a bundle given loaded
  context: int               # 2.5D planes each side
  in_channels: int           # channels per voxel of the input
  classes: list[str]
  rule: str                  # normalisation
  voxel_size_um: tuple | None

  @classmethod
  def of(cls, model: Any) -> "ModelInfo":
    from bonejax.models import bundle as bundle_lib
    if isinstance(model, bundle_lib.Bundle):
      meta, path = model.meta, None
    else:
      path = source_lib.find_bundle(model)
      meta = bundle_lib.read_meta(path)
    context = int(meta.get("context_slices", 0) or 0)
    um = meta.get("voxel_size_um")
    # A 2.5D model's 2k + 1 channels are planes of a plain volume.
    return cls(meta, path, context, int(meta.get("in_channels", 1)) // (2 * context + 1),
               list(meta["classes"]), str(meta.get("normalization", "percentile")),
               resample_lib.as_zyx(um) if um is not None else None)


@dataclasses.dataclass(frozen=True)
class Outputs:
  """The files one prediction writes (any may be None) and whether existing ones go."""
  output: str | os.PathLike | None = None
  save_probs: str | os.PathLike | None = None
  save_uncertainty: str | os.PathLike | None = None
  overwrite: bool = False
  with_image: bool = False   # an .ome.zarr output also holds the input image (labels nested)
  postprocess: tuple = ()    # postprocess.Rule, applied to the labels before they are finished

  @property
  def kind(self) -> str | None:
    return output_kind(self.output) if self.output is not None else None

  def named(self) -> list[tuple[str, Any]]:
    return [(n, p) for n, p in (("output", self.output), ("save_probs", self.save_probs),
                                ("save_uncertainty", self.save_uncertainty)) if p is not None]

  def check(self, shared: bool) -> None:
    """Fails (one line) on a bad or existing output before any work."""
    if self.with_image and self.kind != "ome-zarr":
      raise errors.UserError(f"--with_image needs an .ome.zarr --output, not "
                             f"{str(self.output)!r}")
    if self.output is not None:
      output_kind(self.output)
      outputs.check_output(self.output, self.overwrite)
    if self.save_probs is not None:
      if Path(self.save_probs).suffix.lower() != ".zarr":
        raise errors.UserError(f"save_probs {str(self.save_probs)!r} must end in .zarr or "
                               f".ome.zarr")
      outputs.check_output(self.save_probs, self.overwrite)
    if self.save_uncertainty is not None:
      uncertainty.output_kind(self.save_uncertainty)
      outputs.check_output(self.save_uncertainty, self.overwrite)
    named = [(n, Path(p).resolve()) for n, p in self.named()]
    for i, (a, pa) in enumerate(named):
      for b, pb in named[i + 1:]:
        if pa == pb:
          raise errors.UserError(f"{a} and {b} are the same path")
    if shared and self.output is None and self.save_probs is None:
      raise errors.UserError("several processes need an output (or save_probs) on a filesystem "
                             "they all share")
    if shared and self.save_uncertainty is not None:
      raise errors.UserError("--save_uncertainty is not supported with several processes yet "
                             "(its slice ranking needs the whole volume): run it on one host")

  def scratch_parent(self) -> Path:
    """Where scratch goes: beside the first output (found again after a crash), else tmp."""
    anchor = self.output if self.output is not None else self.save_probs
    return Path(anchor).parent if anchor is not None else Path(tempfile.gettempdir())


@dataclasses.dataclass
class ScanPlan:
  """One input, opened, and what its prediction will do."""
  src: Any                   # the opened input (io source), closed by the caller
  kind: str                  # "scan", "file" or "channels"
  shape: tuple               # the input's shape (Z, Y, X[, C])
  input_um: tuple | None     # its voxel size
  model_src: Any             # what is predicted: the input, or it resampled to the model's grid
  regrid: Any                # resample.Regrid back to the input grid, or None
  out_of_core: bool
  scratch_parent: Path

  @property
  def model_shape(self) -> tuple:
    return tuple(int(s) for s in self.model_src.shape)

  def scratch(self, group: Group) -> Iterator[Path | None]:
    """The scratch directory of this prediction (a context manager)."""
    if group.size > 1:
      return hosts.scratch_dir(group, self.scratch_parent)
    if not self.out_of_core:
      # No scratch of its own, but a killed out-of-core run's scratch beside the output goes.
      outputs.remove_stale_scratch(self.scratch_parent)
    return make_scratch(self.scratch_parent, self.out_of_core)


def plan_scan(settings: Settings, info: ModelInfo, sets: list[PlaneSet], source: Any,
              outs: Outputs, group: Group) -> ScanPlan:
  """Opens `source` and plans its prediction (see the module docstring)."""
  src, kind = source_lib.open_source(source, info.in_channels, settings.budget_bytes,
                                     settings.image_key)
  try:
    if getattr(src, "stats", None) is not None and not intensity.has_stats(src.stats, info.rule):
      src.stats = None  # e.g. no voxels > 0 figures (an older scan): computed while reading
    shape = tuple(int(s) for s in src.shape)
    input_um = src.voxel_size_um
    model_src, regrid = src, None
    model_um = info.voxel_size_um
    if settings.resample and model_um is not None and input_um is not None and \
        not resample_lib.same_size(input_um, model_um):
      model_src = resample_lib.ResampledSource(src, model_um, order=1)
      model_src.stats = src.stats  # a scan's stored statistics still describe its intensities
      regrid = resample_lib.Regrid(shape, model_src.shape)
    # Before any allocation: the largest plane of what is predicted must fit the budget (a
    # scan claiming 100000^3, or a bundle voxel size that resamples the input up to it).
    memory_plan.require_planes_fit(
        f"input {str(getattr(src, 'path', source))!r}"
        + (f" resampled to the bundle's voxel size {model_um[0]:g} um" if regrid is not None
           else ""),
        model_src.shape, src.channels * 4 + len(info.classes) * 4 * 3,
        settings.memory_budget_gb,
        extra_bytes=sum(model_src.working_bytes()) if regrid is not None else 0)
    job = ScanPlan(src, kind, shape, input_um, model_src, regrid, False, outs.scratch_parent())
    job.out_of_core = (settings.out_of_core if settings.out_of_core is not None
                       else _needs_out_of_core(settings, info, sets, job, outs, group.size > 1))
    _require_disk(job, outs, len(info.classes))
    if group.size > 1:
      hosts.agree(group, planes=settings.planes, axis=settings.axis, vote=settings.vote,
                  dtype=settings.dtype, tile_size=settings.tile_size,
                  tile_overlap=settings.tile_overlap, shape=shape, dtype_in=str(src.dtype),
                  classes=info.classes, output=outs.output and Path(outs.output).name,
                  save_probs=outs.save_probs and Path(outs.save_probs).name)
      job.out_of_core = bool(group.broadcast_json("out of core", job.out_of_core))
  except BaseException:
    src.close()
    raise
  return job


def _require_disk(job: ScanPlan, outs: Outputs, k: int) -> None:
  """Refuses a prediction whose files cannot fit where they go: the out-of-core scratch (its
  float32 sums, raw), a TIFF output (raw), the probabilities (zstd: counted at a quarter)."""
  v = math.prod(job.model_shape[:3])
  n = math.prod(job.shape[:3])
  parts = []
  if job.out_of_core:
    parts.append(("the out-of-core scratch", v * k * 4, job.scratch_parent))
  if outs.output is not None and outs.kind == "tiff":
    parts.append((f"--output={outs.output}", n, Path(outs.output)))
  if outs.save_probs is not None:
    parts.append((f"--save_probs={outs.save_probs}", n * k, Path(outs.save_probs)))
  memory_plan.require_disk(parts)


def _needs_out_of_core(settings: Settings, info: ModelInfo, sets: list[PlaneSet], job: ScanPlan,
                       outs: Outputs, shared: bool) -> bool:
  """Whether the in-memory arrays of this prediction would exceed the host budget."""
  k = len(info.classes)
  shape = job.shape
  need = memory.resident_bytes(job.model_shape[:3], job.src.channels,
                               np.dtype(job.src.dtype).itemsize, k, sets, settings.vote,
                               shared=shared)
  if settings.vote == "max" or outs.save_uncertainty is not None:  # maxima / vote counts
    need += math.prod(shape[:3]) * k * (4 if settings.vote == "max" else 1)
  if job.regrid is not None:  # the fused sums on the input grid
    need += math.prod(shape[:3]) * (k * 4 + 1)
  return need > memory.resident_limit(settings.budget_bytes)
