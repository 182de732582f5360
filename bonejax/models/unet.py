"""The classic U-Net of "Scaling the U-net" (Baltruschat et al. 2021, Sci. Rep. 11:24237).

Ronneberger et al.'s U-Net with BatchNorm after every conv and Mish activations, scaled by two
numbers: `depth`, the number of encoder conv-blocks (resolution levels), and `width`, the
channels of the first block, doubling per level. Each block is two 3x3 "same" convs (no bias:
BatchNorm follows), each with BatchNorm and the activation. Down-sampling is 2x2 max-pooling.
For up-sampling we use the original U-Net's learned "up-conv 2x2" (a 2x2 stride-2 transposed
conv with bias that halves the channels), then concatenation of the skip and a conv-block. The
head is a 1x1 conv with bias.

`depth` levels pool `depth - 1` times, so H and W must be multiples of 2**(depth - 1); depth is
capped at 6 so that the zoo-wide promise (multiples of 32 always work) holds.
Defaults depth=5, width=32 (7.76 M parameters for 1 channel in, 3 classes out).

`UNet3d` is the same network in 3D (Cicek et al. 2016, "3D U-Net"): 3^3 convs, 2^3 pooling and
transposed-conv up-sampling, a 1^3 head; D, H, W multiples of 2**(depth - 1). Its defaults are
depth=4, width=16: 3D feature maps cost width x voxels, and a 3D net of the 2D default's width
would not fit a GPU at useful patch sizes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bonejax.models.layers import (ConvBNAct, check_input, concatenate, conv, edge_dtype, he_normal,
                                   max_pool)


class ConvBlock(nnx.Module):
  """Two (conv3x3 -> BatchNorm -> activation)."""

  def __init__(self, cin: int, cout: int, act: str, conv_dtype: Any = None, ndim: int = 2,
               **kw):
    self.conv1 = ConvBNAct(cin, cout, 3, ndim=ndim, act=act, conv_dtype=conv_dtype, **kw)
    self.conv2 = ConvBNAct(cout, cout, 3, ndim=ndim, act=act, **kw)

  def __call__(self, x):
    return self.conv2(self.conv1(x))


class UNet(nnx.Module):
  """Classic U-Net (Baltruschat et al. 2021); logits (B, H, W, num_classes) in float32."""

  spatial_dims = 2
  label = "unet"  # in error messages

  def __init__(self, num_classes: int, in_channels: int = 1, *, depth: int = 5, width: int = 32,
               activation: str = "mish", dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    n, sides = self.spatial_dims, "H, W" if self.spatial_dims == 2 else "D, H, W"
    if not 1 <= int(depth) <= 6:
      raise ValueError(f"{self.label} depth must be in 1..6 ({sides} multiples of "
                       f"2**(depth-1)), got {depth}")
    if int(width) < 1:
      raise ValueError(f"{self.label} width must be positive, got {width}")
    depth, width = int(depth), int(width)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype, self.in_channels, self.stride = dtype, in_channels, 2**(depth - 1)
    chans = [width * 2**i for i in range(depth)]
    # The first conv (raw scan in) and the head (logits out) run in float32: see FP32_EDGES.
    self.down = nnx.List([ConvBlock(cin, c, activation, edge_dtype(dtype) if i == 0 else None, n,
                                    **kw)
                          for i, (cin, c) in enumerate(zip([in_channels] + chans[:-1], chans))])
    self.up = nnx.List([
        nnx.ConvTranspose(chans[i + 1], chans[i], (2,) * n, strides=(2,) * n, padding="VALID",
                          kernel_init=he_normal, **kw)
        for i in reversed(range(depth - 1))])
    self.up_blocks = nnx.List([ConvBlock(2 * chans[i], chans[i], activation, None, n, **kw)
                               for i in reversed(range(depth - 1))])
    self.head = conv(width, num_classes, 1, ndim=n, bias=True,
                     **{**kw, "dtype": edge_dtype(dtype)})
    self.pool_lowering = "xla"  # "onednn" in CPU training (inference_graph.lower_convs)

  def __call__(self, x: jax.Array) -> jax.Array:
    check_input(x, self.stride, self.in_channels, self.label, self.spatial_dims)
    x = x.astype(edge_dtype(self.dtype))  # the first conv casts to the compute dtype after itself
    skips = []
    for i, block in enumerate(self.down):
      if i:
        x = max_pool(x, 2, 2, lowering=self.pool_lowering)
      x = block(x)
      skips.append(x)
    for up, block, skip in zip(self.up, self.up_blocks, reversed(skips[:-1])):
      x = block(concatenate([up(x), skip], axis=-1))
    return self.head(x).astype(edge_dtype(self.dtype))


class UNet3d(UNet):
  """Classic 3D U-Net; logits (B, D, H, W, num_classes) in float32."""

  spatial_dims = 3
  label = "unet3d"

  def __init__(self, num_classes: int, in_channels: int = 1, *, depth: int = 4, width: int = 16,
               **kw):
    super().__init__(num_classes, in_channels, depth=depth, width=width, **kw)
