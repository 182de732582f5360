"""SegFormer-B0: segmentation_models_pytorch's `smp.Segformer(encoder_name="mit_b0")`.

Xie et al. 2021, "SegFormer: Simple and Efficient Design for Semantic Segmentation with
Transformers". Encoder: the Mix Transformer MiT-B0 (`bonejax.models.mit`). Decoder: smp's
all-MLP head - a linear layer per stage to 256 channels, bilinear resize to 1/4 of the input
(align_corners=False), concatenation (deepest first), 1x1 conv-BN-ReLU fuse; a 1x1 head with bias
whose logits are up-sampled x4 bilinearly (align_corners=True, smp's `UpsamplingBilinear2d`).
Parameter layout and forward pass match smp one to one (tests/test_convert_parity.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bonejax.models.layers import (ConvBNAct, check_input, concatenate, conv2d, edge_dtype, linear,
                                    resize_bilinear)
from bonejax.models.mit import MIT_B0, mit_stages, run_stages


class SegFormer(nnx.Module):
  """smp.Segformer with a MiT-B0 encoder; float32 logits (B, H, W, classes)."""

  stride = 32

  def __init__(self, num_classes: int, in_channels: int = 1, *, decoder_channels: int = 256,
               drop_path_rate: float = 0.1, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    dims = MIT_B0["dims"]
    self.dtype, self.in_channels = dtype, in_channels
    self.stages = mit_stages(in_channels, drop_path_rate, **kw)
    c = int(decoder_channels)
    self.mlps = nnx.List([linear(d, c, **kw) for d in dims[::-1]])  # deepest first, as smp
    self.fuse = ConvBNAct(len(dims) * c, c, 1, **kw)
    self.head = conv2d(c, num_classes, 1, bias=True, **{**kw, "dtype": edge_dtype(dtype)})

  def __call__(self, x: jax.Array) -> jax.Array:
    check_input(x, self.stride, self.in_channels, "segformer")
    h, w = x.shape[1:3]
    feats = run_stages(self.stages, x)
    size = (h // 4, w // 4)
    y = concatenate([resize_bilinear(mlp(f), size)
                         for mlp, f in zip(self.mlps, feats[::-1])], axis=-1)
    y = self.head(self.fuse(y))  # float32 logits, up-sampled in float32
    return resize_bilinear(y, (h, w), align_corners=True)
