"""3D building blocks (NDHWC, Flax NNX): the volumetric twins of `layers`.

Same conventions as the 2D zoo (see `layers`): PyTorch-style symmetric padding, no conv bias in
front of a BatchNorm, BatchNorm momentum 0.1 (PyTorch terms) and eps 1e-5, fp32 first conv and
head. Module attribute names (`conv`, `bn`) are those of the 2D blocks, so the smp converter's
path rules serve segmentation_models_pytorch_3d unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bonejax.models.layers import activation, batch_norm, he_normal


def conv3d(cin: int, cout: int, kernel: int, *, stride: int = 1, bias: bool = False,
           dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
           rngs: nnx.Rngs) -> nnx.Conv:
  """A PyTorch-like Conv3d: symmetric padding k // 2, bias off unless asked for."""
  pad = kernel // 2
  return nnx.Conv(cin, cout, (kernel,) * 3, strides=stride, padding=((pad, pad),) * 3,
                  use_bias=bias, kernel_init=he_normal, dtype=dtype, param_dtype=param_dtype,
                  rngs=rngs)


class ConvBNAct3d(nnx.Module):
  """conv3d (no bias) -> BatchNorm -> activation: smp-3d's `Conv3dReLU`."""

  def __init__(self, cin: int, cout: int, kernel: int = 3, *, stride: int = 1,
               act: str = "relu", dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               conv_dtype: Any = None, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv = conv3d(cin, cout, kernel, stride=stride, **{**kw, "dtype": conv_dtype or dtype})
    self.bn = batch_norm(cout, **kw)
    self.act = act
    activation(act)  # fail at construction, not at the first call

  def __call__(self, x: jax.Array) -> jax.Array:
    return activation(self.act)(self.bn(self.conv(x)))


def max_pool3d(x: jax.Array, kernel: int, stride: int, pad: int = 0) -> jax.Array:
  """PyTorch MaxPool3d: padding counts as -inf, so it never wins."""
  return nnx.max_pool(x, (kernel,) * 3, strides=(stride,) * 3, padding=((pad, pad),) * 3)


def upsample_nearest2x_3d(x: jax.Array) -> jax.Array:
  """`F.interpolate(scale_factor=2, mode="nearest")` on NDHWC: a broadcast, no gather."""
  b, d, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :, None, :], (b, d, 2, h, 2, w, 2, c))
  return x.reshape(b, 2 * d, 2 * h, 2 * w, c)


def check_input3d(x: jax.Array, multiple: int, channels: int, name: str) -> None:
  """Shapes are static under jit, so a bad patch fails at trace time with a clear message."""
  if x.ndim != 5 or x.shape[-1] != channels:
    raise ValueError(f"{name} expects NDHWC input (B, D, H, W, {channels}), "
                     f"got {tuple(x.shape)}")
  if any(s % multiple for s in x.shape[1:4]):
    raise ValueError(f"{name} needs D, H and W that are multiples of {multiple}, got "
                     f"{'x'.join(str(s) for s in x.shape[1:4])}")
