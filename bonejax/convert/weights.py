"""smp state dicts (numpy) <-> bonejax models, with every key and shape checked.

`model_from_state_dict` builds the bonejax model abstractly (no memory, no XLA compile), checks
the state dict against the layout derived from it (missing keys, unexpected keys, shapes), and
fills the model from the checkpoint: parameters and BatchNorm statistics from the weights, the
stochastic layers' RNG streams freshly seeded. `state_dict_from_model` is the inverse.
"""

from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bonejax.core import errors
from bonejax import models
from bonejax.convert import smp_layout

_SHOW = 3  # keys named in an error message


def _some(keys) -> str:
  keys = sorted(keys)
  more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
  return ", ".join(keys[:_SHOW]) + more


def check_keys(name: str, entries: list[smp_layout.Entry], bns: list[str],
               sd: dict[str, np.ndarray]) -> None:
  """`errors.UserError` naming what is missing, unexpected or misshapen, in that order."""
  expected = {e.key for e in entries}
  optional = {f"{bn}.{smp_layout.NUM_BATCHES}" for bn in bns}
  missing = expected - set(sd)
  unexpected = set(sd) - expected - optional
  smp_class, encoder = smp_layout.smp_arch(name)
  what = f"{name} (smp {smp_class}, encoder {encoder})"
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"{len(missing)} missing key(s): {_some(missing)}")
    if unexpected:
      parts.append(f"{len(unexpected)} unexpected key(s): {_some(unexpected)}")
    raise errors.UserError(f"the weights do not fit {what}: {'; '.join(parts)}")
  for e in entries:
    got = tuple(np.shape(sd[e.key]))
    if got != e.torch_shape:
      raise errors.UserError(f"the weights do not fit {what}: {e.key} has shape {got}, "
                          f"{e.torch_shape} expected")
    if not np.issubdtype(np.asarray(sd[e.key]).dtype, np.floating) \
        and np.asarray(sd[e.key]).dtype.name != "bfloat16":
      raise errors.UserError(f"{e.key} is {np.asarray(sd[e.key]).dtype}, not floating point")


def model_from_state_dict(name: str, sd: dict[str, np.ndarray], *, num_classes: int,
                          in_channels: int, model_kwargs: dict[str, Any] | None = None,
                          seed: int = 0) -> nnx.Module:
  """The bonejax model `name` holding the smp weights `sd` (in eval mode)."""
  try:
    abstract = models.abstract_model(models.create, name, num_classes=num_classes,
                                     in_channels=in_channels, **(model_kwargs or {}))
  except (ValueError, TypeError) as e:
    raise errors.UserError(f"cannot build model {name!r}: {e}") from None
  entries, bns = smp_layout.layout(name, abstract)
  check_keys(name, entries, bns, sd)
  values = {e.path: smp_layout.to_flax(np.asarray(sd[e.key], np.float32)) for e in entries}
  graphdef, state = nnx.split(abstract)
  counter = iter(range(1 << 30))

  def fill(path, a):
    key = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    if key in values:
      return jnp.asarray(values[key], a.dtype)
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):  # a dropout / stochastic-depth stream
      return jax.random.key(seed + next(counter))
    return jnp.zeros(a.shape, a.dtype)  # the streams' counters

  model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))
  model.eval()
  return model


def state_dict_from_model(name: str, model: nnx.Module) -> dict[str, np.ndarray]:
  """The smp state dict of a bonejax model: torch layouts, float32, num_batches_tracked = 0."""
  entries, bns = smp_layout.layout(name, model)
  flat = dict(smp_layout.weight_paths(model))
  sd: dict[str, np.ndarray] = collections.OrderedDict()
  for e in entries:
    sd[e.key] = smp_layout.to_torch(np.asarray(jax.device_get(flat[e.path][...]), np.float32))
  for bn in bns:
    sd[f"{bn}.{smp_layout.NUM_BATCHES}"] = np.zeros((), np.int64)
  return sd

