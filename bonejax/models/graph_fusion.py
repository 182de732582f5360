"""ReLU and residual adds folded into the oneDNN convolutions of an inference graph (post-ops).

    y = fused_call(model_forward, x)      # same values as model_forward(x), fewer passes

The inference graph's oneDNN convolutions are single `ffi_call` equations in its jaxpr
(`onednn.conv_inference`; their configuration is the call's `conf` attribute). The model's own
code applies the activation and the residual add after each (now Identity) BatchNorm; XLA cannot
fuse an elementwise loop into a custom call, so each is one more pass over a large activation
map (in bf16, computed through float32). `fused_call` traces the forward pass once
(`jax.make_jaxpr`, abstract), rewrites its jaxpr and evaluates the rewritten one in the caller's
trace (under `jit`: the compiled graph simply has fewer operations).

The rewrite is made only where it provably computes the same function, read from the jaxpr:

  conv -> add:   the convolution's output has exactly one use (no other equation, not a
                 result of the pass), that use is an `add` of two values of the output's shape
                 and dtype, and the other operand is not the convolution's output itself. The
                 add becomes oneDNN's sum post-op (`relu(conv + bias + residual)` order below).
  (conv | conv -> add) -> relu:  the value has exactly one use, an elementwise max with the
                 literal 0 (`jax.nn.relu`: the max inside its custom_jvp / jit wrappers, or a
                 bare `max(x, 0)`). The max becomes oneDNN's ReLU post-op. The ReLU's own
                 output may have any number of uses: they all read the fused result.

  conv -> cast -> relu:  the same through a float-to-float cast (a conv whose output dtype
                 oneDNN does not write: the float32 stem before a bf16 graph): the ReLU runs
                 before the cast, which then writes the ReLU's result (rounding keeps signs).

Two operations XLA's CPU backend runs slowly are replaced by exact equivalents on the way:
a bf16 `concatenate` (which XLA computes through float32, converting every operand and the
result) concatenates the operands' bits as uint16, and a `reduce_window_max` (max-pooling: a
scalar loop there) becomes the max of its window's strided slices, one vectorised loop.

A value with a second consumer (a pre-activation kept for a skip connection, a block output
used twice) is left unfused, as are equations inside nested jaxprs (loops, inner jits). The
fused convolution is placed where the absorbed add / max was, so every operand (the residual
included) exists by then. Numerics: ReLU commutes with rounding to the output dtype, so that
part is exact; the fused add rounds once (float32 accumulator + bias + residual, then the
output dtype) where the unfused graph also rounds the convolution's output before the add, so
in bf16 the fused result is the closer one to the exact value (float32: equal to rounding).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

_RELU_WRAPPERS = ("custom_jvp_call", "jit", "pjit", "closed_call", "core_call")


def _is_zero_literal(v) -> bool:
  if not isinstance(v, jex.Literal):
    return False
  val = np.asarray(v.val)
  return val.shape == () and val == 0


def _relu_of(eqn, var) -> bool:
  """Whether `eqn` computes max(var, 0) elementwise, with an output of var's type."""
  if len(eqn.outvars) != 1 or eqn.outvars[0].aval != var.aval:
    return False
  if eqn.primitive.name == "max" and len(eqn.invars) == 2:
    a, b = eqn.invars
    return (a is var and _is_zero_literal(b)) or (b is var and _is_zero_literal(a))
  if eqn.primitive.name in _RELU_WRAPPERS and list(eqn.invars) == [var]:
    inner = eqn.params.get("call_jaxpr", eqn.params.get("jaxpr"))
    inner = inner.jaxpr if isinstance(inner, jex.ClosedJaxpr) else inner
    if not isinstance(inner, jex.Jaxpr) or inner.constvars or len(inner.eqns) != 1:
      return False
    if len(inner.invars) != 1 or len(inner.outvars) != 1:
      return False
    only = inner.eqns[0]
    return only.outvars[0] is inner.outvars[0] and _relu_of(only, inner.invars[0])
  return False


def _uses(jaxpr) -> dict:
  """var -> list of (equation index, or None for a result of the jaxpr), once per operand."""
  uses: dict = {}
  for i, eqn in enumerate(jaxpr.eqns):
    for v in eqn.invars:
      if isinstance(v, jex.Var):
        uses.setdefault(v, []).append(i)
  for v in jaxpr.outvars:
    if isinstance(v, jex.Var):
      uses.setdefault(v, []).append(None)
  return uses


