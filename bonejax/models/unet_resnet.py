"""U-Net with a ResNet encoder: segmentation_models_pytorch's `smp.Unet(encoder_name="resnetXX")`.

Ronneberger et al. 2015, "U-Net"; layout of smp's `UnetDecoder` (the networks BONe trains):
five decoder blocks, each nearest-neighbour x2 up-sampling, concatenation of the encoder skip at
that stride (none for the last block), then two conv3x3 (no bias) + BatchNorm + ReLU; decoder
channels 256/128/64/32/16; a 3x3 conv head with bias at full resolution. No center block.

With 1 input channel and 3 classes `unet_resnet18` has exactly 14,322,227 parameters
(11,170,240 encoder + 3,151,552 decoder + 435 head), as smp reports.

`UnetResNet3d` is segmentation_models_pytorch_3d's `Unet(encoder_name="resnet18")` (smp-3d
1.0.2, the 3D networks BONe's DLFit trains): the same network with every layer made 3D
(up-sampling on all three axes, 3^3 convs and head). With 1 input channel and 3 classes
`unet3d_resnet18` has exactly 42,611,987 parameters, as smp-3d counts them
(tests/test_models3d.py checks the count and the logits against smp-3d). Input (B, D, H, W, C)
with D, H, W multiples of 32; logits (B, D, H, W, num_classes) float32.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bonejax.models.layers import (ConvBNAct, check_input, concatenate, conv, edge_dtype,
                                   upsample_nearest2x)
from bonejax.models.resnet import ResNetEncoder

DECODER_CHANNELS = (256, 128, 64, 32, 16)


class DecoderBlock(nnx.Module):
  """smp's U-Net / UNet++ `DecoderBlock` (and smp-3d's, ndim 3): up x2, concat skip, two
  conv-BN-ReLU."""

  def __init__(self, cin: int, skip: int, cout: int, ndim: int = 2, **kw):
    self.conv1 = ConvBNAct(cin + skip, cout, 3, ndim=ndim, **kw)
    self.conv2 = ConvBNAct(cout, cout, 3, ndim=ndim, **kw)

  def __call__(self, x: jax.Array, skip: jax.Array | None = None) -> jax.Array:
    x = upsample_nearest2x(x)
    if skip is not None:
      x = concatenate([x, skip], axis=-1)
    return self.conv2(self.conv1(x))


def check_decoder_channels(decoder_channels: Sequence[int]) -> tuple[int, ...]:
  decoder_channels = tuple(int(c) for c in decoder_channels)
  if len(decoder_channels) != 5:
    raise ValueError(f"decoder_channels needs 5 entries, got {decoder_channels}")
  return decoder_channels


def unet_decoder(enc: Sequence[int], decoder_channels: tuple[int, ...], num_classes: int,
                 ndim: int = 2, **kw) -> tuple[nnx.List, nnx.Module]:
  """smp's `UnetDecoder` (blocks, head) on encoder features of `enc` channels, deepest first.

  The blocks past the encoder's shallowest feature take no skip (MiT has no stride-2 feature:
  its last two blocks only up-sample). Shared by the ResNet and MiT U-Nets, whose parameter
  names and initialisation order (encoder, blocks, head) it keeps.
  """
  enc = tuple(enc)
  ins = (enc[0],) + decoder_channels[:-1]
  skips = enc[1:] + (0,) * (len(decoder_channels) - len(enc[1:]))
  blocks = nnx.List([DecoderBlock(i, s, o, ndim, **kw)
                     for i, s, o in zip(ins, skips, decoder_channels)])
  head = conv(decoder_channels[-1], num_classes, 3, ndim=ndim, bias=True,
              **{**kw, "dtype": edge_dtype(kw.get("dtype"))})  # see layers.FP32_EDGES
  return blocks, head


def run_decoder(blocks: nnx.List, head: nnx.Module, feats: list[jax.Array]) -> jax.Array:
  """`unet_decoder`'s forward pass on the encoder's features, deepest first: float32 logits."""
  y, skips = feats[0], feats[1:]
  skips = skips + [None] * (len(blocks) - len(skips))
  for block, skip in zip(blocks, skips):
    y = block(y, skip)
  return head(y).astype(edge_dtype(y.dtype))


class UnetResNet(nnx.Module):
  """smp.Unet with a torchvision ResNet encoder; logits (B, H, W, num_classes) in float32."""

  stride = 32
  spatial_dims = 2

  def __init__(self, num_classes: int, in_channels: int = 1, *, encoder: str = "resnet18",
               decoder_channels: Sequence[int] = DECODER_CHANNELS,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    decoder_channels = check_decoder_channels(decoder_channels)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype, self.in_channels = dtype, in_channels
    self.encoder = ResNetEncoder(encoder, in_channels, ndim=self.spatial_dims, **kw)
    enc = self.encoder.channels[::-1]  # deepest first: 512, 256, 128, 64, 64
    self.blocks, self.head = unet_decoder(enc, decoder_channels, num_classes,
                                          self.spatial_dims, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    check_input(x, self.stride, self.in_channels, type(self).__name__, self.spatial_dims)
    feats = self.encoder(x.astype(edge_dtype(self.dtype)))[::-1]  # the stem casts after its conv
    return run_decoder(self.blocks, self.head, feats)


class UnetResNet3d(UnetResNet):
  """smp-3d Unet with a 3D ResNet encoder; logits (B, D, H, W, num_classes) in float32."""

  spatial_dims = 3
