"""The volume evaluator (type "volume"): the validation scans predicted whole, as predict.py
predicts them (plane sets and vote; a 3D model: 3D sliding windows), and scored on the volume.

This is the metric the papers report (3-plane soft-voted IoU of whole scans); the plane-wise
evaluator scores single planes along one axis. It costs a whole prediction of every validation
scan, so it runs less often (`every_steps`, e.g. every 5th plane-wise evaluation).

Config fields: planes (1, 3, 9, 12; default 3), vote (soft | majority | max; default soft),
scans (default: the validation scans), batch_size (planes per device and call; default the
predictor's), memory_budget_gb (host memory for the prediction; beyond it, out of core).
A 3D model (unet3d, unet3d_resnet18) is predicted as predict.py predicts its bundle, by 3D
sliding windows with Gaussian blending (`predict.predict_volume_3d`): window (default the
config's predict_window, else its patch), overlap (default predict_overlap, else 0.5) and
batch_size (windows per device and call; default 2) replace planes and vote (refused there).

Besides miou_all / miou_fg it reports border_miou_fg and interior_miou_fg: the foreground mean
IoU in the outer 2 voxels of the volumes against the rest (evaluate.border, issue 28's edges).
They come from the same bincount as the whole matrix (the truth shifted by C in the band), so
they cost a mask of the volume, nothing next to predicting it.

It uses only bonejax.predict's public functions (`make_engine`, `predict_volume`) on the
in-memory model: the current weights, in the eval view (BatchNorm running statistics), computed
as predict.py computes a bundle (the inference graph). The compiled engine is kept between
evaluations and given the new weights when their structure is the same, so each plane shape
compiles once per run. With several processes every one predicts (the engine uses its local
devices) and process 0's confusion matrix is broadcast, so all take the same decisions.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from bonejax import predict
from bonejax.core import errors
from bonejax.data import store
from bonejax.evaluate import border, metrics
from bonejax.train import configlib

FIELDS = ("planes", "vote", "scans", "batch_size", "memory_budget_gb", "window", "overlap")
METRICS = {"miou_all": "max", "miou_fg": "max", "border_miou_fg": "max",
           "interior_miou_fg": "max"}
_PLANAR, _WINDOWED = ("planes", "vote"), ("window", "overlap")


class Evaluator:
  """`evaluator(state)` -> {miou_all, miou_fg, border_miou_fg, interior_miou_fg, iou} of the
  predicted validation volumes. `window` (a 3D model): predicted by 3D windows of that side
  (or D, H, W) with `overlap`, instead of plane sets."""

  METRICS = METRICS

  def __init__(self, name: str, every_steps: int, *, dataset_path, scans, classes,
               graphdef_view, normalization: str, context_slices: int, in_channels: int,
               planes: int = 3, vote: str = "soft", batch_size: int = 0,
               memory_budget_gb: float = predict.DEFAULT_BUDGET_GB, graph: str = "auto",
               window: int | tuple[int, ...] | None = None, overlap: float = 0.5):
    self.name, self.every_steps = name, int(every_steps)
    self.window, self.overlap = window, float(overlap)
    if window is not None and not 0.0 <= self.overlap < 1.0:
      raise errors.UserError(f"config.evaluators.{name}.overlap={overlap} must be in [0, 1)")
    if int(planes) not in predict.PLANES:
      raise errors.UserError(f"config.evaluators.{name}.planes={planes}; known: "
                             f"{', '.join(map(str, predict.PLANES))}")
    try:
      predict.check_vote(vote)
    except (ValueError, errors.UserError) as e:
      raise errors.UserError(f"config.evaluators.{name}.vote: {errors.one_line(e)}") from None
    if not scans:
      raise errors.UserError(f"config.evaluators.{name}: no scans to predict (no validation "
                             "scans, and no `scans` given)")
    self.dataset = store.open_dataset(dataset_path)
    missing = sorted(set(scans) - set(self.dataset.scans))
    if missing:
      raise errors.UserError(f"config.evaluators.{name}.scans: {', '.join(missing)} not in "
                             f"{dataset_path}")
    self.scans, self.classes = list(scans), list(classes)
    self.graphdef_view, self.normalization = graphdef_view, normalization
    self.context_slices, self.in_channels = int(context_slices), int(in_channels)
    self.planes, self.vote, self.graph = int(planes), str(vote), graph
    self.memory_budget_gb = float(memory_budget_gb)
    self.engine_kw = {"batch_size": int(batch_size)} if batch_size else {}
    self._engine = None

  @classmethod
  def from_config(cls, name: str, spec: dict[str, Any], ctx) -> "Evaluator":
    c = ctx.config
    is3d = getattr(ctx, "input3d", None) is not None
    wrong = [k for k in (_PLANAR if is3d else _WINDOWED) if k in spec]
    if wrong:
      raise errors.UserError(
          f"config.evaluators.{name}: {', '.join(wrong)} "
          + (f"are for 2D models; a 3D model ({c.model.name}) is predicted by 3D windows "
             "(window, overlap)" if is3d else "are for 3D models (planes, vote for 2D)"))
    scans = configlib.names(spec.get("scans", ())) or list(ctx.val_scans)
    graph = str(c.get("eval_graph", "auto"))
    if is3d:
      from bonejax.predict import windows3d  # pylint: disable=import-outside-toplevel
      window = spec.get("window") or c.get("predict_window") or c.patch_size
      return cls(name, spec["every_steps"], dataset_path=ctx.dataset_path, scans=scans,
                 classes=ctx.classes, graphdef_view=ctx.model_graphs.view,
                 normalization=str(c.normalization), context_slices=0,
                 in_channels=int(c.in_channels),
                 batch_size=int(spec.get("batch_size", windows3d.DEFAULT_BATCH)),
                 memory_budget_gb=float(spec.get("memory_budget_gb",
                                                 windows3d.DEFAULT_BUDGET_GB)),
                 window=tuple(window) if isinstance(window, (list, tuple)) else int(window),
                 overlap=float(spec.get("overlap", c.get("predict_overlap",
                                                         windows3d.DEFAULT_OVERLAP))))
    return cls(name, spec["every_steps"], dataset_path=ctx.dataset_path, scans=scans,
               classes=ctx.classes, graphdef_view=ctx.model_graphs.view,
               normalization=str(c.normalization), context_slices=int(c.context_slices),
               in_channels=1 if int(c.context_slices) else int(c.in_channels),
               planes=int(spec.get("planes", 3)), vote=str(spec.get("vote", "soft")),
               batch_size=int(spec.get("batch_size", 0)),
               memory_budget_gb=float(spec.get("memory_budget_gb", predict.DEFAULT_BUDGET_GB)),
               graph="off" if graph == "off" else "auto")

  def _engine_for(self, state) -> Any:
    # The weights on the host: the engine places them on its own (local) devices.
    params, rest = jax.device_get((state["params"], state["rest"]))
    model = nnx.merge(self.graphdef_view, params, rest)
    if self.window is not None:
      engine = predict.make_window_engine(model)
    else:
      engine = predict.make_engine(model, in_channels=self.in_channels,
                                   context_slices=self.context_slices,
                                   memory_budget_gb=self.memory_budget_gb, graph=self.graph,
                                   **self.engine_kw)
    old = self._engine
    if old is not None and getattr(old, "state", None) is not None and \
        jax.tree.structure(old.state) == jax.tree.structure(getattr(engine, "state", None)):
      old.state = engine.state  # the same program, new weights: no recompilation
      return old
    self._engine = engine
    return engine

  def __call__(self, state) -> dict[str, Any]:
    engine = self._engine_for(state)
    k = len(self.classes)
    cm = np.zeros((k, k), np.int64)
    # (border band, interior): their sum is the whole volume's matrix.
    cms = np.zeros((2, k, k), np.int64)
    for name in self.scans:
      scan = self.dataset.open_scan(name)
      if self.window is not None:
        labels = predict.predict_volume_3d(
            engine, scan.image, stats=scan.stats, normalization=self.normalization,
            window=self.window, overlap=self.overlap, memory_budget_gb=self.memory_budget_gb,
            **({"batch_size": self.engine_kw["batch_size"]} if self.engine_kw else {})).labels
      else:
        labels = predict.predict_volume(engine, scan, stats=scan.stats,
                                        rule=self.normalization, planes=self.planes,
                                        vote=self.vote, memory_budget_gb=self.memory_budget_gb)
      cms += np.stack(border.slab_confusion(labels, scan.read_labels(), labels.shape, k,
                                            border.BAND, ignore=self.dataset.unlabelled))
    if jax.process_count() > 1:  # one decision for all: process 0's matrices
      from jax.experimental import multihost_utils
      # int32 halves: without jax_enable_x64 an int64 array would be cut to int32.
      hi, lo = multihost_utils.broadcast_one_to_all(
          ((cms >> 31).astype(np.int32), (cms & (2**31 - 1)).astype(np.int32)))
      cms = (np.asarray(hi).astype(np.int64) << 31) + np.asarray(lo).astype(np.int64)
    s = metrics.scores(cms.sum(axis=0), self.classes)
    sb, si = (metrics.scores(m, self.classes) for m in cms)
    return {"miou_all": s["miou_all"], "miou_fg": s["miou_fg"], "iou": s["iou"],
            "border_miou_fg": sb["miou_fg"], "interior_miou_fg": si["miou_fg"]}
