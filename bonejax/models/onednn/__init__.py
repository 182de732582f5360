"""oneDNN convolutions callable from JAX on the CPU (XLA FFI custom calls), with gradients.

    from bonejax.models import onednn
    if onednn.available():
      y = onednn.conv(x, kernel, bias, spec, out_dtype=jnp.bfloat16)   # NHWC, HWIO

XLA's CPU backend computes bf16 convolutions in float32 and its float32 convolutions lose to
oneDNN's (what PyTorch runs) on large maps with few channels; this module runs a convolution on
oneDNN instead: forward with bias (and optionally ReLU and a residual sum) as post-ops, and, as
its `jax.custom_vjp`, oneDNN's backward-data and backward-weights (bf16 operands, float32
accumulation, as PyTorch's autocast). The compiled extension (`onednn_conv.cc`) is built once
per machine at first use (`build.py`); where it cannot be built (no oneDNN, no compiler) one
`note:` line says so and `available()` is False: callers keep XLA's convolutions.

The inference graph calls `conv_inference` instead: the same forward call as one `ffi_call`
equation (no custom_vjp around it), whose ReLU / residual add `bonejax.models.graph_fusion`
folds into the post-ops, and whose reordered kernels the handler keeps between calls (checked
byte for byte against the kernel passed in). `handler_profile()` reads the handler's per-layer
time split when $BONEJAX_ONEDNN_PROFILE is set (benchmarks/cpu_forward_profile.py).

The same extension holds training's BatchNorm (batch statistics, bf16: `batch_norm.py`) and 2D
max-pool (`pooling.py`), where XLA's CPU code is ~10x and ~60x slower than oneDNN's; the
training lowering (`inference_graph.lower_convs`) routes them there.

`supports(spec, ...)` asks oneDNN, at trace time, whether it builds primitives for that shape
(and which implementation); a shape it refuses, or answers only with its slow reference code,
stays on XLA (`conv_lowering.Planner` checks before choosing "onednn"). $BONEJAX_ONEDNN=off
turns the path off.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bonejax.models.onednn import build as _build

_FWD, _BWD_DATA, _BWD_WEIGHTS = ("bonejax_onednn_conv_fwd", "bonejax_onednn_conv_bwd_data",
                                 "bonejax_onednn_conv_bwd_weights")
BN_FWD, BN_BWD = "bonejax_onednn_bn_fwd", "bonejax_onednn_bn_bwd"  # onednn/batch_norm.py
POOL_FWD, POOL_BWD = "bonejax_onednn_pool_fwd", "bonejax_onednn_pool_bwd"  # onednn/pooling.py
_lock = threading.Lock()
_state: dict[str, Any] = {}  # "lib" (ctypes handle) or "reason" (why not), once per process
_noted: set[str] = set()
_registered: dict[str, Any] = {}  # the library whose handlers XLA holds (never reset)


def note(text: str) -> None:
  """One `note:` line on stderr, once per process per text."""
  if text not in _noted:
    _noted.add(text)
    print(f"note: {text}", file=sys.stderr, flush=True)


def _load():
  with _lock:
    if "lib" in _state or "reason" in _state:
      return _state.get("lib")
    try:
      if os.environ.get("BONEJAX_ONEDNN", "").lower() in ("0", "off", "false", "no"):
        raise _build.BuildError("oneDNN convolutions are off ($BONEJAX_ONEDNN)")
      path = _build.build()
      # Idle OpenMP threads sleep instead of spinning, so that XLA's own threads get the cores
      # between oneDNN calls (read by libgomp when oneDNN loads it, below).
      os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
      if "lib" not in _registered:  # XLA keeps a target's first handler for the process
        lib = ctypes.CDLL(str(path))
        for name, sym in ((_FWD, "BonejaxOnednnConvForward"),
                          (_BWD_DATA, "BonejaxOnednnConvBackwardData"),
                          (_BWD_WEIGHTS, "BonejaxOnednnConvBackwardWeights"),
                          (BN_FWD, "BonejaxOnednnBatchNormForward"),
                          (BN_BWD, "BonejaxOnednnBatchNormBackward"),
                          (POOL_FWD, "BonejaxOnednnMaxPoolForward"),
                          (POOL_BWD, "BonejaxOnednnMaxPoolBackward")):
          jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, sym)),
                                      platform="cpu")
        lib.bonejax_onednn_probe.restype = ctypes.c_int
        _registered["lib"] = lib
      _state["lib"] = _registered["lib"]
    except (_build.BuildError, OSError, AttributeError) as e:
      _state["reason"] = str(e)
  if "reason" in _state:
    note(f"{_state['reason']}; convolutions run on XLA")
  return _state.get("lib")


def available() -> bool:
  """Whether the extension is built and loaded (builds it on the first call)."""
  return _load() is not None


def unavailable_reason() -> str | None:
  _load()
  return _state.get("reason")


def describe() -> str:
  """One line for benchmark reports: the oneDNN version and the ISA its kernels use here."""
  if not available():
    return f"off: {unavailable_reason()}"

  class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int),
                ("hash", ctypes.c_char_p), ("cpu_runtime", ctypes.c_uint),
                ("gpu_runtime", ctypes.c_uint)]

  lib = _state["lib"]
  lib.dnnl_version.restype = ctypes.POINTER(_Version)
  v = lib.dnnl_version().contents
  from bonejax.models.conv_spec import ConvSpec
  probe = ConvSpec(1, 32, 32, 64, 64, (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 1, "bfloat16")
  return (f"oneDNN {v.major}.{v.minor}.{v.patch}, 3x3 bf16 kernels "
          f"{supports(probe, train=True)[1]}")


def handler_profile(reset: bool = False) -> list[dict[str, Any]]:
  """Per cached primitive, the time its calls spent in the handler (only counted when
  $BONEJAX_ONEDNN_PROFILE was set before the first call): kernel reorder, residual copy and the
  primitive itself, in seconds. `key` is "fwd|x dims|w dims|y dims|dtypes|conf" (see the .cc).
  reset: zero the counters after reading."""
  lib = _load()
  if lib is None:
    return []
  size = lib.bonejax_onednn_profile(None, 0)
  buf = ctypes.create_string_buffer(size + 4096)
  lib.bonejax_onednn_profile(buf, len(buf))
  if reset:
    lib.bonejax_onednn_profile_reset()
  rows = []
  for line in buf.value.decode(errors="replace").splitlines():
    key, calls, reorder, copy, execute, impl = line.split("\t")
    rows.append({"key": key, "calls": int(calls), "reorder_s": float(reorder),
                 "copy_s": float(copy), "exec_s": float(execute), "impl": impl})
  return rows


def _reset_for_tests() -> None:
  with _lock:
    _state.clear()
    _noted.clear()
    _probe.cache_clear()


# ---------------------------------------------------------------------------------------------
# What oneDNN takes.
# ---------------------------------------------------------------------------------------------

DTYPES = ("float32", "bfloat16")


def _conf(spec, *, relu: bool = False, bias: bool = False, residual: bool = False,
          cache_weights: bool = False):
  (pt, pb), (pl, pr) = spec.padding
  return np.array([spec.stride[0], spec.stride[1], spec.dilation[0], spec.dilation[1],
                   pt, pb, pl, pr, spec.groups, int(relu), int(bias), int(residual),
                   int(cache_weights)], np.int64)


@functools.lru_cache(maxsize=None)
def _probe(spec, out_dtype: str, train: bool) -> tuple[bool, str]:
  lib = _load()
  if lib is None:
    return False, unavailable_reason() or "unavailable"
  ho, wo = spec.out_hw
  arr = lambda v: (ctypes.c_int64 * len(v))(*[int(i) for i in v])  # noqa: E731
  msg = ctypes.create_string_buffer(512)
  rc = lib.bonejax_onednn_probe(
      arr((spec.batch, spec.height, spec.width, spec.cin)),
      arr(spec.kernel + (spec.cin // spec.groups, spec.cout)),
      arr((spec.batch, ho, wo, spec.cout)), int(spec.dtype == "bfloat16"),
      int(out_dtype == "bfloat16"), arr(_conf(spec, bias=True)), int(train), msg, len(msg))
  return rc == 0, msg.value.decode(errors="replace")


def probe_aux(symbol: str, *args) -> tuple[bool, str, int]:
  """(oneDNN takes it with an optimised kernel, its implementation names or why not, its
  workspace in bytes) from one of the extension's BatchNorm / max-pool probes, called as
  `symbol(*args, &ws_bytes, msg, msg_len)`. The caller has checked `available()`."""
  msg = ctypes.create_string_buffer(512)
  ws = ctypes.c_int64(0)
  rc = getattr(_state["lib"], symbol)(*args, ctypes.byref(ws), msg, len(msg))
  impl = msg.value.decode(errors="replace")
  if rc != 0:
    return False, impl, 0
  if any(part.strip().startswith("ref") for part in impl.split(" / ")):
    return False, f"only oneDNN's reference implementation ({impl})", 0
  return True, impl, int(ws.value)


def supports(spec, out_dtype: Any = None, *, train: bool = False) -> tuple[bool, str]:
  """(oneDNN runs `spec` with an optimised kernel, its implementation names or why not)."""
  out = jnp.dtype(out_dtype or spec.dtype).name
  if spec.dtype not in DTYPES or out not in DTYPES:
    return False, f"dtype {spec.dtype}->{out}"
  if any(p < 0 for pair in spec.padding for p in pair) or min(spec.out_hw) < 1:
    return False, "negative padding or empty output"
  if spec.cin % spec.groups or spec.cout % spec.groups:
    return False, "channels not divisible by groups"
  ok, impl = _probe(spec, out, bool(train))
  if ok and "ref" in impl.split(":")[0].split(" / ")[0] or ok and " / ref" in impl:
    return False, f"only oneDNN's reference implementation ({impl})"
  return ok, impl


# ---------------------------------------------------------------------------------------------
# The calls.
# ---------------------------------------------------------------------------------------------


def _fwd_call(x, kernel, bias, residual, spec, out_dtype, relu, cache_weights=False):
  ho, wo = spec.out_hw
  out = jax.ShapeDtypeStruct((x.shape[0], ho, wo, kernel.shape[-1]), out_dtype)
  b = (jnp.zeros((0,), jnp.float32) if bias is None else bias.astype(jnp.float32))
  r = jnp.zeros((0,), out_dtype) if residual is None else residual.astype(out_dtype)
  conf = _conf(spec, relu=relu, bias=bias is not None, residual=residual is not None,
               cache_weights=cache_weights)
  aliases = {3: 0} if residual is not None else None
  return jax.ffi.ffi_call(_FWD, out, input_output_aliases=aliases)(x, kernel, b, r, conf=conf)


def backward_data(dy, kernel, x_shape, x_dtype, spec):
  """dx of a convolution from its output's cotangent `dy` (oneDNN backward-data)."""
  return jax.ffi.ffi_call(_BWD_DATA, jax.ShapeDtypeStruct(x_shape, x_dtype))(
      dy, kernel, conf=_conf(spec))


