"""A workaround for XLA's CPU backend: planes padded past its swapped small convolutions.

On XLA's CPU backend a stride-1 convolution whose input has fewer spatial pixels than its kernel
(a 3x3 conv on the 2x4 bottleneck of a 64x128 plane through a stride-32 network) has its operands
swapped by the algebraic simplifier and then runs as a naive loop, 10-50x slower than the same
conv on a 3x4 input (unet_resnet18, batch 4: a 64x128 plane takes 5x the time of a 128x128 one).
So on CPU the engine checks the model's convolutions for each plane shape (from the traced
jaxpr, no compile) and, where one would be swapped, pads the plane (reflect, like the stride
padding) to the smallest larger multiple of the stride where none is; the crop is unchanged.
Other backends never call this module.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import jax
from flax import nnx

MAX_EXTRA_BLOCKS = 8  # stride blocks a plane side may grow by to avoid a swapped CPU conv


ONEDNN_FORWARD = "bonejax_onednn_conv_fwd"  # bonejax.models.onednn's forward FFI target


def _conv_eqns(jaxpr) -> Iterator[Any]:
  """Every conv_general_dilated equation of a jaxpr, sub-jaxprs (jit, remat, ...) included,
  and every oneDNN forward convolution (an ffi_call)."""
  for e in jaxpr.eqns:
    if e.primitive.name == "conv_general_dilated" or (
        e.primitive.name == "ffi_call" and e.params.get("target_name") == ONEDNN_FORWARD):
      yield e
    for v in e.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else (v,)):
        if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):
          yield from _conv_eqns(sub.jaxpr)
        elif hasattr(sub, "eqns"):
          yield from _conv_eqns(sub)


def swapped_cpu_convs(jaxpr) -> int:
  """Convolutions XLA's CPU algebraic simplifier would swap (kernel and input): stride 1, no
  dilation, fewer input pixels than kernel taps in the spatial dims. Those run as a naive loop."""
  n = 0
  for e in _conv_eqns(jaxpr):
    if e.primitive.name == "ffi_call":
      # oneDNN runs such a layer well, but the plane is padded as if XLA ran it: predictions
      # then do not depend on which lowering (or machine) computed them.
      conf = dict(e.params["attributes"])["conf"]
      conf = getattr(conf, "val", conf)
      x, k = e.invars[0].aval.shape, e.invars[1].aval.shape
      if all(int(v) == 1 for v in conf[0:4]) and x[1] * x[2] < k[0] * k[1]:
        n += 1
      continue
    prm = e.params
    if any(int(v) != 1 for v in tuple(prm["window_strides"]) + tuple(prm["lhs_dilation"])
           + tuple(prm["rhs_dilation"])):
      continue
    dn = prm["dimension_numbers"]
    lhs, rhs = e.invars[0].aval.shape, e.invars[1].aval.shape
    spatial_in = math.prod(lhs[d] for d in dn.lhs_spec[2:])
    spatial_k = math.prod(rhs[d] for d in dn.rhs_spec[2:])
    if spatial_in < spatial_k:
      n += 1
  return n


def count_swapped(graphdef: Any, state: Any, plane: tuple[int, int], channels: int,
                  dtype: Any) -> int:
  """Swapped convolutions of the model (graphdef, state) on one (H, W) plane."""
  x = jax.ShapeDtypeStruct((1,) + tuple(plane) + (channels,), dtype)
  try:
    jaxpr = jax.make_jaxpr(lambda st, x: nnx.merge(graphdef, st)(x))(state, x)
  except Exception:  # pylint: disable=broad-except  # the compile reports real problems
    return 0
  return swapped_cpu_convs(jaxpr.jaxpr)


def unswapped_plane(graphdef: Any, state: Any, hp: int, wp: int, *, stride: int,
                    channels: int, dtype: Any) -> tuple[int, int]:
  """(hp, wp), or the smallest-area larger stride multiple without swapped CPU convs."""
  count = lambda h, w: count_swapped(graphdef, state, (h, w), channels, dtype)  # noqa: E731
  if not count(hp, wp):
    return hp, wp
  s = stride
  cands = sorted(((hp + i * s) * (wp + j * s), i + j, hp + i * s, wp + j * s)
                 for i in range(MAX_EXTRA_BLOCKS + 1) for j in range(MAX_EXTRA_BLOCKS + 1)
                 if i or j)
  for _, _, h, w in cands:
    if not count(h, w):
      return h, w
  return hp, wp
