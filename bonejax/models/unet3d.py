"""The classic U-Net in 3D (Çiçek et al. 2016, "3D U-Net"), scaled like the 2D `unet`.

The 2D `unet` (Baltruschat et al. 2021) with every layer 3D: blocks of two 3^3 "same" convs (no
bias) each with BatchNorm and Mish, 2^3 max-pooling, learned 2^3 stride-2 transposed-conv
up-sampling that halves the channels, concatenation of the skip, a 1^3 conv head with bias.
`depth` resolution levels (D, H, W multiples of 2**(depth - 1)), `width` channels in the first,
doubling per level. Defaults depth=4, width=16 (3D feature maps cost width x voxels: a 3D net
of the 2D default's width would not fit a GPU at useful patch sizes).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bonejax.models.layers import he_normal
from bonejax.models.layers3d import ConvBNAct3d, check_input3d, conv3d, max_pool3d


class ConvBlock3d(nnx.Module):
  """Two (conv3^3 -> BatchNorm -> activation)."""

  def __init__(self, cin: int, cout: int, act: str, conv_dtype: Any = None, **kw):
    self.conv1 = ConvBNAct3d(cin, cout, 3, act=act, conv_dtype=conv_dtype, **kw)
    self.conv2 = ConvBNAct3d(cout, cout, 3, act=act, **kw)

  def __call__(self, x):
    return self.conv2(self.conv1(x))


class UNet3d(nnx.Module):
  """Classic 3D U-Net; logits (B, D, H, W, num_classes) in float32."""

  spatial_dims = 3

  def __init__(self, num_classes: int, in_channels: int = 1, *, depth: int = 4, width: int = 16,
               activation: str = "mish", dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if not 1 <= int(depth) <= 6:
      raise ValueError(f"unet3d depth must be in 1..6 (sides multiples of 2**(depth-1)), "
                       f"got {depth}")
    if int(width) < 1:
      raise ValueError(f"unet3d width must be positive, got {width}")
    depth, width = int(depth), int(width)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype, self.in_channels, self.stride = dtype, in_channels, 2**(depth - 1)
    chans = [width * 2**i for i in range(depth)]
    self.down = nnx.List([ConvBlock3d(cin, c, activation, jnp.float32 if i == 0 else None, **kw)
                          for i, (cin, c) in enumerate(zip([in_channels] + chans[:-1], chans))])
    self.up = nnx.List([
        nnx.ConvTranspose(chans[i + 1], chans[i], (2, 2, 2), strides=(2, 2, 2),
                          padding="VALID", kernel_init=he_normal, **kw)
        for i in reversed(range(depth - 1))])
    self.up_blocks = nnx.List([ConvBlock3d(2 * chans[i], chans[i], activation, **kw)
                               for i in reversed(range(depth - 1))])
    self.head = conv3d(width, num_classes, 1, bias=True, **{**kw, "dtype": jnp.float32})

  def __call__(self, x: jax.Array) -> jax.Array:
    check_input3d(x, self.stride, self.in_channels, "unet3d")
    x = x.astype(jnp.float32)
    skips = []
    for i, block in enumerate(self.down):
      if i:
        x = max_pool3d(x, 2, 2)
      x = block(x)
      skips.append(x)
    for up, block, skip in zip(self.up, self.up_blocks, reversed(skips[:-1])):
      x = block(jnp.concatenate([up(x), skip], axis=-1))
    return self.head(x).astype(jnp.float32)