def backward_weights(x, dy, k_shape, spec):
  """The kernel's gradient, float32 HWIO (oneDNN backward-weights)."""
  return jax.ffi.ffi_call(_BWD_WEIGHTS, jax.ShapeDtypeStruct(k_shape, jnp.float32))(
      x, dy, conf=_conf(spec))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _conv(x, kernel, bias, residual, spec, out_dtype, relu):
  return _fwd_call(x, kernel, bias, residual, spec, out_dtype, relu)


def _conv_fwd(x, kernel, bias, residual, spec, out_dtype, relu):
  y = _fwd_call(x, kernel, bias, residual, spec, out_dtype, relu)
  return y, (x, kernel, bias, residual, y if relu else None)


def _conv_bwd(spec, out_dtype, relu, res, g):
  x, kernel, bias, residual, y = res
  if relu:
    g = jnp.where(y > 0, g, jnp.zeros_like(g))
  # The cotangent in the operands' dtype (bf16 stays bf16, as PyTorch's autocast backward);
  # oneDNN accumulates in float32.
  gc = g.astype(x.dtype)
  dx = backward_data(gc, kernel, x.shape, x.dtype, spec)
  dk = backward_weights(x, gc, kernel.shape, spec).astype(kernel.dtype)
  db = None if bias is None else jnp.sum(g.astype(jnp.float32), (0, 1, 2)).astype(bias.dtype)
  dr = None if residual is None else g.astype(residual.dtype)
  return dx, dk, db, dr


