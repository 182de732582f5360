"""Optimisers, learning-rate schedules and the reduce-on-plateau rule.

    tx = make_optimizer(config.optimizer, make_schedule(config.schedule, lr, num_steps))
    updates, opt_state = tx.update(grads, opt_state, params)
    updates = scale_updates(updates, lr_scale)      # the plateau factor, a traced scalar

Reduce-on-plateau (Scaling the U-net: halve the learning rate when the validation loss has not
improved for N evaluations) lives on the host in `Plateau`: it sees one number per evaluation,
its state is three JSON numbers checkpointed with the run, and its factor reaches the jitted step
as an argument (a device scalar replaced only when it changes), so the step compiles once.
Multiplying the updates by the factor is exactly multiplying the learning rate for Adam, AdamW
(optax applies the weight decay before the learning rate) and SGD with momentum (the trace is
taken before the learning rate), so the optimiser state never needs rewriting.

Weight decay is decoupled (AdamW, Loshchilov & Hutter) and only `adamw` takes it: `adam` and
`sgd` with a non-zero `weight_decay` are refused rather than silently training without it (an
L2 term inside Adam is not the same regulariser, so `adam` does not quietly become `adamw`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import optax

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "plateau")


def _get(cfg: Any, key: str, default: Any) -> Any:
  if cfg is None:
    return default
  if isinstance(cfg, Mapping):
    return cfg.get(key, default)
  return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def make_schedule(cfg: Any, lr: float, num_steps: int) -> optax.Schedule:
  """constant | cosine (warm-up then cosine to `final_lr_fraction`) | plateau (constant base).

  `warmup_steps` (linear from 0) applies to every kind.
  """
  name = str(_get(cfg, "name", "constant"))
  warmup = int(_get(cfg, "warmup_steps", 0))
  if name not in SCHEDULES:
    raise ValueError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
  if lr <= 0:
    raise ValueError(f"learning rate must be positive, got {lr}")
  if warmup < 0:
    raise ValueError(f"warmup_steps={warmup} must be >= 0")
  if name == "cosine":
    end = float(_get(cfg, "final_lr_fraction", 0.0)) * lr
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(int(num_steps), warmup + 1),
                                              end_value=end)
  if warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                 optax.constant_schedule(lr)], [warmup])
  return optax.constant_schedule(lr)


def make_optimizer(cfg: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
  """adam | adamw (decoupled `weight_decay`) | sgd (momentum), optionally after clipping by
  global norm (`clip_norm` > 0)."""
  name = str(_get(cfg, "name", "adam"))
  b1, b2 = float(_get(cfg, "b1", 0.9)), float(_get(cfg, "b2", 0.999))
  eps = float(_get(cfg, "eps", 1e-8))
  if name in ("adam", "sgd") and float(_get(cfg, "weight_decay", 0.0)):
    raise ValueError(f"{name} does not use weight_decay={_get(cfg, 'weight_decay', 0.0)}: set "
                     "optimizer.name=adamw for decoupled weight decay, or "
                     "optimizer.weight_decay=0")
  if name == "adam":
    tx = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
  elif name == "adamw":
    tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps,
                     weight_decay=float(_get(cfg, "weight_decay", 1e-4)))
  elif name == "sgd":
    tx = optax.sgd(schedule, momentum=float(_get(cfg, "momentum", 0.9)) or None,
                   nesterov=bool(_get(cfg, "nesterov", False)))
  else:
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
  clip = float(_get(cfg, "clip_norm", 0.0))
  if clip < 0:
    raise ValueError(f"clip_norm={clip} must be >= 0")
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx


def scale_updates(updates, scale):
  return jax.tree.map(lambda u: u * scale.astype(u.dtype), updates)


class Plateau:
  """Host-side reduce-on-plateau: multiply the learning rate by `factor` after `patience`
  evaluations without improvement of a lower-is-better value (the validation loss).

  An evaluation improves when value < best * (1 - rtol); the counter restarts after each cut.
  Disabled (scale stays 1) when patience <= 0.
  """

  def __init__(self, patience: int, factor: float = 0.5, min_scale: float = 0.0,
               rtol: float = 0.0):
    if not 0.0 < factor <= 1.0:
      raise ValueError(f"plateau factor={factor} must be in (0, 1]")
    self.patience, self.factor = int(patience), float(factor)
    self.min_scale, self.rtol = float(min_scale), float(rtol)
    self.best = math.inf
    self.bad = 0
    self.scale = 1.0

  @property
  def enabled(self) -> bool:
    return self.patience > 0

  def update(self, value: float) -> bool:
    """Feeds one evaluation; True when the scale changed."""
    if not self.enabled or value is None or not math.isfinite(value):
      return False
    if value < self.best * (1.0 - self.rtol) or self.best == math.inf:
      self.best, self.bad = float(value), 0
      return False
    self.bad += 1
    if self.bad < self.patience:
      return False
    self.bad = 0
    new = max(self.scale * self.factor, self.min_scale)
    changed = new != self.scale
    self.scale = new
    return changed

  def get_state(self) -> dict[str, float]:
    return {"best": None if self.best == math.inf else self.best, "bad": self.bad,
            "scale": self.scale}

  def set_state(self, state: Mapping[str, Any]) -> None:
    best = state.get("best")
    self.best = math.inf if best is None else float(best)
    self.bad, self.scale = int(state.get("bad", 0)), float(state.get("scale", 1.0))


def plateau_from_config(cfg: Any) -> Plateau:
  """A `Plateau` for schedule `plateau`; a disabled one for every other schedule."""
  if str(_get(cfg, "name", "constant")) != "plateau":
    return Plateau(0)
  patience = int(_get(cfg, "plateau_patience", 10))
  if patience < 1:
    raise ValueError(f"plateau_patience={patience} must be >= 1")
  return Plateau(patience, float(_get(cfg, "plateau_factor", 0.5)),
                 float(_get(cfg, "plateau_min_scale", 0.0)), float(_get(cfg, "plateau_rtol", 0.0)))
