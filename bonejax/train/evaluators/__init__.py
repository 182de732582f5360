"""Validation during training: pluggable evaluators, as big_vision's `evaluators/`.

The config names them (`config.evaluators`, a dict name -> {type, every_steps, ...}); each type
is a module here with one `Evaluator` class:

  planes  the jitted plane-wise validation (loss, IoU) on every k-th plane of the validation
          scans, whole or cropped: cheap, every `eval_every` steps (today's evaluator, "val")
  volume  the validation scans predicted whole with the configured plane sets and vote
          (bonejax.predict), scored on the voted volume: the metric the papers report

An evaluator is called with the train state and returns its scores (floats, plus a per-class
`iou` list); the trainer logs them as NAME_METRIC columns and `best_metric` may name any of
them as `NAME/METRIC` (a bare METRIC means the evaluator named "val"). `every_steps` defaults
to `config.eval_every`; every evaluator also runs at the last step. Unknown types, metrics or
fields are refused before anything is written.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from bonejax.core import errors

TYPES = ("planes", "volume")
DEFAULT = "val"  # the evaluator a bare best_metric ("miou_fg") names


class Evaluator(Protocol):
  name: str
  every_steps: int
  METRICS: dict[str, str]  # scalar metric -> "max" | "min" (which way is better)

  def __call__(self, state: Any) -> dict[str, Any]: ...


@dataclasses.dataclass
class Context:
  """What the trainer knows that evaluators need (each takes what its type uses)."""
  config: Any
  dataset_path: Path
  val_scans: Sequence[str]
  classes: list[str]
  mesh: Any
  loss_fn: Callable
  model_graphs: Any  # setup.Graphs: the training, validation and eval-view graph definitions
  cache: Any  # steps.StepCache
  input3d: Any = None  # a 3D model: train.input3d.Input3d (its validation crops), else None
  val_batch3d: int = 0  # the batch size those validation crops come in


def module(type_name: str):
  if type_name not in TYPES:
    raise errors.UserError(f"evaluator type {type_name!r}; known: {', '.join(TYPES)}")
  return importlib.import_module(f"bonejax.train.evaluators.{type_name}")


def specs(config) -> dict[str, dict[str, Any]]:
  """config.evaluators as plain dicts, checked: {name: {type, every_steps, ...}}."""
  raw = config.get("evaluators") or {}
  out = {}
  for name, spec in (raw.to_dict() if hasattr(raw, "to_dict") else dict(raw)).items():
    where = f"config.evaluators.{name}"
    if not isinstance(spec, dict) or "type" not in spec:
      raise errors.UserError(f"{where} must be a dict with a type ({', '.join(TYPES)})")
    spec = dict(spec)
    every = spec.setdefault("every_steps", int(config.eval_every))
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
      raise errors.UserError(f"{where}.every_steps={every!r} must be an integer >= 0 "
                             "(0: only at the end)")
    known = ("type", "every_steps") + tuple(module(spec["type"]).FIELDS)
    unknown = sorted(set(spec) - set(known))
    if unknown:
      raise errors.UserError(f"{where} has unknown field(s) {', '.join(unknown)}; a "
                             f"{spec['type']} evaluator takes {', '.join(known)}")
    out[str(name)] = spec
  if not out:
    raise errors.UserError("config.evaluators is empty: name at least one evaluator")
  return out


def metric_modes(config) -> dict[str, str]:
  """Every 'NAME/METRIC' best_metric may name -> 'max' | 'min'."""
  out = {}
  for name, spec in specs(config).items():
    for metric, mode in module(spec["type"]).METRICS.items():
      out[f"{name}/{metric}"] = mode
  return out


def resolve_metric(config) -> tuple[str, str, str]:
  """(evaluator name, metric, mode) of config.best_metric; bare names mean the 'val' one."""
  full = str(config.best_metric)
  if "/" not in full:
    full = f"{DEFAULT}/{full}"
  modes = metric_modes(config)
  if full not in modes:
    raise errors.UserError(f"best_metric={config.best_metric!r}; known: {', '.join(modes)}")
  name, metric = full.split("/", 1)
  return name, metric, modes[full]


def build(ctx: Context) -> list[Evaluator]:
  return [module(spec["type"]).Evaluator.from_config(name, spec, ctx)
          for name, spec in specs(ctx.config).items()]


def columns(config, classes: Sequence[str]) -> list[str]:
  """The metrics.csv columns of the configured evaluators: NAME_METRIC, NAME_iou_CLASS."""
  out = []
  for name, spec in specs(config).items():
    out += [f"{name}_{m}" for m in module(spec["type"]).METRICS]
    out += [f"{name}_iou_{c}" for c in classes]
  return out


def row(name: str, scores: dict[str, Any], classes: Sequence[str]) -> dict[str, Any]:
  """One evaluation's scores as metrics.csv / TensorBoard fields."""
  out = {f"{name}_{k}": v for k, v in scores.items() if k != "iou"}
  out.update({f"{name}_iou_{c}": v for c, v in zip(classes, scores.get("iou", ()))})
  return out