_conv.defvjp(_conv_fwd, _conv_bwd)


def _check_loaded():
  if _load() is None:
    raise RuntimeError(f"oneDNN convolutions are unavailable: {unavailable_reason()}")


def conv(x, kernel, bias, spec, *, out_dtype: Any = None, relu: bool = False, residual=None):
  """oneDNN convolution of NHWC `x` with HWIO `kernel` (+ float32 `bias`, ReLU, `residual`).

  x in the compute dtype `spec.dtype` (float32 or bfloat16), kernel in it or in float32 (a bf16
  layer's float32 master weights: oneDNN converts them while reordering, and their gradient
  comes back in float32, never rounded to bf16); the result in `out_dtype` (default: the
  compute dtype), accumulated in float32. Differentiable in x, kernel, bias and residual. The
  caller checks `supports(spec, out_dtype)` first.
  """
  _check_loaded()
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  return _conv(x, kernel, bias, residual, spec, out_dtype, bool(relu))


# ---------------------------------------------------------------------------------------------
# The inference graph's call: the forward custom call itself, one `ffi_call` equation in the
# jaxpr (a custom_vjp would hide it inside a closure), so that `bonejax.models.graph_fusion` can
# find it in a traced forward pass and fold the ReLU / residual add that follow it into its
# post-ops. Not differentiable (training runs `conv`). Its kernels are constant from call to
# call, so the handler keeps them in oneDNN's layout (`cache_weights`: reused only while the
# kernel passed in equals, byte for byte, the one they were made from; see onednn_conv.cc).
# ---------------------------------------------------------------------------------------------


