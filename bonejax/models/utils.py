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


def fill_from_numpy(abstract: nnx.Module, seed: int = 0) -> nnx.Module:
  """A concrete model from an abstract one, with weights drawn by numpy (no XLA compiles).

  Real initialisation compiles one RNG kernel per parameter shape, which takes tens of seconds
  on a small CPU; tests and benchmarks that only need plausible weights use this instead.
  Kernels are He-normal in their fan-in; BatchNorm scales and variances 1, the rest 0.
  """
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)

  def fill(path, a):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      return jax.random.key(seed)
    if len(a.shape) >= 2:
      fan_in = int(np.prod(a.shape[:-1]))
      return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_in), a.shape), a.dtype)
    name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
    ones = name in ("scale", "var")
    return jnp.ones(a.shape, a.dtype) if ones else jnp.zeros(a.shape, a.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def patch_shape(model: nnx.Module, patch: int | Sequence[int]) -> tuple[int, ...]:
  """The patch's spatial shape for `model`: one number is a square for a 2D model and a cube
  for a 3D one (`spatial_dims`); a sequence must have as many sides as the model's input."""
  dims = int(getattr(model, "spatial_dims", 0) or 0)
  if isinstance(patch, (int, np.integer)):
    return (int(patch),) * (dims or 2)
  sides = tuple(int(v) for v in patch)
  if dims and len(sides) != dims:
    raise ValueError(f"patch {list(sides)} has {len(sides)} sides; {type(model).__name__} "
                     f"takes {dims}D input ({'D, H, W' if dims == 3 else 'H, W'})")
  return sides


def _inference_forward(model: nnx.Module, patch, in_channels: int, batch: int):
  """(pure forward fn, abstract state, abstract input) with BatchNorm in eval, dropout off."""
  sides = patch_shape(model, patch)
  model = nnx.view(model, use_running_average=True, deterministic=True, raise_if_not_found=False)
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)

  def forward(state, x):
    return nnx.merge(graphdef, state)(x)

  return forward, state, jax.ShapeDtypeStruct((batch, *sides, in_channels), jnp.float32)


def _sub_jaxprs(params):
  for v in params.values():
    for item in (v if isinstance(v, (list, tuple)) else (v,)):
      if hasattr(item, "eqns"):
        yield item
      elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
        yield item.jaxpr


def _dense_macs(jaxpr) -> int:
  """Multiply-adds of every convolution and matrix product, padding taps included."""
  macs = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial) axes of the kernel
      taps = rhs[spec[1]] * int(np.prod([rhs[d] for d in spec[2:]]))
      # A transposed conv is a conv over a zero-dilated input: count only the real inputs.
      dilation = int(np.prod(eqn.params.get("lhs_dilation") or (1,)))
      macs += int(np.prod(eqn.outvars[0].aval.shape)) * taps // dilation
    elif name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      k = int(np.prod([lhs[d] for d in contract]))
      macs += int(np.prod(eqn.outvars[0].aval.shape)) * k
    for sub in _sub_jaxprs(eqn.params):
      macs += _dense_macs(sub)
  return macs


def forward_gflops(model: nnx.Module, patch: int | Sequence[int], in_channels: int,
                   batch: int = 1, convention: str = "dense") -> float:
  """GFLOP of one inference forward pass on `batch` patches (FLOP = 2 x MAC).

  `patch`: one side (a square for a 2D model, a cube for a 3D one: `spatial_dims`) or the
  sides (H, W) or (D, H, W); the input is (batch, *sides, in_channels).

  BatchNorm runs in eval mode and dropout is off; everything is traced or compiled on abstract
  shapes, so `model` may come from `nnx.eval_shape` and nothing large is allocated.

  convention="dense" (default): 2 x the multiply-adds of all convolutions and matrix products,
    counted from the jaxpr as PyTorch counters (fvcore, ptflops, thop) count them - every kernel
    tap, zero padding included; element-wise work is not counted. This is the convention of the
    published segmentation_models_pytorch figures (unet_resnet18 at 256x256: ~10.6 GFLOP).
  convention="xla": XLA's own cost analysis of the compiled forward
    (`jit(...).lower(...).compile().cost_analysis()["flops"]`). It also counts 2 FLOP per
    multiply-add, but only for taps that land inside the input (a 3x3 "same" conv on an 8x8 map
    is 2*22*22*Cin*Cout, not 2*64*9*Cin*Cout; tests/test_models.py checks both by hand), and it
    adds element-wise ops. For unet_resnet18 at 256x256 it is ~4 % below the dense count.
  """
  forward, state, x = _inference_forward(model, patch, in_channels, batch)
  if convention == "dense":
    return 2 * _dense_macs(jax.make_jaxpr(forward)(state, x).jaxpr) / 1e9
  if convention == "xla":
    cost = jax.jit(forward).lower(state, x).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # jax < 0.4.3x returned one dict per program
      cost = cost[0]
    return float(cost["flops"]) / 1e9
  raise ValueError(f"convention must be 'dense' or 'xla', got {convention!r}")
