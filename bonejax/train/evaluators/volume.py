"""The volume evaluator (type "volume"): the validation scans predicted whole, as predict.py
predicts them (plane sets, vote), and scored on the voted volume.

This is the metric the papers report (3-plane soft-voted IoU of whole scans); the plane-wise
evaluator scores single planes along one axis. It costs a whole prediction of every validation
scan, so it runs less often (`every_steps`, e.g. every 5th plane-wise evaluation).

Config fields: planes (1, 3, 9, 12; default 3), vote (soft | majority | max; default soft),
scans (default: the validation scans), batch_size (planes per device and call; default the
predictor's), memory_budget_gb (host memory for the prediction; beyond it, out of core).

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
from bonejax.evaluate import metrics
from bonejax.train import configlib

FIELDS = ("planes", "vote", "scans", "batch_size", "memory_budget_gb")
METRICS = {"miou_all": "max", "miou_fg": "max"}


class Evaluator:
  """`evaluator(state)` -> {miou_all, miou_fg, iou} of the voted validation volumes."""

  METRICS = METRICS

  def __init__(self, name: str, every_steps: int, *, dataset_path, scans, classes,
               graphdef_view, normalization: str, context_slices: int, in_channels: int,
               planes: int = 3, vote: str = "soft", batch_size: int = 0,
               memory_budget_gb: float = predict.DEFAULT_BUDGET_GB, graph: str = "auto"):
    self.name, self.every_steps = name, int(every_steps)
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
    if getattr(ctx, "input3d", None) is not None:
      raise errors.UserError(f"config.evaluators.{name}: the volume evaluator predicts by "
                             f"planes; a 3D model ({c.model.name}) validates with a planes "
                             "evaluator on 3D crops (remove this one)")
    scans = configlib.names(spec.get("scans", ())) or list(ctx.val_scans)
    graph = str(c.get("eval_graph", "auto"))
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
    for name in self.scans:
      scan = self.dataset.open_scan(name)
      labels = predict.predict_volume(engine, scan, stats=scan.stats, rule=self.normalization,
                                      planes=self.planes, vote=self.vote,
                                      memory_budget_gb=self.memory_budget_gb)
      cm += metrics.confusion_matrix(labels, scan.read_labels(), k,
                                     ignore=self.dataset.unlabelled).astype(np.int64)
    if jax.process_count() > 1:  # one decision for all: process 0's matrix
      from jax.experimental import multihost_utils
      # int32 halves: without jax_enable_x64 an int64 array would be cut to int32.
      hi, lo = multihost_utils.broadcast_one_to_all(
          ((cm >> 31).astype(np.int32), (cm & (2**31 - 1)).astype(np.int32)))
      cm = (np.asarray(hi).astype(np.int64) << 31) + np.asarray(lo).astype(np.int64)
    s = metrics.scores(cm, self.classes)
    return {"miou_all": s["miou_all"], "miou_fg": s["miou_fg"], "iou": s["iou"]}
