"""`Predictor`: a bundle loaded and compiled once, then any number of inputs predicted to files.

As nnU-Net's nnUNetPredictor: the constructor reads the bundle, loads its weights and builds
the plane engine (one compiled function per plane shape, kept across inputs: scans of one shape
compile once); `predict(source, output, ...)` then runs the stages of one input:

  plan      `plan.plan_scan`: open the input, resample or not, in memory or out of core
  open      `hosts.load_source`: read it once (into memory, or a scratch zarr)
  writers   `writers.Writers.open`: claim and create the outputs under temporary names
  run       `api.run_prediction`: plane sets through the engine, voted slab by slab
  finalise  `Writers.finish` and the renames into place; the result dict

`predict_scan` is the one-call form (a Predictor for one input). Voxel size: when the bundle
records the voxel size it was trained at (model.json `voxel_size_um`) and the input's differs,
the input is resampled to the bundle's on the way in, predicted there, and every plane set's
probabilities are mapped back to the input grid before the vote (`resample=False`: predicted
on the input grid as is; a 3D bundle's blended window probabilities are mapped back the same
way, `run3d`). Several processes (`group`) share one volume as `hosts` describes (a 3D bundle:
each its Z range of windows, `run3d`);
many scans, each whole on one process, are `study`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import types
from typing import Any

import jax.numpy as jnp

from bonejax.core import dtype_auto, errors
from bonejax.core.distributed import SINGLE, Group
from bonejax.predict import hosts, memory, plan, postprocess as postprocess_lib, source as source_lib
from bonejax.predict.api import local_devices, make_engine, predict_volume, run_prediction
from bonejax.predict.writers import Writers, attributes


class Predictor:
  """A model bundle ready to predict inputs (see the module docstring).

  `model`: a bundle directory (WORKDIR/model or WORKDIR) or a loaded `bundle.Bundle` (both run
  in `dtype` the same way: the architecture rebuilt in that dtype, float32 stem and head kept;
  "auto": bfloat16 where the device has bf16 units, else float32, `bonejax.core.dtype_auto`).
  `planes` / `axis`: the plane sets (`planesets.plane_sets`); `vote`: soft, majority or max.
  `batch_size`: planes per device call; `memory_budget_gb`: host memory for the volume and the
  accumulators (beyond it a run goes out of core, or always / never with `out_of_core`);
  `device_memory_gb`, `tile_size`, `tile_overlap`: see `make_engine`. `resample`: predict at the
  bundle's voxel size when it records one. `image_key`: the dataset of HDF5 / NeXus inputs.
  `devices`: how many of this process's devices to spread batches over (default all).
  `graph`: the inference graph's convolution policy, or "off" (`engine.GRAPHS`). `group`: the
  processes predicting each volume together (every process makes the same calls).
  """

  def __init__(self, model: Any, *, planes: int = 3, axis: int | None = None,
               vote: str = "soft", batch_size: int = 8,
               memory_budget_gb: float = memory.DEFAULT_BUDGET_GB,
               device_memory_gb: float | None = None, dtype: str = "float32",
               tile_size: int | None = None, tile_overlap: int | None = None,
               out_of_core: bool | None = None, resample: bool = True,
               image_key: str | None = None, devices: Any = None, graph: str = "auto",
               progress: bool = True, group: Group = SINGLE,
               face_taper: int = plan.DEFAULT_FACE_TAPER):
    dtype = dtype_auto.resolve(dtype)  # "auto": this device's fastest accurate dtype
    self.settings = plan.Settings(planes, axis, vote, batch_size, memory_budget_gb,
                                  device_memory_gb, dtype, tile_size, tile_overlap, out_of_core,
                                  resample, image_key, graph, progress, face_taper)
    self.group = group
    # A process that fails here tells the others at once (they would wait at a barrier).
    with group.on_error():
      self.sets = self.settings.check()
      self.devices = local_devices(devices)  # a bad count fails before the bundle is read
      self.info = plan.ModelInfo.of(model)    # a bad bundle fails before the weights are
      self.is3d = _is_3d(self.info.meta)
      if self.is3d:
        self._check_3d()
      self.engine = self._engine_3d(model) if self.is3d else self._engine(model)

  def _check_3d(self) -> None:
    """A 3D model is predicted by 3D sliding windows: plane sets and votes do not apply."""
    s, name = self.settings, self.info.meta.get("model")
    if int(s.planes) != 3 or s.vote != "soft" or s.axis is not None:
      raise errors.UserError(f"--planes / --vote / --axis: the bundle's model {name!r} is 3D, "
                             "predicted by 3D sliding windows; leave them at --planes=3 "
                             "--vote=soft")

  def _engine_3d(self, model: Any):
    """The 3D sliding-window engine (`windows3d.make_window_engine`), built once."""
    from bonejax.models import bundle as bundle_lib
    from bonejax.predict import windows3d
    s, info = self.settings, self.info
    if isinstance(model, bundle_lib.Bundle):
      net, dtype = model, (None if s.dtype == "float32" else s.dtype)
    else:
      net, dtype = bundle_lib.load_bundle(info.path, dtype=jnp.dtype(s.dtype).type), None
    engine = windows3d.make_window_engine(net, devices=len(self.devices), dtype=dtype)
    if engine.num_classes != len(info.classes):
      raise errors.UserError(f"the model gives {engine.num_classes} classes but its bundle "
                             f"lists {len(info.classes)}")
    return engine

  def _window_args(self) -> dict[str, Any]:
    """predict_volume_3d's window settings from the bundle: its predict_window (else the
    training patch), its overlap; at most windows3d.DEFAULT_BATCH windows per device call."""
    from bonejax.predict import windows3d
    meta = self.info.meta
    window = meta.get("predict_window") or meta.get("patch_size_zyx") or meta["patch_size"]
    return dict(window=window, overlap=float(meta.get("predict_overlap",
                                                      windows3d.DEFAULT_OVERLAP)),
                batch_size=min(int(self.settings.batch_size), windows3d.DEFAULT_BATCH),
                memory_budget_gb=float(self.settings.memory_budget_gb),
                normalization=self.info.rule)

  def _engine(self, model: Any):
    from bonejax.models import bundle as bundle_lib
    s, info = self.settings, self.info
    if isinstance(model, bundle_lib.Bundle):
      net, dtype = model, s.dtype  # make_engine rebuilds it in `dtype`, as load_bundle does
    else:
      net, dtype = bundle_lib.load_bundle(info.path, dtype=jnp.dtype(s.dtype).type).model, None
    engine = make_engine(net, in_channels=info.in_channels, context_slices=info.context,
                         batch_size=s.batch_size, dtype=dtype,
                         memory_budget_gb=s.memory_budget_gb,
                         device_memory_gb=s.device_memory_gb, tile_size=s.tile_size,
                         tile_overlap=s.tile_overlap, devices=self.devices, graph=s.graph)
    if engine.num_classes != len(info.classes):
      raise errors.UserError(f"the model gives {engine.num_classes} classes but its bundle "
                             f"lists {len(info.classes)}")
    return engine

  @property
  def classes(self) -> list[str]:
    return self.info.classes

  def predict(self, source: Any, output: str | os.PathLike | None = None, *,
              save_probs: str | os.PathLike | None = None,
              save_uncertainty: str | os.PathLike | None = None, overwrite: bool = False,
              keep_labels: bool | None = None, progress: Any = None,
              with_image: bool = False, postprocess: str | None = None) -> dict[str, Any]:
    """Predicts one input; returns the result dict (what launch/predict.py prints).

    `source`: a scan directory, any volume `registry.open_volume` reads (statistics computed
    while reading), or an opened `store.Scan`. Writes `output` (.zarr labels with attributes,
    .ome.zarr or .tif), `save_probs` (.zarr (Z, Y, X, K) float32 mean probabilities, or
    .ome.zarr) and `save_uncertainty` (.zarr, .ome.zarr or .tif) atomically. With
    `keep_labels` (default: when no output is given) the result also holds "labels" (process 0
    only, with several processes). `progress`: True, False or a `Progress` to update (a GUI's
    bar), instead of the Predictor's setting. `with_image`: an .ome.zarr `output` holds the
    input image with the labels under its `labels/` group (`ome_zarr.nest_under_image`), as
    napari-ome-zarr and MoBIE open them. `postprocess`: clean-up rules for the labels
    (`postprocess.parse_rules`, e.g. "bone:min_size=500,pore:fill_holes").
    """
    start = time.perf_counter()
    outs = plan.Outputs(output, save_probs, save_uncertainty, overwrite, with_image)
    keep_labels = output is None if keep_labels is None else bool(keep_labels)
    with self.group.on_error():
      if postprocess:  # a bad rule fails before any work (volumes in um^3 checked below)
        postprocess_lib.parse_rules(postprocess, self.info.classes, (1.0, 1.0, 1.0))
      outs.check(self.group.size > 1)
      job = plan.plan_scan(self.settings, self.info, self.sets, source, outs, self.group)
      if postprocess:
        rules = postprocess_lib.parse_rules(postprocess, self.info.classes, job.input_um)
        outs = dataclasses.replace(outs, postprocess=tuple(rules))
      try:
        pred, labels, unc = self._run(job, outs, source, keep_labels,
                                      self.settings.progress if progress is None else progress)
        # Every process returns once process 0 has put the outputs in place.
        per_process = self.group.allgather("outputs in place", str(self.engine.num_devices))
      finally:
        job.src.close()
    result = self._result(job, outs, time.perf_counter() - start, per_process, pred.info)
    if unc is not None:
      result["uncertain_slices"] = unc.top_slices()
    if keep_labels:
      result["labels"] = labels
    return result

  def predict_volume(self, volume: Any, *, stats: dict[str, Any] | None = None,
                     return_probs: bool = False, progress: Any = None) -> tuple:
    """An array already in memory (numpy, tensorstore or `store.Scan`; a GUI's layer, a
    cross-validation fold's scan): (labels, mean probabilities or None, info), nothing written.

    `stats`: the volume's intensity statistics (default: a Scan's stored ones, else computed).
    `progress`: True, False or a `Progress` to update (default: the Predictor's setting).
    """
    from bonejax.data import store
    if stats is None and isinstance(volume, store.Scan):
      stats = volume.stats
    s = self.settings
    if self.is3d:
      from bonejax.predict import windows3d
      if isinstance(volume, store.Scan):
        volume = volume.image
      pred = windows3d.predict_volume_3d(self.engine, volume, stats=stats,
                                         keep_probs=return_probs, **self._window_args())
      return pred.labels, pred.probabilities, pred.summary()
    out = predict_volume(self.engine, volume, stats=stats, rule=self.info.rule,
                         planes=s.planes, axis=s.axis, vote=s.vote, face_taper=s.face_taper,
                         memory_budget_gb=s.memory_budget_gb, return_probs=return_probs,
                         out_of_core=s.out_of_core,
                         progress=s.progress if progress is None else progress,
                         return_info=True)
    return (out[0], out[1], out[2]) if return_probs else (out[0], None, out[1])

  def _run(self, job: plan.ScanPlan, outs: plan.Outputs, source: Any, keep_labels: bool,
           progress: Any):
    """The open, writers, run and finalise stages of one planned input."""
    if self.is3d:
      return self._run_3d(job, outs, source, keep_labels, progress)
    s, group = self.settings, self.group
    with job.scratch(group) as scratch:
      vol, stats = hosts.load_source(group, job.model_src, job.model_src.stats,
                                     out_of_core=job.out_of_core, scratch_dir=scratch,
                                     budget_bytes=s.budget_bytes,
                                     progress=progress is True)
      self.engine.set_normalization(stats, self.info.rule)
      attrs = attributes(self.info, s, self.sets, job, source_lib.source_name(source))
      with contextlib.ExitStack() as stack:
        w = Writers(group, s.budget_bytes).open(stack, outs, job, self.info.classes, attrs,
                                                scratch, keep_labels)
        # On an error, the other processes are told before anything here is cleaned up.
        stack.enter_context(group.on_error())
        pred = run_prediction(self.engine, vol, self.sets, s.vote, budget_bytes=s.budget_bytes,
                              out_of_core=job.out_of_core, scratch_dir=scratch,
                              labels_out=w.labels_ts, probs_out=w.probs_out,
                              keep_labels=w.want_memory, keep_probs=False,
                              progress=progress, uncertainty_out=w.unc, regrid=job.regrid,
                              group=group, face_taper=s.face_taper)
        labels = w.finish(outs, job, pred.labels, attrs, keep_labels)
        if outs.postprocess:
          pred.info["postprocess"] = w.postprocessed
    return pred, labels, w.unc

  def _run_3d(self, job: plan.ScanPlan, outs: plan.Outputs, source: Any, keep_labels: bool,
              progress: Any):
    """`_run` for a 3D model: the same stages, 3D windows (`run3d`: this process's share, on
    the bundle's grid when resampled) writing into the same writers slab by slab."""
    from bonejax.predict import run3d
    s, group = self.settings, self.group
    with job.scratch(group) as scratch:
      vol, stats = hosts.load_source(group, job.model_src, job.model_src.stats,
                                     out_of_core=job.out_of_core, scratch_dir=scratch,
                                     budget_bytes=s.budget_bytes,
                                     progress=progress is True)
      args = self._window_args()
      attrs = attributes(self.info, s, self.sets, job, source_lib.source_name(source))
      attrs.update(mode="3d_windows", planes=None, plane_sets=[], vote=None)
      bar = _window_progress(progress)
      with contextlib.ExitStack() as stack:
        w = Writers(group, s.budget_bytes).open(stack, outs, job, self.info.classes, attrs,
                                                scratch, keep_labels)
        # On an error, the other processes are told before anything here is cleaned up.
        stack.enter_context(group.on_error())
        pred = run3d.run(self.engine, _Slabs(vol), stats, args, writers=w, regrid=job.regrid,
                         out_of_core=job.out_of_core, scratch=scratch, group=group,
                         progress=bar)
        if bar is not None:
          bar.close()
        labels = w.finish(outs, job, pred.labels, attrs, keep_labels)
        info = {f"window_{k}" if k in ("seconds", "devices", "batch", "group") else k: v
                for k, v in pred.summary.items()}
        info.update(planes=None, vote=None, overlap=args["overlap"])
        if outs.postprocess:
          info["postprocess"] = w.postprocessed
    return types.SimpleNamespace(labels=pred.labels, info=info), labels, w.unc

  def _result(self, job: plan.ScanPlan, outs: plan.Outputs, seconds: float,
              per_process: list[str], info: dict[str, Any]) -> dict[str, Any]:
    import jax
    s, shape, model_um = self.settings, job.shape, self.info.voxel_size_um
    voxels = math.prod(shape[:3])
    return {"output": str(outs.output) if outs.output is not None else None,
            "shape": list(shape[:3]), "seconds": round(seconds, 3),
            "voxels_per_second": round(voxels / max(seconds, 1e-9), 1),
            "planes": int(s.planes), "axis": self.sets[0].axis if int(s.planes) == 1 else None,
            "vote": s.vote, "face_taper": int(s.face_taper), "classes": self.info.classes,
            "save_probs": str(outs.save_probs) if outs.save_probs else None,
            "dtype": s.dtype, "batch_size": int(s.batch_size),
            "memory_budget_gb": s.memory_budget_gb, "input_kind": job.kind,
            "device": str(jax.devices()[0].device_kind),
            "voxel_size_um": list(job.input_um) if job.input_um is not None else None,
            "model_voxel_size_um": list(model_um) if model_um is not None else None,
            "resampled": ({"shape": list(job.model_shape[:3]), "voxel_size_um": list(model_um)}
                          if job.regrid is not None else None),
            "save_uncertainty": str(outs.save_uncertainty) if outs.save_uncertainty else None,
            "devices": sum(int(n) for n in per_process), "processes": self.group.size, **info}


def _is_3d(meta: dict[str, Any]) -> bool:
  from bonejax import models
  try:
    return models.spatial_dims(str(meta.get("model"))) == 3
  except (KeyError, ValueError):
    return False  # an unknown architecture fails where the bundle is loaded, as before


class _Slabs:
  """A loaded input (`volumes.SlabVolume`) as the Z slabs windows3d reads."""

  def __init__(self, vol: Any):
    self.vol = vol
    self.shape = tuple(vol.shape) + ((vol.channels,) if vol.channels > 1 else ())

  def read_slab(self, z0: int, z1: int):
    return self.vol.read(0, z0, z1)


class _window_progress:  # pylint: disable=invalid-name
  """predict_volume_3d's progress(done, total) onto a `Progress` (a caller's, or a line)."""

  def __new__(cls, progress: Any):
    if not progress:
      return None
    return super().__new__(cls)

  def __init__(self, progress: Any):
    from bonejax.core.progress import Progress
    self.bar = progress if isinstance(progress, Progress) else Progress(desc="predict",
                                                                       unit="windows")
    self.done = 0

  def __call__(self, done: int, total: int) -> None:
    self.bar.total = total
    self.bar.update(done - self.done)
    self.done = done

  def close(self) -> None:
    self.bar.close()


def predict_scan(model: Any, source: Any, *, output: str | os.PathLike | None = None,
                 save_probs: str | os.PathLike | None = None,
                 save_uncertainty: str | os.PathLike | None = None, overwrite: bool = False,
                 keep_labels: bool | None = None, with_image: bool = False,
                 postprocess: str | None = None, **settings: Any) -> dict[str, Any]:
  """Predicts one input with a model bundle: `Predictor(model, **settings).predict(...)`.

  `settings` are the `Predictor`'s keyword arguments (planes, axis, vote, batch_size,
  memory_budget_gb, device_memory_gb, dtype, tile_size, tile_overlap, out_of_core, resample,
  image_key, devices, graph, progress, group); the rest are `Predictor.predict`'s.
  """
  group = settings.get("group", SINGLE)
  with group.on_error():  # also a failure while checking the outputs, before the bundle
    plan.Outputs(output, save_probs, save_uncertainty, overwrite,
                 with_image).check(group.size > 1)
  return Predictor(model, **settings).predict(
      source, output, save_probs=save_probs, save_uncertainty=save_uncertainty,
      overwrite=overwrite, keep_labels=keep_labels, with_image=with_image,
      postprocess=postprocess)
