"""BatchNorm with batch statistics (training) on oneDNN, as XLA FFI calls with their own VJP.

Why: XLA's CPU backend computes a BatchNorm's per-channel mean and variance as column
reductions, ~8x slower than oneDNN's (and PyTorch's) kernels on NHWC maps (8 x 128^2 x 64 bf16:
15 ms for the statistics against 1.8 ms for PyTorch's whole normalisation); BatchNorm forward +
backward was 16 % of a unet_resnet18 training step on 2 cores (cpu_train_profile). The handlers
are in onednn_bnorm.inc (part of the oneDNN extension).

`OnednnBatchNorm` is `nnx.BatchNorm` with the same variables (the state tree, checkpoints and
bundles are unchanged): `inference_graph.lower_convs` gives a training model's BatchNorms this
class on the CPU where the extension is built. In training mode (batch statistics), in
bfloat16 (float32 stays on Flax's more accurate two-pass code: see DTYPES), it computes
what Flax computes - statistics over every axis but the last, biased two-pass variance, the
running averages updated with the module's momentum, y = (x - mean) / sqrt(var + eps) * scale +
bias in the module's dtype - on oneDNN, and its gradient with oneDNN's backward. Anything else
(running averages, a mask, a cross-device `axis_name`, no scale or bias, other ranks, float32,
a shape oneDNN answers only with its reference code) runs Flax's own code. `norm_relu(x)` is
relu(bn(x)) as one primitive (`layers.ConvBNAct` asks for it; None where it cannot run).
"""

from __future__ import annotations

import ctypes
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bonejax.models import onednn

# bfloat16 only: oneDNN 2.6 sums a channel's statistics sequentially per thread, so its float32
# error grows with the pixels summed (1e-5 relative on 2 x 64^2, where XLA's tree reduction
# stays at 1e-7), which put a float32 unet_resnet18 step's gradients 8e-3 off float64
# (tests/test_onednn.py bounds them at 1e-4); in bfloat16 the inputs' own rounding (4e-3)
# dominates and oneDNN's results are as close to float64 as XLA's (measured: 2.4e-3 vs 3.7e-3).
DTYPES = ("bfloat16",)


def supports(shape: tuple[int, ...], dtype: str, relu: bool = False) -> tuple[bool, str]:
  """(oneDNN runs a training BatchNorm (`relu`: with the ReLU after it) of this NHWC shape and
  dtype with an optimised kernel, its implementation names or why not)."""
  if dtype not in DTYPES or len(shape) != 4 or min(shape) < 1:
    return False, f"{dtype} {shape}"
  if not onednn.available():
    return False, onednn.unavailable_reason() or "unavailable"
  ok, impl, _ = _probe(tuple(int(s) for s in shape), dtype, bool(relu))
  return ok, impl


@functools.lru_cache(maxsize=None)
def _probe(shape: tuple[int, ...], dtype: str, relu: bool) -> tuple[bool, str, int]:
  return onednn.probe_aux("bonejax_onednn_bn_probe", (ctypes.c_int64 * 4)(*shape),
                          int(dtype == "bfloat16"), int(relu))


def _channels(x):
  return jax.ShapeDtypeStruct((x.shape[-1],), jnp.float32)


def _forward(x, scale, bias, eps, relu):
  """(y, mean, var, workspace): the forward call; the workspace (which outputs the fused ReLU
  passed) is a 1-byte placeholder without `relu`."""
  ws = _probe(tuple(x.shape), jnp.dtype(x.dtype).name, True)[2] if relu else 1
  return jax.ffi.ffi_call(onednn.BN_FWD, (
      jax.ShapeDtypeStruct(x.shape, x.dtype), _channels(x), _channels(x),
      jax.ShapeDtypeStruct((max(ws, 1),), jnp.uint8)))(x, scale, bias, eps=eps,
                                                        relu=np.int64(relu))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _bn(x, scale, bias, eps, relu):
  return _forward(x, scale, bias, eps, relu)[:3]


def _bn_fwd(x, scale, bias, eps, relu):
  y, mean, var, ws = _forward(x, scale, bias, eps, relu)
  return (y, mean, var), (x, mean, var, scale, bias, ws)


def _bn_bwd(eps, relu, res, g):
  x, mean, var, scale, bias, ws = res
  dy = g[0]  # the statistics leave only through stop_gradient (running averages)
  dx, dscale, dbias = jax.ffi.ffi_call(
      onednn.BN_BWD, (jax.ShapeDtypeStruct(x.shape, x.dtype), _channels(x), _channels(x)))(
          x, dy.astype(x.dtype), mean, var, scale, bias, ws, eps=eps, relu=np.int64(relu))
  return dx, dscale, dbias


_bn.defvjp(_bn_fwd, _bn_bwd)


def batch_norm_train(x, scale, bias, eps: float, relu: bool = False):
  """(y, mean, var): x (N, H, W, C) normalised by its batch statistics on oneDNN (`relu`: and
  the ReLU after it, one primitive); scale and bias float32 (C,); y in x's dtype, mean and
  (biased) var float32, outside the gradient."""
  if not onednn.available():  # loads the extension, registering its handlers
    raise RuntimeError(f"oneDNN BatchNorm is unavailable: {onednn.unavailable_reason()}")
  y, mean, var = _bn(x, scale.astype(jnp.float32), bias.astype(jnp.float32), np.float32(eps),
                     bool(relu))
  return y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)


class OnednnBatchNorm(nnx.BatchNorm):
  """nnx.BatchNorm whose training-mode call runs on oneDNN where it can (see the module)."""

  def _onednn_ok(self, x, use_running_average, mask, relu: bool = False) -> bool:
    if use_running_average or mask is not None or self.axis_name is not None:
      return False
    axes = tuple(self.axis) if isinstance(self.axis, (tuple, list)) else (self.axis,)
    if self.scale is None or self.bias is None or axes not in ((-1,), (x.ndim - 1,)):
      return False
    if jax.default_backend() != "cpu":
      return False
    dtype = jnp.dtype(self.dtype or x.dtype).name
    return supports(tuple(int(s) for s in x.shape), dtype, relu)[0]

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    use_ra = self.use_running_average if use_running_average is None else use_running_average
    if not self._onednn_ok(x, use_ra, mask):
      return super().__call__(x, use_running_average, mask=mask)
    return self._train(x, relu=False)

  def norm_relu(self, x):
    """relu(self(x)) as one oneDNN primitive in training mode, or None where this call would
    not run on oneDNN (the caller then applies the two itself)."""
    if not self._onednn_ok(x, self.use_running_average, None, relu=True):
      return None
    return self._train(x, relu=True)

  def _train(self, x, relu: bool):
    y, mean, var = batch_norm_train(x.astype(self.dtype or x.dtype), self.scale[...],
                                    self.bias[...], self.epsilon, relu)
    m = self.momentum
    self.mean[...] = m * self.mean[...] + (1 - m) * mean.astype(self.mean.dtype)
    self.var[...] = m * self.var[...] + (1 - m) * var.astype(self.var.dtype)
    return y