# Read at trace time; benchmarks switch it off to measure the per-call reorder it saves.
KEEP_KERNELS = True
# Read at trace time (inference_graph.FastConv): training hands a bf16 layer its float32 master
# kernel (see `conv`); benchmarks switch it off to measure the casts it saves.
FLOAT32_KERNELS = True


def conv_inference(x, kernel, bias, spec, *, out_dtype: Any = None, relu: bool = False,
                   residual=None):
  """`conv`, forward only, as one `ffi_call` equation (what the inference graph calls)."""
  _check_loaded()
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  return _fwd_call(x, kernel, bias, residual, spec, out_dtype, bool(relu),
                   cache_weights=KEEP_KERNELS)


def forward_conf(eqn) -> np.ndarray | None:
  """The `conf` attribute of a jaxpr equation that is a oneDNN forward call, else None."""
  if eqn.primitive.name != "ffi_call" or eqn.params.get("target_name") != _FWD:
    return None
  conf = dict(eqn.params["attributes"])["conf"]
  return np.asarray(getattr(conf, "val", conf), np.int64)


def forward_call_with_conf(x, kernel, bias, residual, conf: np.ndarray, out):
  """The forward custom call with an explicit `conf` (as `_conf` builds it) and result `out`
  (a ShapeDtypeStruct); `bias` and `residual` are the call's operands (empty arrays where
  `conf` says none). The residual's buffer becomes the output's."""
  aliases = {3: 0} if int(conf[11]) else None
  return jax.ffi.ffi_call(_FWD, out, input_output_aliases=aliases)(
      x, kernel, bias, residual, conf=np.asarray(conf, np.int64))
