"""The "writers" stage: the output arrays one prediction fills, and their finishing touches.

Each output is written under a temporary name (`hosts.atomic_output`: claimed, renamed into
place when the block ends without error): zarr v3 labels with attributes, an OME-Zarr (NGFF 0.5
multiscale labels with class names and colours, `ome_zarr`) or a TIFF (staged in memory, or in
the scratch zarr when out of core or shared, exported at the end); optionally the mean
probabilities (Z, Y, X, K) as zarr v3 or OME-Zarr, and the uncertainty maps (`uncertainty`).
With several processes, process 0 creates every array and the others open what it made; only
process 0 writes attributes, pyramids and the TIFF.
"""

from __future__ import annotations

import contextlib
import types
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

import bonejax
from bonejax.core.distributed import Group
from bonejax.data import store
from bonejax.evaluate import uncertainty
from bonejax.io import ome_zarr, tiff, voxel
from bonejax.predict import hosts, memory, postprocess
from bonejax.predict.plan import ModelInfo, Outputs, ScanPlan, Settings


def attributes(info: ModelInfo, settings: Settings, sets: list, job: ScanPlan,
               source: str) -> dict[str, Any]:
  """What every output records: model, plane sets, vote, classes, source, voxel size."""
  attrs = {"model": str(info.path) if info.path else info.meta.get("model"),
           "architecture": info.meta.get("model"), "planes": int(settings.planes),
           "plane_sets": [ps.name for ps in sets], "vote": settings.vote,
           "face_taper": int(settings.face_taper),
           "classes": info.classes, "source": source, "bonejax_version": bonejax.__version__}
  if job.input_um is not None:
    attrs.update(voxel.voxel_attrs(job.input_um))
  if job.regrid is not None:
    attrs["predicted_at_voxel_size_um"] = list(info.voxel_size_um)
  return attrs


