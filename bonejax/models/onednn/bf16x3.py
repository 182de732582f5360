"""A float32 convolution computed as bf16 products on oneDNN: the FP32_EDGES layers of a bf16 model.

A bf16 model keeps its first convolution (the raw scan in) and its head (the logits out) in
float32 (bonejax.models.layers). oneDNN's float32 kernels are 2-4x slower than its bf16 ones on
those layers (8 x 256^2: the 7x7 stem 14 vs 9 ms, the 16 -> 3 head 22 vs 6.5 ms), and a float32
result must then be converted for the bf16 layer that follows. Here each float32 operand is split
into two bf16 numbers, a = hi + lo with hi = bf16(a) and lo = bf16(a - hi) (16 bits of mantissa
between them), and the convolution becomes the sum of three bf16 products accumulated in float32
(the "bf16x3" of XLA's precision modes): x*w = xh*wh + xl*wh + xh*wl + (xl*wl, ~2^-16 of it,
dropped). Within ~1e-5 relative of the float32 convolution (tests/test_onednn_bf16x3.py), one
oneDNN bf16 call:

- input stacking, for a float32 input (the stem: one channel, or a 2.5D stack): the input's
  channels become [xh, xl, xh] and the kernel's [wh, wh, wl]; the call writes bf16, which the
  layers after a bf16 model's first convolution compute in (bias and ReLU as post-ops in the
  inference graph).
- output stacking, for an input that is exactly bf16 already (the head, fed by bf16 layers):
  the kernel's output channels become [wh | wl] (bias on the first half) and the two halves of
  the float32 result are added.

Gradients (training; `_stem_bwd`, `_head_bwd`): as every bf16 layer's, from the cotangent
rounded to bf16, accumulated in float32, by the plain (unstacked) bf16 convolution: the weight
gradient x * g from xh alone (xl's share is 2^-9 of it, the size of the cotangent's own rounding),
the data gradient against wh; weight gradients returned in float32. One product each instead of
the stacked call's three (stem) or two (head). Groups other than 1 keep the float32 call.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from bonejax.models.conv_spec import ConvSpec

# Read at trace time: benchmarks switch it off to time the float32 edges it replaces.
ENABLED = True


def split(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(hi, lo), both bf16, with hi + lo = a to ~2^-16 relative."""
  hi = a.astype(jnp.bfloat16)
  lo = (a.astype(jnp.float32) - hi.astype(jnp.float32)).astype(jnp.bfloat16)
  return hi, lo


def stacked_spec(spec: ConvSpec, exact_bf16_input: bool) -> ConvSpec:
  """The bf16 convolution that computes `spec` (a float32 one)."""
  if exact_bf16_input:
    return dataclasses.replace(spec, cout=2 * spec.cout, dtype="bfloat16")
  return dataclasses.replace(spec, cin=3 * spec.cin, dtype="bfloat16")


def supports(spec: ConvSpec, exact_bf16_input: bool, *, train: bool = False) -> bool:
  """Whether `spec` (a float32 convolution) runs as bf16x3 here: on, groups 1, and oneDNN
  takes the stacked bf16 call with an optimised kernel."""
  if not ENABLED or spec.dtype != "float32" or spec.groups != 1:
    return False
  from bonejax.models import onednn
  out = jnp.float32 if exact_bf16_input else jnp.bfloat16  # what conv_bias writes
  if not onednn.supports(stacked_spec(spec, exact_bf16_input), out, train=train)[0]:
    return False
  # Training's backward runs the unstacked bf16 convolution (`_stem_bwd`, `_head_bwd`).
  return not train or onednn.supports(dataclasses.replace(spec, dtype="bfloat16"), out,
                                      train=True)[0]


def conv_bias(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, spec: ConvSpec,
              out_dtype: Any, *, inference: bool = False) -> jax.Array:
  """The float32 convolution `spec` of `x` (float32, or bf16 for output stacking) with the
  float32 HWIO `kernel` (+ float32 `bias`), as one oneDNN bf16 call; the result in `out_dtype`.
  `inference`: the forward custom call as one equation (`onednn.conv_inference`), else the
  differentiable `onednn.conv`. The caller checks `supports` first."""
  kernel = kernel.astype(jnp.float32)
  exact = x.dtype == jnp.bfloat16
  if inference:
    from bonejax.models import onednn
    if exact:
      return _head_forward(onednn.conv_inference, x, kernel, bias, spec).astype(out_dtype)
    return _stem_forward(onednn.conv_inference, x, kernel, bias, spec).astype(out_dtype)
  has_bias = bias is not None
  bias = jnp.zeros((spec.cout,), jnp.float32) if bias is None else bias.astype(jnp.float32)
  if exact:
    return _head(x, kernel, bias, spec, has_bias).astype(out_dtype)
  return _stem(x.astype(jnp.float32), kernel, bias, spec, has_bias).astype(out_dtype)


