"""The pure step functions of training and the cache of their compiled forms.

- `make_init` builds the train state {params, rest, opt, step} (rest: BatchNorm statistics and
  other non-parameter state), optionally overlaid with pretrained weights.
- `make_train_step` is (state, batch, lr_scale) -> (state, metrics): augmentation on the
  device, forward, loss, gradients, the optimiser update, the encoder freeze.
- `StepCache` keeps the jitted functions of one configuration, so runs in one process that
  share it (cross-validation folds) compile once. It is an object a caller passes in, not a
  module global: what it holds (device memory of executables) lives as long as the caller wants.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bonejax.train import augment as augment_lib
from bonejax.train import optim, pretrained

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def rng_key(seed: int, stream: int) -> jax.Array:
  # "rbg" keys: XLA's RngBitGenerator compiles in a fraction of threefry's time (a tiny U-Net's
  # initialiser: 3 s instead of 26 s on a CPU), and its values were checked to be the same on
  # 1 and 4 devices (tests/test_distributed.py). Its bits may change with the backend or the
  # jax version: resume is bit-exact on one machine type only (trainer.py's docstring).
  return jax.random.fold_in(jax.random.key(seed, impl="rbg"), stream)


def make_init(create: Callable, tx: optax.GradientTransformation, seed: int) -> Callable:
  """(weights=None) -> the initial train state; `create(rngs=...)` builds the model, and
  `weights` ({state path: array}, pretrained.initial_weights) replaces some of its values."""

  def init_fn(weights=None):
    model = create(rngs=nnx.Rngs(rng_key(seed, 0)))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    if weights:
      params, rest = pretrained.overlay(params, weights), pretrained.overlay(rest, weights)
    return {"params": params, "rest": rest, "opt": tx.init(params),
            "step": jnp.zeros((), jnp.int32)}

  return init_fn


def make_train_step(graphdef, tx: optax.GradientTransformation, loss_fn: Callable,
                    augment_cfg: Any, seed: int, schedule: optax.Schedule | None = None,
                    freeze_encoder_steps: int = 0,
                    augment_fn: Callable | None = None) -> Callable:
  """(state, batch, lr_scale) -> (state, metrics); state = dict(params, rest, opt, step).

  `augment_fn(key, image, label)`, when given, augments instead of `augment_cfg`'s 2D
  augmentation (a 3D model: `input3d.augment_fn`).

  For the first `freeze_encoder_steps` steps the encoder's parameters and their optimiser
  state keep their values (pretrained.freeze)."""
  aug = augment_lib.resolve_config(augment_cfg)

  def step_fn(state, batch, lr_scale):
    step = state["step"]
    key = jax.random.fold_in(rng_key(seed, 1), step)
    if augment_fn is not None:
      image, label = augment_fn(key, batch["image"], batch["label"])
    else:
      image, label = augment_lib.augment(key, batch["image"], batch["label"], aug)

    def loss_of(params):
      model = nnx.merge(graphdef, params, state["rest"], copy=True)
      logits = model(image)
      loss, parts = loss_fn(logits, label)
      _, _, rest = nnx.split(model, nnx.Param, ...)  # BatchNorm statistics, updated in train mode
      return loss, (parts, rest)

    (loss, (parts, rest)), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], optim.scale_updates(updates, lr_scale))
    if freeze_encoder_steps:
      frozen = step < freeze_encoder_steps
      params = pretrained.freeze(params, state["params"], frozen)
      opt = pretrained.freeze(opt, state["opt"], frozen)
    out = {"loss": loss, "grad_norm": optax.tree.norm(grads),
           **{f"loss_{k}": v for k, v in parts.items()}}
    if schedule is not None:
      out["lr"] = schedule(step) * lr_scale
    return {"params": params, "rest": rest, "opt": opt, "step": step + 1}, out

  return step_fn


class StepCache:
  """Compiled functions by role ("train", "eval", ...), one configuration per role.

  `get(role, key, build)` returns what `build()` made for the same `key` last time, else builds
  anew and drops the role's previous entry (executables hold device memory).
  """

  def __init__(self):
    self._entries: dict[str, tuple[str, Any]] = {}

  def get(self, role: str, key: str, build: Callable[[], Any]) -> Any:
    held = self._entries.get(role)
    if held is not None and held[0] == key:
      return held[1]
    self._entries.pop(role, None)
    value = build()
    self._entries[role] = (key, value)
    return value
