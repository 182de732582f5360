"""Building blocks shared by the model zoo (NHWC, Flax NNX).

Layouts follow PyTorch (torchvision / segmentation_models_pytorch, "smp") so parameter counts
match and weights could be ported one to one: explicit symmetric padding `k // 2 * dilation`
(TF-style "SAME" pads stride-2 convs asymmetrically and would shift every feature map by half a
pixel), BatchNorm momentum 0.1 in PyTorch terms and eps 1e-5, no conv bias in front of a norm.

`dtype` is the compute dtype (bf16 on GPU); parameters stay `param_dtype` (fp32).

FP32_EDGES: every model runs its first conv (which sees the raw scan) and its head (which makes
the logits) in float32 whatever `dtype` is. Micro-CT is often 16-bit and bfloat16 keeps 8 bits of
mantissa; the logits feed soft voting across planes. Both layers are ~1 % of the FLOPs. On
oneDNN (CPU), a bf16 model computes them as three bf16 products, to float32's accuracy
(`onednn.bf16x3`: oneDNN's float32 kernels are 2-4x slower on them).
(`edge_dtype`: float32, or float64 for a float64 model: a reference computed wholly in float64.)
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

def edge_dtype(dtype: Any) -> Any:
  """The FP32_EDGES layers' dtype for a model computing in `dtype`: float32, unless `dtype` is
  wider (float64: a test's reference model then computes every layer in float64)."""
  return jnp.float64 if dtype is not None and jnp.dtype(dtype) == jnp.float64 else jnp.float32


# torchvision initialises convs with kaiming_normal_(mode="fan_out", nonlinearity="relu").
he_normal = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
# Grouped convs: PyTorch code divides fan_out by the groups; for depthwise convs that is fan_in.
he_normal_grouped = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "mish": jax.nn.mish,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # torch nn.GELU default
    "silu": jax.nn.silu,
    "elu": jax.nn.elu,
    "leaky_relu": jax.nn.leaky_relu,
    "identity": lambda x: x,
}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; known: {', '.join(sorted(ACTIVATIONS))}")
  return ACTIVATIONS[name]


def conv(cin: int, cout: int, kernel: int, *, ndim: int = 2, stride: int = 1, dilation: int = 1,
         groups: int = 1, bias: bool = False, padding: int | None = None,
         dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
         rngs: nnx.Rngs) -> nnx.Conv:
  """A PyTorch-like Conv2d (ndim 2) or Conv3d (ndim 3): symmetric padding, bias off unless
  asked for; the same kernel size, stride and dilation on every spatial axis."""
  pad = dilation * (kernel // 2) if padding is None else padding
  return nnx.Conv(cin, cout, (kernel,) * ndim, strides=stride, padding=((pad, pad),) * ndim,
                  kernel_dilation=dilation, feature_group_count=groups, use_bias=bias,
                  kernel_init=he_normal if groups == 1 else he_normal_grouped,
                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)


conv2d = functools.partial(conv, ndim=2)
conv3d = functools.partial(conv, ndim=3)


def batch_norm(features: int, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs) -> nnx.BatchNorm:
  # Flax momentum is the weight of the old statistic: PyTorch's 0.1 is Flax's 0.9. Variance in
  # two passes, E[(x - E[x])^2], as PyTorch: Flax's one-pass E[x^2] - E[x]^2 cancels in float32
  # where a channel's mean is large against its spread (ReLU outputs), which put decoder
  # gradients 3e-3 off a float64 run (tests/test_onednn.py, jaxlib 0.12).
  return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, dtype=dtype,
                       param_dtype=param_dtype, use_fast_variance=False, rngs=rngs)