def _head_forward(call, x, kernel, bias, spec):
  """Output stacking: the float32 result of bf16 `x` with [wh | wl] (bias on the first half)."""
  wh, wl = split(kernel)
  b2 = None if bias is None else jnp.concatenate(
      [bias.astype(jnp.float32), jnp.zeros_like(bias, jnp.float32)])
  y2 = call(x, jnp.concatenate([wh, wl], axis=3), b2, stacked_spec(spec, True),
            out_dtype=jnp.float32)
  return y2[..., :spec.cout] + y2[..., spec.cout:]


def _stem_forward(call, x, kernel, bias, spec):
  """Input stacking: [xh, xl, xh] against [wh, wh, wl], written in bf16 (oneDNN's float32
  destination is 2-4x slower here: 8 x 256^2, 7x7 -> 64: 7.6 vs 20 ms): the layer after a bf16
  model's first convolution computes in bf16, so a float32 `out_dtype` (training's) is this
  rounded value, whose cast back XLA removes."""
  wh, wl = split(kernel)
  xh, xl = split(x)
  x3 = jnp.concatenate([xh, xl, xh], axis=-1)
  k3 = jnp.concatenate([wh, wh, wl], axis=2)
  return call(x3, k3, bias, stacked_spec(spec, False), out_dtype=jnp.bfloat16)


# Training. The forward is the three products above; the backward, as every bf16 layer's, starts
# from the cotangent rounded to bf16 (2^-9 relative), so it runs the plain bf16 convolution:
# the stem's weight gradient from xh alone (xl's part is 2^-9 of it, below that rounding: one
# product over the input's channels instead of three), the head's data and weight gradients
# against wh and the cotangent once (not [wh | wl] and the cotangent twice). Weight gradients
# come back in float32, unrounded (the stacked call's were rounded to bf16 per half).


def _bf16(spec: ConvSpec) -> ConvSpec:
  return dataclasses.replace(spec, dtype="bfloat16")


def _bias_grad(g, spec: ConvSpec, has_bias: bool):
  """The float32 bias's gradient (zeros for the placeholder of a layer without bias)."""
  if not has_bias:
    return jnp.zeros((spec.cout,), jnp.float32)
  return jnp.sum(g.astype(jnp.float32), (0, 1, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _stem(x, kernel, bias, spec, has_bias):
  from bonejax.models import onednn
  return _stem_forward(onednn.conv, x, kernel, bias if has_bias else None, spec)


def _stem_fwd(x, kernel, bias, spec, has_bias):
  return _stem(x, kernel, bias, spec, has_bias), (x.astype(jnp.bfloat16), kernel)


def _stem_bwd(spec, has_bias, res, g):
  from bonejax.models import onednn
  xh, kernel = res
  g = g.astype(jnp.bfloat16)
  dx = onednn.backward_data(g, kernel, xh.shape, jnp.bfloat16, _bf16(spec)).astype(jnp.float32)
  dk = onednn.backward_weights(xh, g, kernel.shape, _bf16(spec))
  return dx, dk, _bias_grad(g, spec, has_bias)


_stem.defvjp(_stem_fwd, _stem_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _head(x, kernel, bias, spec, has_bias):
  from bonejax.models import onednn
  return _head_forward(onednn.conv, x, kernel, bias if has_bias else None, spec)


def _head_fwd(x, kernel, bias, spec, has_bias):
  return _head(x, kernel, bias, spec, has_bias), (x, kernel)


def _head_bwd(spec, has_bias, res, g):
  from bonejax.models import onednn
  x, kernel = res
  gc = g.astype(jnp.bfloat16)
  dx = onednn.backward_data(gc, kernel, x.shape, x.dtype, _bf16(spec))
  dk = onednn.backward_weights(x, gc, kernel.shape, _bf16(spec))
  return dx, dk, _bias_grad(g, spec, has_bias)


_head.defvjp(_head_fwd, _head_bwd)
