"""Bundle in, files out: what `launch/predict.py` runs.

`predict_scan` checks every argument and the bundle before reading data, opens the input
through `registry.open_volume` (any format it reads; a scan brings its stored statistics,
other inputs get theirs computed while they are read), runs `api.run_prediction`, and writes the
outputs under temporary names renamed into place when complete: zarr v3 labels with attributes,
an OME-Zarr (NGFF 0.5 multiscale labels with class names and colours, `ome_zarr`) or a TIFF;
optionally the mean probabilities (Z, Y, X, K) as zarr v3 or OME-Zarr, and the uncertainty maps
(`uncertainty`).

Voxel size: when the bundle records the voxel size it was trained at (model.json
`voxel_size_um`) and the input's differs (from its metadata), the input is resampled to the
bundle's on the way in, predicted there, and every plane set's probabilities are mapped back to
the input grid before the vote (`resample`); `resample=False` predicts on the input grid as is.
With several processes (`group`) they share the work and the files as `hosts` describes.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

import bonejax
from bonejax.core import errors, outputs
from bonejax.core.progress import Progress
from bonejax.data import store
from bonejax.evaluate import uncertainty
from bonejax.io import intensity, ome_zarr, registry, resample as resample_lib, tiff, voxel
from bonejax.core.distributed import SINGLE, Group
from bonejax.predict import hosts, memory
from bonejax.predict.api import local_devices, make_engine, run_prediction
from bonejax.predict.engine import DTYPES
from bonejax.predict.planesets import check_vote, plane_sets
from bonejax.predict.volumes import SlabVolume, create_scratch, scratch_dir as make_scratch

_STATS_VOXELS = 1 << 22  # voxels per statistics update (it makes float64 temporaries)


def _open_source(source: Any, in_channels: int, budget_bytes: int,
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
  for z0 in range(0, shape[0], slab):
    z1 = min(z0 + slab, shape[0])
    data = np.asarray(src.read_slab(z0, z1))
    where = f"(slices {z0}-{z1 - 1})"
    try:
      if acc is not None:
        step = max(1, _STATS_VOXELS // max(1, math.prod(shape[1:])))
        for p0 in range(0, data.shape[0], step):
          acc.update(data[p0:p0 + step])
      else:
        intensity.validate_image(data)
    except errors.UserError as e:
      raise errors.UserError(f"{e} {where}") from None
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
  return SlabVolume(target), (stats if stats is not None else acc.finalize())


def output_kind(path: str | os.PathLike) -> str:
  kind = registry.output_format(path)
  if kind is not None:
    return kind
  raise errors.UserError(f"output {str(path)!r} must end in .zarr (zarr v3 labels), .ome.zarr "
                      f"(OME-NGFF 0.5) or .tif/.tiff")


def find_bundle(path: str | os.PathLike) -> Path:
  """A bundle directory, or the bundle of a training workdir (WORKDIR/model)."""
  from bonejax.models import bundle as bundle_lib
  p = Path(path)
  if not (p / bundle_lib.MODEL_JSON).exists() and (p / "model" / bundle_lib.MODEL_JSON).exists():
    p = p / "model"
  return p


def _check_args(vote, dtype, memory_budget_gb, batch_size, output, save_probs,
                overwrite, save_uncertainty=None) -> None:
  check_vote(vote)
  if dtype not in DTYPES:
    raise errors.UserError(f"dtype={dtype!r} must be one of {', '.join(DTYPES)}")
  if not memory_budget_gb or memory_budget_gb <= 0:
    raise errors.UserError(f"memory_budget_gb={memory_budget_gb} must be positive")
  if int(batch_size) < 1:
    raise errors.UserError(f"batch_size={batch_size} must be positive")
  if output is not None:
    output_kind(output)
    outputs.check_output(output, overwrite)
  if save_probs is not None:
    if Path(save_probs).suffix.lower() != ".zarr":
      raise errors.UserError(f"save_probs {str(save_probs)!r} must end in .zarr or .ome.zarr")
    outputs.check_output(save_probs, overwrite)
  if save_uncertainty is not None:
    uncertainty.output_kind(save_uncertainty)
    outputs.check_output(save_uncertainty, overwrite)
  named = [(n, Path(p).resolve()) for n, p in (("output", output), ("save_probs", save_probs),
                                               ("save_uncertainty", save_uncertainty))
           if p is not None]
  for i, (a, pa) in enumerate(named):
    for b, pb in named[i + 1:]:
      if pa == pb:
        raise errors.UserError(f"{a} and {b} are the same path")


def _tells_the_group(fn):
  """`fn(..., group=...)` with any error told to the group's other processes at once.

  Without it a process failing before `predict_scan` reaches its own `on_error` (a bad input,
  the bundle, the engine build) would leave the others waiting at the next barrier until the
  heartbeat or the barrier timeout. `Group.fail` says it once, however many blocks see the error.
  """

  @functools.wraps(fn)
  def wrapper(*args, group: Group = SINGLE, **kwargs):
    with group.on_error():
      return fn(*args, group=group, **kwargs)

  return wrapper


@_tells_the_group
def predict_scan(model: Any, source: Any, *, output: str | os.PathLike | None = None,
                 save_probs: str | os.PathLike | None = None, planes: int = 3,
                 axis: int | None = None, vote: str = "soft", batch_size: int = 8,
                 memory_budget_gb: float = memory.DEFAULT_BUDGET_GB,
                 device_memory_gb: float | None = None, dtype: str = "float32",
                 tile_size: int | None = None, tile_overlap: int | None = None,
                 out_of_core: bool | None = None, overwrite: bool = False,
                 progress: bool = True, keep_labels: bool | None = None,
                 save_uncertainty: str | os.PathLike | None = None, resample: bool = True,
                 image_key: str | None = None, devices: Any = None, graph: str = "auto",
                 group: Group = SINGLE, with_image: bool = False) -> dict[str, Any]:
  """Predicts a scan or volume file with a model bundle; what `launch/predict.py` runs.

  `model`: a bundle directory (WORKDIR/model or WORKDIR) or a loaded `bundle.Bundle` (both run
  in `dtype` the same way: the architecture rebuilt in that dtype, float32 stem and head kept).
  `source`: a scan directory, any volume `registry.open_volume` reads (statistics computed
  while reading), or an opened `store.Scan`. Writes `output` (.zarr labels with attributes,
  .ome.zarr or .tif), `save_probs` (.zarr (Z, Y, X, K) float32 mean probabilities, or .ome.zarr)
  and `save_uncertainty` (.zarr, .ome.zarr or .tif) atomically. `resample`: predict at the
  bundle's voxel size when it records one (see the module docstring). `image_key`: the dataset
  of an HDF5 / NeXus input. Returns the result dict; with `keep_labels` (default: when no
  output is given) it also holds "labels".
  `devices`: how many of this process's devices to spread batches over (default all).
  `graph`: the inference graph's convolution policy, or "off" (`engine.GRAPHS`).
  `group`: the processes predicting this volume together (`distributed.Group`; each process
  calls this with the same arguments; process 0 returns the labels of `keep_labels`).
  `with_image`: an .ome.zarr `output` holds the input image with the labels under its
  `labels/` group (`ome_zarr.nest_under_image`), as napari-ome-zarr and MoBIE open them.
  """
  from bonejax.models import bundle as bundle_lib
  start = time.perf_counter()
  sets = plane_sets(planes, axis)
  _check_args(vote, dtype, memory_budget_gb, batch_size, output, save_probs, overwrite,
              save_uncertainty)
  devices = local_devices(devices)  # a bad count fails before any data is read
  out_kind = output_kind(output) if output is not None else None
  if with_image and out_kind != "ome-zarr":
    raise errors.UserError(f"--with_image needs an .ome.zarr --output, not {output!r}")

  # Bundle metadata first: a bad bundle fails before any data is read.
  if isinstance(model, bundle_lib.Bundle):
    meta, bundle_path = model.meta, None
  else:
    bundle_path = find_bundle(model)
    meta = bundle_lib.read_meta(bundle_path)
  context = int(meta.get("context_slices", 0) or 0)
  # Channels per voxel of the input: a 2.5D model's 2k + 1 channels are planes of a plain volume.
  in_channels = int(meta.get("in_channels", 1)) // (2 * context + 1)
  classes = list(meta["classes"])
  rule = str(meta.get("normalization", "percentile"))
  budget = int(float(memory_budget_gb) * 2**30)

  model_um = meta.get("voxel_size_um")
  model_um = resample_lib.as_zyx(model_um) if model_um is not None else None

  shared = group.size > 1
  if shared and output is None and save_probs is None:
    raise errors.UserError("several processes need an output (or save_probs) on a filesystem "
                        "they all share")
  if shared and save_uncertainty is not None:
    raise errors.UserError("--save_uncertainty is not supported with several processes yet "
                        "(its slice ranking needs the whole volume): run it on one host")
  src, kind = _open_source(source, in_channels, budget, image_key)
  if getattr(src, "stats", None) is not None and not intensity.has_stats(src.stats, rule):
    src.stats = None  # e.g. no voxels > 0 figures (an older scan): computed while reading
  shape = tuple(int(s) for s in src.shape)
  input_um = src.voxel_size_um
  model_src, regrid = src, None
  if resample and model_um is not None and input_um is not None and \
      not resample_lib.same_size(input_um, model_um):
    model_src = resample_lib.ResampledSource(src, model_um, order=1)
    model_src.stats = src.stats  # a scan's stored statistics still describe its intensities
    regrid = resample_lib.Regrid(shape, model_src.shape)
  mshape = tuple(int(s) for s in model_src.shape)
  if out_of_core is None:
    k = len(classes)
    need = memory.resident_bytes(mshape[:3], src.channels, np.dtype(src.dtype).itemsize, k,
                                 sets, vote, shared=shared)
    if vote == "max" or save_uncertainty is not None:  # per-class maxima / vote counts
      need += math.prod(shape[:3]) * k * (4 if vote == "max" else 1)
    if regrid is not None:  # the fused sums on the input grid
      need += math.prod(shape[:3]) * (k * 4 + 1)
    out_of_core = need > memory.resident_limit(budget)
  if keep_labels is None:
    keep_labels = output is None
  if shared:
    hosts.agree(group, planes=planes, axis=axis, vote=vote, dtype=dtype, tile_size=tile_size,
                tile_overlap=tile_overlap, shape=shape, dtype_in=str(src.dtype),
                classes=classes, output=output and Path(output).name,
                save_probs=save_probs and Path(save_probs).name)
    out_of_core = bool(group.broadcast_json("out of core", out_of_core))

  anchor = Path(output if output is not None else (save_probs or tempfile.gettempdir()))
  scratch_parent = anchor.parent if output is not None or save_probs is not None else anchor
  labels = None
  try:
    with (hosts.scratch_dir(group, scratch_parent) if shared
          else make_scratch(scratch_parent, out_of_core)) as scratch:
      vol, stats = hosts.load_source(group, model_src, model_src.stats, out_of_core=out_of_core,
                                     scratch_dir=scratch, budget_bytes=budget,
                                     progress=progress)
      if isinstance(model, bundle_lib.Bundle):
        net, engine_dtype = model, dtype  # make_engine rebuilds it in `dtype`, as load_bundle
      else:
        net = bundle_lib.load_bundle(bundle_path, dtype=jnp.dtype(dtype).type).model
        engine_dtype = None
      engine = make_engine(net, in_channels=in_channels, context_slices=context,
                           batch_size=batch_size,
                           dtype=engine_dtype, memory_budget_gb=memory_budget_gb,
                           device_memory_gb=device_memory_gb, tile_size=tile_size,
                           tile_overlap=tile_overlap, devices=devices, graph=graph)
      if engine.num_classes != len(classes):
        raise errors.UserError(f"the model gives {engine.num_classes} classes but its bundle lists "
                            f"{len(classes)}")
      engine.set_normalization(stats, rule)
      attrs = {"model": str(bundle_path) if bundle_path else meta.get("model"),
               "architecture": meta.get("model"), "planes": int(planes),
               "plane_sets": [ps.name for ps in sets], "vote": vote, "classes": classes,
               "source": str(source) if not isinstance(source, store.Scan) else str(source.path),
               "bonejax_version": bonejax.__version__}
      if input_um is not None:
        attrs.update(voxel.voxel_attrs(input_um))
      if regrid is not None:
        attrs["predicted_at_voxel_size_um"] = list(model_um)
      out_ctx = memory.cache_context(budget, memory.CACHE_FRACTION / 2)

      def new(path, *args, **kw):
        """An output array; several processes: process 0 makes it, the others open it."""
        make = lambda: store.create_array(path, *args, **kw)  # noqa: E731
        return hosts.shared_array(group, path, make, out_ctx, "output") if shared else make()

      def new_ome(path, *args, **kw):
        """An OME-Zarr writer; several processes: process 0 makes it (and alone finishes it),
        the others write their shares into its level 0."""
        if not shared:
          return ome_zarr.OmeZarrWriter(path, *args, **kw)
        writer = ome_zarr.OmeZarrWriter(path, *args, **kw) if group.is_main else None
        group.barrier(f"create {Path(path).name}")
        if writer is not None:
          return writer
        level0 = hosts.open_array(Path(path) / "0", out_ctx, "output")
        return types.SimpleNamespace(view=level0 if kw.get("channels") is None
                                     else level0[ts.d[0].transpose[3]])

      with contextlib.ExitStack() as stack:
        labels_out = probs_out = unc = None
        out_tmp = probs_tmp = None
        labels_ome = probs_ome = None
        if output is not None:
          out_tmp = stack.enter_context(hosts.atomic_output(group, output, overwrite))
          if out_kind == "zarr":
            labels_out = new(out_tmp, shape[:3], np.uint8, context=out_ctx)
          elif out_kind == "ome-zarr":
            labels_ome = new_ome(out_tmp, shape[:3], np.uint8, kind="labels",
                                 classes=classes, voxel_size_um=input_um,
                                 name=Path(output).name, context=out_ctx)
            labels_out = labels_ome.view
        if save_probs is not None:
          probs_tmp = stack.enter_context(hosts.atomic_output(group, save_probs, overwrite))
          if ome_zarr.is_ome_zarr_path(save_probs):
            probs_ome = new_ome(probs_tmp, shape[:3], np.float32, kind="image",
                                channels=len(classes), channel_names=classes,
                                voxel_size_um=input_um, name=Path(save_probs).name,
                                context=out_ctx)
            probs_out = probs_ome.view
          else:
            probs_out = new(probs_tmp, shape[:3] + (len(classes),), np.float32,
                            context=out_ctx)
        if save_uncertainty is not None:
          unc = stack.enter_context(uncertainty.UncertaintyWriter(
              save_uncertainty, shape[:3], overwrite=overwrite, voxel_size_um=input_um,
              attrs=attrs, scratch=scratch, context=out_ctx))
        want_memory = (keep_labels or (out_kind == "tiff" and not out_of_core)) and not shared
        labels_ts = labels_out
        if (out_kind == "tiff" and (out_of_core or shared)) or \
            (shared and keep_labels and labels_ts is None):
          labels_ts = new(scratch / "labels.zarr", shape[:3], np.uint8, context=out_ctx)
        # On an error, the other processes are told before anything here is cleaned up.
        stack.enter_context(group.on_error())
        pred = run_prediction(engine, vol, sets, vote, budget_bytes=budget,
                              out_of_core=out_of_core, scratch_dir=scratch,
                              labels_out=labels_ts, probs_out=probs_out,
                              keep_labels=want_memory, keep_probs=False, progress=progress,
                              uncertainty_out=unc, regrid=regrid, group=group)
        labels = pred.labels
        if group.is_main:
          if shared and keep_labels:
            labels = labels_ts.read().result()
          if out_kind == "zarr":
            store.set_array_attrs(out_tmp, attrs)
          if labels_ome is not None:
            labels_ome.finish(attrs)
            if with_image:
              ome_zarr.nest_under_image(out_tmp, src, voxel_size_um=input_um, attrs=attrs,
                                        context=out_ctx)
          probs_attrs = {**attrs, "content": "mean probabilities (Z, Y, X, K)"}
          if probs_ome is not None:
            probs_ome.finish(probs_attrs)
          elif probs_out is not None:
            store.set_array_attrs(probs_tmp, probs_attrs)
          if out_kind == "tiff":
            tiff.export_tiff(labels if labels is not None else labels_ts, out_tmp,
                             overwrite=True, voxel_size_um=input_um)
    # Every process returns once process 0 has put the outputs in place.
    per_process = group.allgather("outputs in place", str(engine.num_devices))
  finally:
    src.close()
  seconds = time.perf_counter() - start
  voxels = math.prod(shape[:3])
  result = {"output": str(output) if output is not None else None, "shape": list(shape[:3]),
            "seconds": round(seconds, 3), "voxels_per_second": round(voxels / seconds, 1),
            "planes": int(planes), "axis": sets[0].axis if int(planes) == 1 else None,
            "vote": vote, "classes": classes, "save_probs": str(save_probs) if save_probs else None,
            "dtype": dtype, "batch_size": int(batch_size), "memory_budget_gb": memory_budget_gb,
            "input_kind": kind, "device": str(jax.devices()[0].device_kind),
            "voxel_size_um": list(input_um) if input_um is not None else None,
            "model_voxel_size_um": list(model_um) if model_um is not None else None,
            "resampled": ({"shape": list(mshape[:3]), "voxel_size_um": list(model_um)}
                          if regrid is not None else None),
            "save_uncertainty": str(save_uncertainty) if save_uncertainty else None,
            "devices": sum(int(n) for n in per_process), "processes": group.size,
            **pred.info}
  if unc is not None:
    result["uncertain_slices"] = unc.top_slices()
  if keep_labels:
    result["labels"] = labels
  return result
