"""UNet++ with a ResNet encoder: segmentation_models_pytorch's `smp.UnetPlusPlus`.

Zhou et al. 2018, "UNet++: A Nested U-Net Architecture for Medical Image Segmentation".
Nested, dense skip pathways in smp's `UnetPlusPlusDecoder` layout: node x_{d}_{l} (d = depth
index along the skip pathway, l = decoder level, deepest first) up-samples node x_{d}_{l-1} (or the
encoder feature for d = l = 0 ... 3) and concatenates every earlier node of its column plus the
encoder skip. Blocks are the U-Net `DecoderBlock` (nearest x2, concat, two conv-BN-ReLU), decoder
channels 256/128/64/32/16, 3x3 head with bias. `unetpp_resnet18`: 15,964,467 parameters for 1
channel in and 3 classes out (smp: 15.96 M).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bonejax.models.layers import check_input, concatenate, conv2d, edge_dtype
from bonejax.models.resnet import ResNetEncoder
from bonejax.models.unet_resnet import DECODER_CHANNELS, DecoderBlock


class UnetPlusPlusResNet(nnx.Module):
  """smp.UnetPlusPlus with a torchvision ResNet encoder; float32 logits (B, H, W, classes)."""

  stride = 32

  def __init__(self, num_classes: int, in_channels: int = 1, *, encoder: str = "resnet18",
               decoder_channels: Sequence[int] = DECODER_CHANNELS,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    out = tuple(int(c) for c in decoder_channels)
    if len(out) != 5:
      raise ValueError(f"decoder_channels needs 5 entries, got {out}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype, self.in_channels = dtype, in_channels
    self.encoder = ResNetEncoder(encoder, in_channels, **kw)
    enc = self.encoder.channels[::-1]  # deepest first
    ins = (enc[0],) + out[:-1]
    skip = enc[1:] + (0,)
    self.depth = len(ins) - 1
    blocks = {}
    for l in range(self.depth):
      for d in range(l + 1):
        if d == 0:  # the main U-Net path, fed by all nodes of column l
          cin, cskip, cout = ins[l], skip[l] * (l + 1), out[l]
        else:  # an inner node: works at the skip's own width
          cin, cskip, cout = skip[l - 1], skip[l] * (l + 1 - d), skip[l]
        blocks[f"x_{d}_{l}"] = DecoderBlock(cin, cskip, cout, **kw)
    blocks[f"x_0_{self.depth}"] = DecoderBlock(ins[-1], 0, out[-1], **kw)
    self.blocks = nnx.Dict(blocks)
    self.head = conv2d(out[-1], num_classes, 3, bias=True,
                       **{**kw, "dtype": edge_dtype(kw.get("dtype"))})

  def __call__(self, x: jax.Array) -> jax.Array:
    check_input(x, self.stride, self.in_channels, type(self).__name__)
    feats = self.encoder(x.astype(edge_dtype(self.dtype)))[::-1]  # strides 32, 16, 8, 4, 2
    dense = {}
    for l in range(self.depth):
      for d in range(self.depth - l):
        if l == 0:
          dense[f"x_{d}_{d}"] = self.blocks[f"x_{d}_{d}"](feats[d], feats[d + 1])
        else:
          col = d + l
          cat = [dense[f"x_{i}_{col}"] for i in range(d + 1, col + 1)] + [feats[col + 1]]
          dense[f"x_{d}_{col}"] = self.blocks[f"x_{d}_{col}"](
              dense[f"x_{d}_{col - 1}"], concatenate(cat, axis=-1))
    y = self.blocks[f"x_0_{self.depth}"](dense[f"x_0_{self.depth - 1}"])
    return self.head(y).astype(edge_dtype(self.dtype))
