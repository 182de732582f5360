"""ResNet-18/34 encoders in 3D, as segmentation_models_pytorch_3d's `ResNetEncoder` builds them.

smp-3d (timm-3d) is torchvision's ResNet with every Conv2d, BatchNorm2d and MaxPool2d made 3D:
a 7^3 stride-2 stem, a 3^3 stride-2 max-pool, basic blocks of two 3^3 convs, 1^3 stride-2 convs
on the shortcuts, strides (2, 2, 2) on every axis. Returns the features at strides 2, 4, 8, 16,
32 (64, 64, 128, 256, 512 channels). Attribute names are those of the 2D `resnet` module.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bonejax.models.layers import batch_norm
from bonejax.models.layers3d import ConvBNAct3d, conv3d, max_pool3d

BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


class _Downsample(nnx.Module):

  def __init__(self, cin, cout, stride, **kw):
    self.conv = conv3d(cin, cout, 1, stride=stride, **kw)
    self.bn = batch_norm(cout, **kw)

  def __call__(self, x):
    return self.bn(self.conv(x))


class BasicBlock3d(nnx.Module):

  def __init__(self, cin: int, planes: int, stride: int, **kw):
    self.conv1 = conv3d(cin, planes, 3, stride=stride, **kw)
    self.bn1 = batch_norm(planes, **kw)
    self.conv2 = conv3d(planes, planes, 3, **kw)
    self.bn2 = batch_norm(planes, **kw)
    self.downsample = _Downsample(cin, planes, stride, **kw) if (
        stride != 1 or cin != planes) else None

  def __call__(self, x):
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    shortcut = x if self.downsample is None else self.downsample(x)
    return jax.nn.relu(y + shortcut)


class ResNetEncoder3d(nnx.Module):
  """3D ResNet without the classifier; features at strides 2, 4, 8, 16, 32."""

  def __init__(self, name: str = "resnet18", in_channels: int = 1, *,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if name not in BLOCKS:
      raise ValueError(f"unknown 3D encoder {name!r}; known: {', '.join(BLOCKS)}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.channels = (64, 64, 128, 256, 512)
    # fp32 stem: the raw scan keeps its intensity resolution (layers.FP32_EDGES).
    self.stem = ConvBNAct3d(in_channels, 64, 7, stride=2, conv_dtype=jnp.float32, **kw)
    cin, stages = 64, []
    for i, n in enumerate(BLOCKS[name]):
      blocks = []
      for j in range(n):
        blocks.append(BasicBlock3d(cin, 64 * 2**i, (1 if i == 0 else 2) if j == 0 else 1, **kw))
        cin = 64 * 2**i
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    x = self.stem(x)
    features = [x]
    x = max_pool3d(x, 3, 2, 1)
    for stage in self.stages:
      for blk in stage:
        x = blk(x)
      features.append(x)
    return features
