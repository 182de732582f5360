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

Gradients (training) are JAX's through the split (hi + lo is the identity to first order, so
the weight gradient is the float32 one's); as every bf16 layer's, they are computed from the
cotangent rounded to bf16, accumulated in float32. Groups other than 1 keep the float32 call.
"""

from __future__ import annotations

import dataclasses
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
  return onednn.supports(stacked_spec(spec, exact_bf16_input), out, train=train)[0]


def conv_bias(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, spec: ConvSpec,
              out_dtype: Any, *, inference: bool = False) -> jax.Array:
  """The float32 convolution `spec` of `x` (float32, or bf16 for output stacking) with the
  float32 HWIO `kernel` (+ float32 `bias`), as one oneDNN bf16 call; the result in `out_dtype`.
  `inference`: the forward custom call as one equation (`onednn.conv_inference`), else the
  differentiable `onednn.conv`. The caller checks `supports` first."""
  from bonejax.models import onednn
  call = onednn.conv_inference if inference else onednn.conv
  kernel = kernel.astype(jnp.float32)
  wh, wl = split(kernel)
  exact = x.dtype == jnp.bfloat16
  spec16 = stacked_spec(spec, exact)
  if exact:
    b2 = None if bias is None else jnp.concatenate(
        [bias.astype(jnp.float32), jnp.zeros_like(bias, jnp.float32)])
    y2 = call(x, jnp.concatenate([wh, wl], axis=3), b2, spec16, out_dtype=jnp.float32)
    return (y2[..., :spec.cout] + y2[..., spec.cout:]).astype(out_dtype)
  xh, xl = split(x)
  x3 = jnp.concatenate([xh, xl, xh], axis=-1)
  k3 = jnp.concatenate([wh, wh, wl], axis=2)
  # Written in bf16 (oneDNN's float32 destination is 2-4x slower here: 8 x 256^2, 7x7 -> 64:
  # 7.6 vs 20 ms): the layer after a bf16 model's first convolution computes in bf16, so a
  # float32 `out_dtype` (training's) is this rounded value, whose cast back XLA removes.
  return call(x3, k3, bias, spec16, out_dtype=jnp.bfloat16).astype(out_dtype)
