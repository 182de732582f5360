"""ResNet-18/34/50 encoders in the torchvision layout, as smp's `ResNetEncoder` uses them.

He et al. 2016, "Deep Residual Learning for Image Recognition"; torchvision.models.resnet
(ResNet-50 is "v1.5": the stride sits on the 3x3 conv of the bottleneck). The classifier (avgpool,
fc) is dropped. The stem conv takes any number of input channels (micro-CT is 1).

`__call__` returns the five feature maps smp hands to its decoders, minus the raw input:
stride 2 (stem, 64 ch), 4 (layer1), 8 (layer2), 16 (layer3), 32 (layer4).

`ndim=3` builds the volumetric twin that segmentation_models_pytorch_3d (timm-3d) makes of it:
every Conv2d, BatchNorm2d and MaxPool2d made 3D (7^3 stride-2 stem, 3^3 stride-2 max-pool,
strides on every axis), with the same attribute names, so one converter path rule serves both.

`output_stride=16` dilates layer4 the way smp's `make_dilated` does for DeepLabV3+: every conv of
the stage gets stride 1 and dilation 2 (also the first 3x3, unlike torchvision's
`replace_stride_with_dilation`, which keeps dilation 1 there).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bonejax.models.layers import ConvBNAct, batch_norm, conv, edge_dtype, max_pool

# name -> (block, blocks per stage)
SPECS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}


def out_channels(name: str) -> tuple[int, ...]:
  """Channels of the five feature maps, e.g. (64, 64, 128, 256, 512) for resnet18."""
  exp = EXPANSION[SPECS[name][0]]
  return (64,) + tuple(64 * 2**i * exp for i in range(4))


class _Downsample(nnx.Module):
  """1x1 conv + BN on the shortcut when the shape changes."""

  def __init__(self, cin, cout, stride, ndim=2, **kw):
    self.conv = conv(cin, cout, 1, ndim=ndim, stride=stride, **kw)
    self.bn = batch_norm(cout, **kw)

  def __call__(self, x):
    return self.bn(self.conv(x))


class BasicBlock(nnx.Module):

  def __init__(self, cin: int, planes: int, stride: int, dilation: int, ndim: int = 2, **kw):
    self.conv1 = conv(cin, planes, 3, ndim=ndim, stride=stride, dilation=dilation, **kw)
    self.bn1 = batch_norm(planes, **kw)
    self.conv2 = conv(planes, planes, 3, ndim=ndim, dilation=dilation, **kw)
    self.bn2 = batch_norm(planes, **kw)
    self.downsample = _Downsample(cin, planes, stride, ndim, **kw) if (
        stride != 1 or cin != planes) else None

  def __call__(self, x):
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    shortcut = x if self.downsample is None else self.downsample(x)
    return jax.nn.relu(y + shortcut)


class Bottleneck(nnx.Module):

  def __init__(self, cin: int, planes: int, stride: int, dilation: int, ndim: int = 2, **kw):
    cout = planes * 4
    self.conv1 = conv(cin, planes, 1, ndim=ndim, **kw)
    self.bn1 = batch_norm(planes, **kw)
    self.conv2 = conv(planes, planes, 3, ndim=ndim, stride=stride, dilation=dilation, **kw)
    self.bn2 = batch_norm(planes, **kw)
    self.conv3 = conv(planes, cout, 1, ndim=ndim, **kw)
    self.bn3 = batch_norm(cout, **kw)
    self.downsample = _Downsample(cin, cout, stride, ndim, **kw) if (
        stride != 1 or cin != cout) else None

  def __call__(self, x):
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = jax.nn.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    shortcut = x if self.downsample is None else self.downsample(x)
    return jax.nn.relu(y + shortcut)


class ResNetEncoder(nnx.Module):
  """torchvision ResNet without the classifier (ndim 3: smp-3d's); returns features at strides
  2, 4, 8, 16, 32."""

  def __init__(self, name: str = "resnet18", in_channels: int = 1, *, output_stride: int = 32,
               ndim: int = 2, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if name not in SPECS:
      raise ValueError(f"unknown encoder {name!r}; known: {', '.join(SPECS)}")
    if output_stride not in (16, 32):
      raise ValueError(f"output_stride must be 16 or 32, got {output_stride}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    kind, layers = SPECS[name]
    block = BasicBlock if kind == "basic" else Bottleneck
    self.channels = out_channels(name)
    # The stem conv sees the raw scan: computing it in float32 keeps the input's full intensity
    # resolution (micro-CT is often 16-bit; bfloat16 keeps 8 bits), for ~1 % of the FLOPs.
    self.stem = ConvBNAct(in_channels, 64, 7, ndim=ndim, stride=2, act="relu",
                          conv_dtype=edge_dtype(dtype), **kw)
    cin, stages = 64, []
    for i, n in enumerate(layers):
      dilated = output_stride == 16 and i == 3
      stride = 1 if (i == 0 or dilated) else 2
      dilation = 2 if dilated else 1
      blocks = []
      for j in range(n):
        blocks.append(block(cin, 64 * 2**i, stride if j == 0 else 1, dilation, ndim, **kw))
        cin = 64 * 2**i * EXPANSION[kind]
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)
    self.pool_lowering = "xla"  # "onednn" in CPU training (inference_graph.lower_convs)

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    x = self.stem(x)
    features = [x]
    x = max_pool(x, 3, 2, 1, lowering=self.pool_lowering)
    for stage in self.stages:
      for blk in stage:
        x = blk(x)
      features.append(x)
    return features