class Writers:
  """The open outputs of one prediction (enter their contexts on `stack`, then `finish`)."""

  def __init__(self, group: Group, budget_bytes: int):
    self.group = group
    self.shared = group.size > 1
    self.context = memory.cache_context(budget_bytes, memory.CACHE_FRACTION / 2)
    self.labels_out = self.probs_out = self.unc = None
    self.labels_ome = self.probs_ome = None
    self.out_tmp = self.probs_tmp = None
    self.labels_ts = None     # where the run writes labels (labels_out, or scratch for a TIFF)
    self.want_memory = False  # whether the run keeps the labels in memory
    self.budget_bytes = budget_bytes
    self.postprocessed: list[dict] = []  # what each post-processing rule changed

  def _array(self, path, *args, **kw) -> ts.TensorStore:
    """An output array; several processes: process 0 makes it, the others open it."""
    make = lambda: store.create_array(path, *args, context=self.context, **kw)  # noqa: E731
    return hosts.shared_array(self.group, path, make, self.context, "output") if self.shared \
        else make()

  def _ome(self, path, *args, **kw) -> Any:
    """An OME-Zarr writer; several processes: process 0 makes it (and alone finishes it), the
    others write their shares into its level 0."""
    if not self.shared:
      return ome_zarr.OmeZarrWriter(path, *args, context=self.context, **kw)
    writer = (ome_zarr.OmeZarrWriter(path, *args, context=self.context, **kw)
              if self.group.is_main else None)
    self.group.barrier(f"create {Path(path).name}")
    if writer is not None:
      return writer
    level0 = hosts.open_array(Path(path) / "0", self.context, "output")
    return types.SimpleNamespace(view=level0 if kw.get("channels") is None
                                 else level0[ts.d[0].transpose[3]])

  def open(self, stack: contextlib.ExitStack, outs: Outputs, job: ScanPlan, classes: list[str],
           attrs: dict[str, Any], scratch: Path | None, keep_labels: bool) -> "Writers":
    """Claims and creates every output (temporary names, entered on `stack`)."""
    shape3, group = job.shape[:3], self.group
    if outs.output is not None:
      self.out_tmp = stack.enter_context(hosts.atomic_output(group, outs.output, outs.overwrite))
      if outs.kind == "zarr":
        self.labels_out = self._array(self.out_tmp, shape3, np.uint8)
      elif outs.kind == "ome-zarr":
        self.labels_ome = self._ome(self.out_tmp, shape3, np.uint8, kind="labels",
                                    classes=classes, voxel_size_um=job.input_um,
                                    name=Path(outs.output).name)
        self.labels_out = self.labels_ome.view
    if outs.save_probs is not None:
      self.probs_tmp = stack.enter_context(hosts.atomic_output(group, outs.save_probs,
                                                               outs.overwrite))
      if ome_zarr.is_ome_zarr_path(outs.save_probs):
        self.probs_ome = self._ome(self.probs_tmp, shape3, np.float32, kind="image",
                                   channels=len(classes), channel_names=classes,
                                   voxel_size_um=job.input_um, name=Path(outs.save_probs).name)
        self.probs_out = self.probs_ome.view
      else:
        self.probs_out = self._array(self.probs_tmp, shape3 + (len(classes),), np.float32)
    if outs.save_uncertainty is not None:
      self.unc = stack.enter_context(uncertainty.UncertaintyWriter(
          outs.save_uncertainty, shape3, overwrite=outs.overwrite, voxel_size_um=job.input_um,
          attrs=attrs, scratch=scratch, context=self.context))
    tiff = outs.kind == "tiff"
    self.want_memory = (keep_labels or (tiff and not job.out_of_core)) and not self.shared
    self.labels_ts = self.labels_out
    if (tiff and (job.out_of_core or self.shared)) or \
        (self.shared and keep_labels and self.labels_ts is None):
      self.labels_ts = self._array(scratch / "labels.zarr", shape3, np.uint8)
    return self

  def finish(self, outs: Outputs, job: ScanPlan, labels: np.ndarray | None,
             attrs: dict[str, Any], keep_labels: bool) -> np.ndarray | None:
    """Process 0 completes the outputs (attributes, pyramids, the TIFF); returns the labels
    kept in memory (read back from the shared scratch with several processes)."""
    if not self.group.is_main:
      return labels
    if self.shared and keep_labels:
      labels = self.labels_ts.read().result()
    if outs.postprocess:
      labels = self._postprocess(outs, labels, len(attrs.get("classes") or []))
      attrs = {**attrs, "postprocess": self.postprocessed}
    if outs.kind == "zarr":
      store.set_array_attrs(self.out_tmp, attrs)
    if self.labels_ome is not None:
      self.labels_ome.finish(attrs)
      if outs.with_image:  # the input image, the labels under its labels/ group
        ome_zarr.nest_under_image(self.out_tmp, job.src, voxel_size_um=job.input_um,
                                  attrs=attrs, context=self.context)
    probs_attrs = {**attrs, "content": "mean probabilities (Z, Y, X, K)"}
    if self.probs_ome is not None:
      self.probs_ome.finish(probs_attrs)
    elif self.probs_out is not None:
      store.set_array_attrs(self.probs_tmp, probs_attrs)
    if outs.kind == "tiff":
      tiff.export_tiff(labels if labels is not None else self.labels_ts, self.out_tmp,
                       overwrite=True, voxel_size_um=job.input_um)
    return labels

  def _postprocess(self, outs: Outputs, labels: np.ndarray | None, k: int) -> np.ndarray | None:
    """The clean-up rules on the labels in memory (then copied to the written array) or, out
    of core, on the written array slab by slab."""
    if labels is not None:
      self.postprocessed = postprocess.postprocess(labels, outs.postprocess, k,
                                                   budget_bytes=self.budget_bytes)
      if self.labels_ts is not None:
        self.labels_ts.write(labels).result()
    elif self.labels_ts is not None:
      self.postprocessed = postprocess.postprocess(self.labels_ts, outs.postprocess, k,
                                                   budget_bytes=self.budget_bytes)
    return labels
