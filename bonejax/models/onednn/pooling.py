"""2D max pooling for training on oneDNN, as XLA FFI calls with their own VJP.

Why: XLA's CPU backend differentiates reduce_window-max through select-and-scatter over packed
(value, index) pairs: a ResNet stem's 3x3 / 2 max-pool of 8 x 128^2 x 64 bf16 takes 143 ms
forward + backward, PyTorch's 10.5 ms (handlers in onednn_pool.inc). Max pooling is exact, so
this runs in float32 and bfloat16 alike; padding counts as -inf and the gradient goes to the
first maximum of each window in row-major order, as PyTorch's MaxPool2d (tests/test_max_pool.py).

Used by `layers.max_pool(..., lowering="onednn")`: the encoders and U-Nets keep the lowering of
their max-pools in a static attribute (`pool_lowering`), which `inference_graph.lower_convs`
sets to "onednn" on the CPU where the extension is built; a shape or dtype oneDNN does not take
runs XLA's reduce_window.
"""

from __future__ import annotations

import ctypes
import functools

import jax
import jax.numpy as jnp
import numpy as np

from bonejax.models import onednn

DTYPES = ("float32", "bfloat16")


def _conf(kernel: int, stride: int, pad: int) -> np.ndarray:
  return np.array([kernel, kernel, stride, stride, pad, pad, pad, pad], np.int64)


def out_shape(shape, kernel: int, stride: int, pad: int) -> tuple[int, ...]:
  n, h, w, c = shape
  return (n, (h + 2 * pad - kernel) // stride + 1, (w + 2 * pad - kernel) // stride + 1, c)


def supports(shape, dtype: str, kernel: int, stride: int, pad: int) -> tuple[bool, str]:
  """(oneDNN runs this NHWC max-pool for training with an optimised kernel, what it runs)."""
  if dtype not in DTYPES or len(shape) != 4 or min(shape) < 1:
    return False, f"{dtype} {tuple(shape)}"
  if pad >= kernel or min(out_shape(shape, kernel, stride, pad)[1:3]) < 1:
    return False, "padding as large as the window, or an empty output"
  if not onednn.available():
    return False, onednn.unavailable_reason() or "unavailable"
  ok, impl, _ = _probe(tuple(int(s) for s in shape), dtype, int(kernel), int(stride), int(pad))
  return ok, impl


@functools.lru_cache(maxsize=None)
def _probe(shape, dtype, kernel, stride, pad) -> tuple[bool, str, int]:
  arr = lambda v: (ctypes.c_int64 * len(v))(*[int(i) for i in v])  # noqa: E731
  return onednn.probe_aux("bonejax_onednn_pool_probe", arr(shape),
                          arr(out_shape(shape, kernel, stride, pad)), int(dtype == "bfloat16"),
                          arr(_conf(kernel, stride, pad)))


def _forward(x, kernel, stride, pad):
  ws = _probe(tuple(x.shape), jnp.dtype(x.dtype).name, kernel, stride, pad)[2]
  return jax.ffi.ffi_call(onednn.POOL_FWD, (
      jax.ShapeDtypeStruct(out_shape(x.shape, kernel, stride, pad), x.dtype),
      jax.ShapeDtypeStruct((max(ws, 1),), jnp.uint8)))(x, conf=_conf(kernel, stride, pad))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _pool(x, kernel, stride, pad, x_shape):
  return _forward(x, kernel, stride, pad)[0]


def _pool_fwd(x, kernel, stride, pad, x_shape):
  y, ws = _forward(x, kernel, stride, pad)
  return y, ws


def _pool_bwd(kernel, stride, pad, x_shape, ws, dy):
  dx = jax.ffi.ffi_call(onednn.POOL_BWD, jax.ShapeDtypeStruct(x_shape, dy.dtype))(
      dy, ws, conf=_conf(kernel, stride, pad))
  return (dx,)


_pool.defvjp(_pool_fwd, _pool_bwd)


def max_pool_train(x, kernel: int, stride: int, pad: int = 0):
  """NHWC max-pool on oneDNN, differentiable (the caller checks `supports` first)."""
  if not onednn.available():  # loads the extension, registering its handlers
    raise RuntimeError(f"oneDNN max-pool is unavailable: {onednn.unavailable_reason()}")
  return _pool(x, int(kernel), int(stride), int(pad), tuple(int(s) for s in x.shape))