def _sole_use(uses: dict, var):
  found = uses.get(var, [])
  return found[0] if len(found) == 1 else None


def _fused_params(eqn, conf: np.ndarray, residual) -> dict:
  """The params of the oneDNN call `eqn` with `conf` and `residual` as its 4th operand (read
  off a freshly traced call, so the FFI's own parameter encoding is kept)."""
  from bonejax.models import onednn
  out = eqn.outvars[0].aval
  avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars[:3]]
  avals.append(jax.ShapeDtypeStruct(residual.aval.shape, residual.aval.dtype))
  traced = jax.make_jaxpr(lambda x, k, b, r: onednn.forward_call_with_conf(
      x, k, b, r, conf, jax.ShapeDtypeStruct(out.shape, out.dtype)))(*avals)
  return next(e for e in traced.jaxpr.eqns if e.primitive.name == "ffi_call").params


def _inline(fn: Callable, invars: list, outvars: list) -> list | None:
  """The equations of `fn` traced on `invars`' types, wired to read `invars` and write
  `outvars` (None where that cannot be done: constants, a result that is an operand)."""
  avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in invars]
  closed = jax.make_jaxpr(fn)(*avals)
  mini = closed.jaxpr
  produced = {v for e in mini.eqns for v in e.outvars}
  if (closed.consts or len(mini.outvars) != len(outvars)
      or not all(isinstance(v, jex.Var) and v in produced for v in mini.outvars)
      or len(set(mini.outvars)) != len(mini.outvars)
      or any(a.aval.shape != b.aval.shape or a.aval.dtype != b.aval.dtype
             for a, b in zip(mini.outvars, outvars))):
    return None
  sub = dict(zip(mini.invars, invars))
  sub.update(zip(mini.outvars, outvars))
  rename = lambda vs: [sub.get(v, v) if isinstance(v, jex.Var) else v for v in vs]  # noqa: E731
  return [e.replace(invars=rename(e.invars), outvars=rename(e.outvars)) for e in mini.eqns]


def _concatenate_as_bits(eqn) -> list | None:
  """A bf16 concatenation as a uint16 one (XLA's CPU backend concatenates bf16 through float32:
  a convert of every operand and of the result; moving the bits is exact)."""
  dt = eqn.outvars[0].aval.dtype
  if dt != jnp.bfloat16 or any(v.aval.dtype != dt for v in eqn.invars):
    return None
  dim = eqn.params["dimension"]

  def fn(*ops):
    bits = [jax.lax.bitcast_convert_type(o, jnp.uint16) for o in ops]
    return jax.lax.bitcast_convert_type(jax.lax.concatenate(bits, dim), dt)

  return _inline(fn, list(eqn.invars), list(eqn.outvars))


def _max_pool_as_slices(eqn) -> list | None:
  """reduce_window_max as the max of its window's strided slices of the (-inf) padded input:
  one elementwise loop that XLA vectorises (its CPU reduce-window is a scalar loop, the
  costliest non-convolution operation of unet_resnet18). Max is exact, so equal values."""
  p = eqn.params
  if any(d != 1 for d in tuple(p["base_dilation"]) + tuple(p["window_dilation"])):
    return None
  x = eqn.invars[0]
  if not jnp.issubdtype(x.aval.dtype, jnp.floating):
    return None
  window, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
  out_shape = eqn.outvars[0].aval.shape

  def fn(x):
    pads = [(lo, hi, 0) for lo, hi in padding]
    if x.dtype == jnp.bfloat16:  # padded as bits (XLA's CPU pads bf16 through float32)
      ninf = np.array(-np.inf, jnp.bfloat16).view(np.uint16)
      xp = jax.lax.bitcast_convert_type(
          jax.lax.pad(jax.lax.bitcast_convert_type(x, jnp.uint16), ninf, pads), x.dtype)
    else:
      xp = jax.lax.pad(x, jnp.array(-jnp.inf, x.dtype), pads)
    best = None
    for offset in np.ndindex(*window):
      limit = [o + (n - 1) * s + 1 for o, n, s in zip(offset, out_shape, strides)]
      part = jax.lax.slice(xp, offset, limit, strides)
      best = part if best is None else jax.lax.max(best, part)
    return best

  return _inline(fn, [x], list(eqn.outvars))