def layer_norm(features: int, eps: float, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(features, epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def linear(din: int, dout: int, *, bias: bool = True, dtype: Any = jnp.float32,
           param_dtype: Any = jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nnx.initializers.truncated_normal(0.02), rngs=rngs)


class ConvBNAct(nnx.Module):
  """conv (no bias) -> BatchNorm -> activation: smp's `Conv2dReLU`, smp-3d's `Conv3dReLU`
  (ndim 3) and torchvision's stems."""

  def __init__(self, cin: int, cout: int, kernel: int = 3, *, ndim: int = 2, stride: int = 1,
               dilation: int = 1, act: str = "relu", dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, conv_dtype: Any = None, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv = conv(cin, cout, kernel, ndim=ndim, stride=stride, dilation=dilation,
                     **{**kw, "dtype": conv_dtype or dtype})
    self.bn = batch_norm(cout, **kw)
    self.act = act
    activation(act)  # fail at construction, not at the first call

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv(x)
    # CPU training (onednn.batch_norm.OnednnBatchNorm): BatchNorm and ReLU as one primitive.
    if self.act == "relu" and hasattr(self.bn, "norm_relu"):
      y = self.bn.norm_relu(x)
      if y is not None:
        return y
    return activation(self.act)(self.bn(x))


class SeparableConv(nnx.Module):
  """Depthwise kxk (no bias) then pointwise 1x1: smp's `SeparableConv2d` (DeepLabV3+)."""

  def __init__(self, cin: int, cout: int, kernel: int = 3, *, dilation: int = 1,
               bias: bool = False, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.depthwise = conv2d(cin, cin, kernel, dilation=dilation, groups=cin, **kw)
    self.pointwise = conv2d(cin, cout, 1, bias=bias, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.pointwise(self.depthwise(x))


def max_pool(x: jax.Array, kernel: int, stride: int, pad: int = 0,
             lowering: str = "xla") -> jax.Array:
  """PyTorch MaxPool2d / MaxPool3d (NHWC / NDHWC): padding counts as -inf, so it never wins.

  `lowering` "onednn": a 2D max-pool runs on oneDNN where it takes the shape (training on the
  CPU: XLA's select-and-scatter gradient is ~60x slower; see bonejax.models.onednn.pooling),
  else XLA's reduce_window. Both are exact and send the gradient to the first maximum."""
  n = x.ndim - 2
  if lowering == "onednn" and n == 2 and jax.default_backend() == "cpu":
    from bonejax.models.onednn import pooling
    if pooling.supports(tuple(x.shape), jnp.dtype(x.dtype).name, kernel, stride, pad)[0]:
      return pooling.max_pool_train(x, kernel, stride, pad)
  return nnx.max_pool(x, (kernel,) * n, strides=(stride,) * n, padding=((pad, pad),) * n)


@jax.custom_vjp
def upsample_nearest2x(x: jax.Array) -> jax.Array:
  """`F.interpolate(scale_factor=2, mode="nearest")` on NHWC or NDHWC: a broadcast, no
  gather. Its gradient sums each 2 x 2 (x 2) block of the cotangent as strided slices,
  accumulated in float32 (at least) and rounded once, as PyTorch's: XLA's own gradient of the
  broadcast is a reduce, 4-8x slower on the CPU (8 x 256^2 x 32 bf16: 14.0 vs 3.9 ms) and
  rounded twice in bf16."""
  return _upsample_nearest2x(x)


def _upsample_nearest2x(x: jax.Array) -> jax.Array:
  b, *spatial, c = x.shape
  pairs = [a for s in spatial for a in (s, 2)]
  index = (slice(None),) + tuple(a for _ in spatial for a in (slice(None), None)) + (slice(None),)
  x = jnp.broadcast_to(x[index], (b, *pairs, c))
  return x.reshape(b, *(2 * s for s in spatial), c)


def _upsample_fwd(x):
  return _upsample_nearest2x(x), None


def _upsample_bwd(_, g):
  acc_dtype = jnp.promote_types(g.dtype, jnp.float32)
  total = None
  for offsets in itertools.product((0, 1), repeat=g.ndim - 2):
    part = g[(slice(None),) + tuple(slice(o, None, 2) for o in offsets)].astype(acc_dtype)
    total = part if total is None else total + part
  return (total.astype(g.dtype),)


upsample_nearest2x.defvjp(_upsample_fwd, _upsample_bwd)


def concatenate(xs: Sequence[jax.Array], axis: int = -1) -> jax.Array:
  """`jnp.concatenate` (a decoder's skip connections). bf16 operands move as their uint16 bits:
  XLA's CPU backend concatenates bf16 through float32, converting every operand and the result
  (8 x 128^2 x (64 + 64): 56 vs 15 ms); moving bits is exact, so the values are the same."""
  xs = tuple(xs)
  if len(xs) > 1 and all(x.dtype == jnp.bfloat16 for x in xs):
    return _concatenate_bits(xs, axis % xs[0].ndim)
  return jnp.concatenate(xs, axis=axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _concatenate_bits(xs: tuple[jax.Array, ...], axis: int) -> jax.Array:
  bits = [jax.lax.bitcast_convert_type(x, jnp.uint16) for x in xs]
  return jax.lax.bitcast_convert_type(jax.lax.concatenate(bits, axis), xs[0].dtype)


def _concatenate_bits_fwd(xs, axis):
  return _concatenate_bits(xs, axis), tuple(x.shape[axis] for x in xs)


def _concatenate_bits_bwd(axis, sizes, g):
  """Each operand's part of the cotangent (slices)."""
  parts, start = [], 0
  for size in sizes:
    parts.append(jax.lax.slice_in_dim(g, start, start + size, axis=axis))
    start += size
  return (tuple(parts),)


_concatenate_bits.defvjp(_concatenate_bits_fwd, _concatenate_bits_bwd)


@functools.lru_cache(maxsize=64)
def _interp_matrix(n_in: int, n_out: int, align_corners: bool) -> np.ndarray:
  """(n_out, n_in) linear-interpolation weights with PyTorch's coordinate convention."""
  i = np.arange(n_out, dtype=np.float64)
  if align_corners:
    src = i * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros_like(i)
  else:
    src = np.maximum((i + 0.5) * (n_in / n_out) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m.astype(np.float32)


def resize_bilinear(x: jax.Array, size: Sequence[int], align_corners: bool = False) -> jax.Array:
  """Bilinear resize of NHWC `x` to `size`, matching `F.interpolate(mode="bilinear")`.

  Written as two small matrix products (rows, then columns): exact for any ratio, runs on the
  tensor cores, and supports `align_corners=True`, which smp's `UpsamplingBilinear2d` heads
  use and `jax.image.resize` does not offer.
  """
  h, w = int(size[0]), int(size[1])
  if (x.shape[1], x.shape[2]) == (h, w):
    return x
  mh = jnp.asarray(_interp_matrix(x.shape[1], h, align_corners), x.dtype)
  mw = jnp.asarray(_interp_matrix(x.shape[2], w, align_corners), x.dtype)
  x = jnp.einsum("oh,bhwc->bowc", mh, x)
  return jnp.einsum("pw,bowc->bopc", mw, x)


def check_input(x: jax.Array, multiple: int, channels: int, name: str, ndim: int = 2) -> None:
  """Shapes are static under jit, so a bad patch fails at trace time with a clear message."""
  layout, axes = ("NHWC", "H, W") if ndim == 2 else ("NDHWC", "D, H, W")
  if x.ndim != ndim + 2 or x.shape[-1] != channels:
    raise ValueError(f"{name} expects {layout} input (B, {axes}, {channels}), "
                     f"got {tuple(x.shape)}")
  spatial = x.shape[1:-1]
  if any(s % multiple for s in spatial):
    raise ValueError(f"{name} needs {axes.replace(', W', ' and W')} that are multiples of "
                     f"{multiple}, got {'x'.join(map(str, spatial))}"
                     + ("; pad with bonejax.models.pad_to_multiple" if ndim == 2 else ""))
