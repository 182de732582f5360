"""Padding to the zoo's stride, parameter counts and XLA FLOP counts."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def pad_to_multiple(x: Any, multiple: int = 32, mode: str = "reflect"):
  """Pads the H, W axes (-3, -2) of an NHWC (or HWC) array at the bottom/right.

  Returns `(padded, (h, w))`; `crop_to(y, (h, w))` undoes it on the model output. Works on numpy
  (stays numpy, for host-side tiling) and jax arrays. Reflection longer than the side itself
  repeats the reflection, so even a 1-pixel-wide plane pads cleanly.
  """
  if x.ndim < 3:
    raise ValueError(f"pad_to_multiple expects (..., H, W, C), got shape {tuple(x.shape)}")
  h, w = int(x.shape[-3]), int(x.shape[-2])
  ph, pw = -h % multiple, -w % multiple
  if ph == 0 and pw == 0:
    return x, (h, w)
  widths = [(0, 0)] * (x.ndim - 3) + [(0, ph), (0, pw), (0, 0)]
  if mode in ("reflect", "symmetric") and (h == 1 or w == 1):
    mode = "edge"  # nothing to reflect along a side of length 1
  xp = np if isinstance(x, np.ndarray) else jnp
  return xp.pad(x, widths, mode=mode), (h, w)


def crop_to(x: Any, hw: Sequence[int]):
  """Inverse of `pad_to_multiple`: keeps the top-left (h, w) of the H, W axes (-3, -2)."""
  h, w = int(hw[0]), int(hw[1])
  return x[..., :h, :w, :]


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters (nnx.Param leaves; BatchNorm running stats excluded).

  Works on an abstract model from `nnx.eval_shape`, so nothing needs to be allocated.
  """
  return int(sum(int(np.prod(leaf.shape))
                 for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))))


def abstract_model(factory, *args, **kwargs) -> nnx.Module:
  """`factory(*args, **kwargs)` with ShapeDtypeStructs instead of arrays (no memory, no FLOPs).

  `rngs` (default `nnx.Rngs(0)`) is passed through `nnx.eval_shape` rather than closed over,
  as NNX requires for state that the traced function mutates.
  """
  rngs = kwargs.pop("rngs", None) or nnx.Rngs(0)
  return nnx.eval_shape(lambda r: factory(*args, rngs=r, **kwargs), rngs)


def forward_gflops(model: nnx.Module, patch: int | Sequence[int], in_channels: int,
                   batch: int = 1) -> float:
  """GFLOP of one inference forward pass on `batch` patches, from XLA's cost analysis.

  The forward (BatchNorm in eval mode, dropout off) is lowered and compiled on abstract shapes,
  so `model` may come from `nnx.eval_shape` and nothing large is allocated.

  Convention: XLA's HloCostAnalysis counts a convolution or dot as 2 FLOP per multiply-add
  (FLOP = 2 x MAC), the usual convention and the contract's; tests/test_models.py checks it on a
  hand-counted conv. Element-wise work (BatchNorm, activations, adds) is included too, which
  adds a few percent over a pure MAC count.
  """
  h, w = (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))
  model = nnx.view(model, use_running_average=True, deterministic=True, raise_if_not_found=False)
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)

  def forward(state, x):
    return nnx.merge(graphdef, state)(x)

  x = jax.ShapeDtypeStruct((batch, h, w, in_channels), jnp.float32)
  cost = jax.jit(forward).lower(state, x).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per device program
    cost = cost[0]
  return float(cost["flops"]) / 1e9
