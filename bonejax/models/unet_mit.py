"""U-Net with a MiT-B0 encoder: segmentation_models_pytorch's `smp.Unet(encoder_name="mit_b0")`.

BONe benchmarks the transformer encoder under the same U-Net decoder as its ResNets. smp hands the
decoder the four MiT features (strides 4, 8, 16, 32; 32/64/160/256 channels) plus an empty
stride-2 feature, so the five decoder blocks (nearest x2, concat skip, two conv3x3-BN-ReLU;
256/128/64/32/16 channels) take skips of 160, 64, 32, 0 and 0 channels: the last two blocks only
up-sample. A 3x3 head with bias at full resolution. 5,546,643 parameters for 1 channel in and 3
classes out, as smp (tests/test_convert_parity.py checks the forward pass against it).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bonejax.models.layers import check_input
from bonejax.models.mit import MIT_B0, mit_stages, run_stages
from bonejax.models.unet_resnet import (DECODER_CHANNELS, check_decoder_channels, run_decoder,
                                        unet_decoder)


class MiTEncoder(nnx.Module):

  def __init__(self, in_channels: int, drop_path_rate: float, **kw):
    self.stages = mit_stages(in_channels, drop_path_rate, **kw)

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    return run_stages(self.stages, x)


class UnetMiT(nnx.Module):
  """smp.Unet with the MiT-B0 encoder; float32 logits (B, H, W, num_classes)."""

  stride = 32

  def __init__(self, num_classes: int, in_channels: int = 1, *,
               decoder_channels: Sequence[int] = DECODER_CHANNELS, drop_path_rate: float = 0.1,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    decoder_channels = check_decoder_channels(decoder_channels)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype, self.in_channels = dtype, in_channels
    self.encoder = MiTEncoder(in_channels, drop_path_rate, **kw)
    enc = MIT_B0["dims"][::-1]  # 256, 160, 64, 32: skips of 160, 64, 32, 0 and 0
    self.blocks, self.head = unet_decoder(enc, decoder_channels, num_classes, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    check_input(x, self.stride, self.in_channels, type(self).__name__)
    feats = self.encoder(x)[::-1]  # strides 32, 16, 8, 4
    return run_decoder(self.blocks, self.head, feats)