_XLA_CPU_REWRITES = {"concatenate": _concatenate_as_bits,
                     "reduce_window_max": _max_pool_as_slices}


def fuse_jaxpr(jaxpr) -> tuple[Any, int]:
  """(the rewritten jaxpr, the number of equations absorbed into convolutions)."""
  from bonejax.models import onednn
  eqns = list(jaxpr.eqns)
  uses = _uses(jaxpr)
  replace: dict[int, list] = {}  # equation index -> its replacement equations ([]: dropped)
  absorbed = 0
  for i, eqn in enumerate(eqns):
    conf = onednn.forward_conf(eqn)
    # Not yet fused (conf: ..., relu, has_bias, has_sum) and its residual operand empty.
    if conf is None or conf[9] or conf[11] or eqn.invars[3].aval.shape != (0,):
      continue
    out, invars, conf, last = eqn.outvars[0], list(eqn.invars), conf.copy(), None
    j = _sole_use(uses, out)
    if j is not None and j not in replace and eqns[j].primitive.name == "add":
      a, b = eqns[j].invars
      other = b if a is out else a
      if (isinstance(other, jex.Var) and other is not out and other.aval == out.aval
          and eqns[j].outvars[0].aval == out.aval):
        invars[3] = other
        conf[11] = 1
        replace[j], last, out = [], j, eqns[j].outvars[0]
        j = _sole_use(uses, out)
    if j is not None and j not in replace and _relu_of(eqns[j], out):
      conf[9] = 1
      replace[j], last, out = [], j, eqns[j].outvars[0]
    elif (last is None and j is not None and j not in replace
          and eqns[j].primitive.name == "convert_element_type"
          and jnp.issubdtype(eqns[j].outvars[0].aval.dtype, jnp.floating)):
      # conv -> cast -> ReLU (a conv whose output dtype oneDNN does not write): the ReLU
      # before the cast (rounding keeps signs and zero), the cast now writes the ReLU's result.
      cast = eqns[j]
      k = _sole_use(uses, cast.outvars[0])
      if k is not None and k not in replace and _relu_of(eqns[k], cast.outvars[0]):
        conf[9] = 1
        replace[k] = []
        replace[j] = [cast.replace(outvars=list(eqns[k].outvars))]
        replace[i] = [eqn.replace(params=_fused_params(eqn, conf, invars[3]))]
        absorbed += 1
      continue
    if last is None:
      continue
    replace[i] = []
    replace[last] = [eqn.replace(invars=invars, outvars=[out],
                                 params=_fused_params(eqn, conf, invars[3]))]
    absorbed += int(conf[9]) + int(conf[11])
  for i, eqn in enumerate(eqns):
    rule = _XLA_CPU_REWRITES.get(eqn.primitive.name)
    if rule is not None and i not in replace:
      new = rule(eqn)
      if new is not None:
        replace[i] = new
  if not replace:
    return jaxpr, 0
  return jaxpr.replace(eqns=[n for i, e in enumerate(eqns) for n in replace.get(i, [e])]), \
      absorbed


def fused_convs(jaxpr) -> list[dict]:
  """The oneDNN forward calls of a jaxpr's top level: their post-ops (tests, benchmarks)."""
  from bonejax.models import onednn
  found = []
  for eqn in jaxpr.eqns:
    conf = onednn.forward_conf(eqn)
    if conf is not None:
      found.append({"out": tuple(eqn.outvars[0].aval.shape), "relu": bool(conf[9]),
                    "bias": bool(conf[10]), "sum": bool(conf[11])})
  return found


def fused_call(fn: Callable, *args):
  """fn(*args) (arrays or pytrees of arrays), evaluated from its fused jaxpr."""
  flat, in_tree = jax.tree.flatten(args)
  closed, out_shape = jax.make_jaxpr(lambda *a: fn(*jax.tree.unflatten(in_tree, a)),
                                     return_shape=True)(*flat)
  jaxpr, _ = fuse_jaxpr(closed.jaxpr)
  out = jax.core.eval_jaxpr(jaxpr, closed.consts, *flat)
  return jax.tree.unflatten(jax.tree.structure(out_shape), out)
