"""3D U-Net with a ResNet encoder: segmentation_models_pytorch_3d's `Unet(encoder_name="resnet18")`.

The layout of smp-3d 1.0.2 (the 3D networks BONe's DLFit trains): the 2D smp U-Net with every
layer made 3D. Five decoder blocks, each nearest-neighbour x2 up-sampling on all three axes,
concatenation of the encoder skip at that stride (none for the last), two 3^3 conv (no bias) +
BatchNorm + ReLU; decoder channels 256/128/64/32/16; a 3^3 conv head with bias. No centre block.

With 1 input channel and 3 classes `unet3d_resnet18` has exactly 42,611,987 parameters, as
smp-3d counts them (tests/test_models3d.py checks the count and the logits against smp-3d).
Input (B, D, H, W, C) with D, H, W multiples of 32; logits (B, D, H, W, num_classes) float32.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bonejax.models.layers3d import ConvBNAct3d, check_input3d, conv3d, upsample_nearest2x_3d
from bonejax.models.resnet3d import ResNetEncoder3d
from bonejax.models.unet_resnet import DECODER_CHANNELS, check_decoder_channels


class DecoderBlock3d(nnx.Module):
  """smp-3d's `DecoderBlock`: up x2, concat skip, two conv-BN-ReLU."""

  def __init__(self, cin: int, skip: int, cout: int, **kw):
    self.conv1 = ConvBNAct3d(cin + skip, cout, 3, **kw)
    self.conv2 = ConvBNAct3d(cout, cout, 3, **kw)

  def __call__(self, x: jax.Array, skip: jax.Array | None = None) -> jax.Array:
    x = upsample_nearest2x_3d(x)
    if skip is not None:
      x = jnp.concatenate([x, skip], axis=-1)
    return self.conv2(self.conv1(x))


class UnetResNet3d(nnx.Module):
  """smp-3d Unet with a 3D ResNet encoder; logits (B, D, H, W, num_classes) in float32."""

  stride = 32
  spatial_dims = 3

  def __init__(self, num_classes: int, in_channels: int = 1, *, encoder: str = "resnet18",
               decoder_channels: Sequence[int] = DECODER_CHANNELS,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    decoder_channels = check_decoder_channels(decoder_channels)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype, self.in_channels = dtype, in_channels
    self.encoder = ResNetEncoder3d(encoder, in_channels, **kw)
    enc = self.encoder.channels[::-1]  # deepest first: 512, 256, 128, 64, 64
    ins = (enc[0],) + decoder_channels[:-1]
    skips = enc[1:] + (0,)
    self.blocks = nnx.List([DecoderBlock3d(i, s, o, **kw)
                            for i, s, o in zip(ins, skips, decoder_channels)])
    self.head = conv3d(decoder_channels[-1], num_classes, 3, bias=True,
                       **{**kw, "dtype": jnp.float32})  # layers.FP32_EDGES

  def __call__(self, x: jax.Array) -> jax.Array:
    check_input3d(x, self.stride, self.in_channels, type(self).__name__)
    feats = self.encoder(x.astype(jnp.float32))[::-1]
    y, skips = feats[0], feats[1:] + [None]
    for block, skip in zip(self.blocks, skips):
      y = block(y, skip)
    return self.head(y).astype(jnp.float32)
