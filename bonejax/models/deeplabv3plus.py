"""DeepLabV3+ with a ResNet encoder: segmentation_models_pytorch's `smp.DeepLabV3Plus`.

Chen et al. 2018, "Encoder-Decoder with Atrous Separable Convolution for Semantic Image
Segmentation". smp's layout: the encoder runs at output stride 16 (layer4 dilated by 2); ASPP
with a 1x1 branch, three depthwise-separable 3x3 branches at atrous rates 12/24/36 and an
image-pooling branch, projected 1x1 to 256 channels with dropout 0.5; a separable 3x3 conv; x4
bilinear up-sampling (align_corners=True, smp's `UpsamplingBilinear2d`); the stride-4 skip
(layer1) reduced 1x1 to 48 channels and concatenated; a separable 3x3 conv to 256; a 1x1 head
with bias and x4 bilinear up-sampling to the input size.

The dropout draws from the model's own `dropout` RNG stream (forked at construction from
`rngs`), so training code must carry `nnx.RngState` along with `nnx.BatchStat`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bonejax.models.layers import (ConvBNAct, SeparableConv, batch_norm, check_input,
                                   concatenate, conv2d, edge_dtype, resize_bilinear)
from bonejax.models.resnet import ResNetEncoder


class SepConvBNReLU(nnx.Module):

  def __init__(self, cin: int, cout: int, dilation: int = 1, **kw):
    self.conv = SeparableConv(cin, cout, 3, dilation=dilation, **kw)
    self.bn = batch_norm(cout, **kw)

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x)))


class ASPP(nnx.Module):
  """Atrous spatial pyramid pooling with separable atrous branches (smp `separable=True`)."""

  def __init__(self, cin: int, cout: int, rates: Sequence[int], dropout: float, **kw):
    self.branch1x1 = ConvBNAct(cin, cout, 1, **kw)
    self.atrous = nnx.List([SepConvBNReLU(cin, cout, int(r), **kw) for r in rates])
    self.pool = ConvBNAct(cin, cout, 1, **kw)
    self.project = ConvBNAct(cout * (2 + len(self.atrous)), cout, 1, **kw)
    self.dropout = nnx.Dropout(dropout, rngs=kw["rngs"])

  def __call__(self, x):
    # Image pooling: a 1x1 map, so bilinear up-sampling back is a broadcast.
    pooled = self.pool(jnp.mean(x, axis=(1, 2), keepdims=True, dtype=jnp.float32).astype(x.dtype))
    branches = [self.branch1x1(x)] + [b(x) for b in self.atrous]
    branches.append(jnp.broadcast_to(pooled, branches[0].shape))
    return self.dropout(self.project(concatenate(branches, axis=-1)))


class DeepLabV3PlusResNet(nnx.Module):
  """smp.DeepLabV3Plus with a torchvision ResNet encoder; float32 logits (B, H, W, classes)."""

  stride = 32  # the model itself needs 16; 32 keeps the zoo-wide promise simple

  def __init__(self, num_classes: int, in_channels: int = 1, *, encoder: str = "resnet18",
               decoder_channels: int = 256, atrous_rates: Sequence[int] = (12, 24, 36),
               aspp_dropout: float = 0.5, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if len(tuple(atrous_rates)) != 3:
      raise ValueError(f"atrous_rates needs 3 entries, got {atrous_rates}")
    if not 0.0 <= float(aspp_dropout) < 1.0:
      raise ValueError(f"aspp_dropout must be in [0, 1), got {aspp_dropout}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    c = int(decoder_channels)
    self.dtype, self.in_channels = dtype, in_channels
    self.encoder = ResNetEncoder(encoder, in_channels, output_stride=16, **kw)
    self.aspp = ASPP(self.encoder.channels[-1], c, atrous_rates, float(aspp_dropout), **kw)
    self.aspp_conv = SepConvBNReLU(c, c, **kw)
    self.skip = ConvBNAct(self.encoder.channels[1], 48, 1, **kw)  # 48: the paper's choice
    self.fuse = SepConvBNReLU(c + 48, c, **kw)
    self.head = conv2d(c, num_classes, 1, bias=True, **{**kw, "dtype": edge_dtype(dtype)})

  def __call__(self, x: jax.Array) -> jax.Array:
    check_input(x, self.stride, self.in_channels, type(self).__name__)
    h, w = x.shape[1:3]
    feats = self.encoder(x.astype(edge_dtype(self.dtype)))  # see layers.FP32_EDGES
    y = self.aspp_conv(self.aspp(feats[-1]))
    skip = self.skip(feats[1])  # stride 4
    y = resize_bilinear(y, skip.shape[1:3], align_corners=True)
    y = self.fuse(concatenate([y, skip], axis=-1))
    y = self.head(y)  # float32, so the x4 up-sampling of the logits is too
    return resize_bilinear(y, (h, w), align_corners=True)
