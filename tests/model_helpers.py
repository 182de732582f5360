"""Shared by the model tests: BatchNorm statistics far from (0, 1), so that a wrong fold or
lowering shows in the logits."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

# Per field, how its values are drawn (in this order, channel vectors one after another).
_DRAWS = {"mean": lambda rng, c: rng.normal(0, 0.5, c),
          "var": lambda rng, c: rng.uniform(0.5, 2.0, c),
          "scale": lambda rng, c: rng.uniform(0.5, 1.5, c),
          "bias": lambda rng, c: rng.normal(0, 0.2, c)}


def randomise_batch_norm(model: nnx.Module, fields=("mean", "var", "scale", "bias"),
                         seed: int = 1) -> nnx.Module:
  """Draws `fields` of every nnx.BatchNorm in `model` in place (numpy, `seed`); returns it."""
  rng = np.random.default_rng(seed)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.BatchNorm):
      c = node.mean.shape[0]
      for name in _DRAWS:
        if name in fields:
          getattr(node, name)[...] = jnp.asarray(_DRAWS[name](rng, c), jnp.float32)
  return model
