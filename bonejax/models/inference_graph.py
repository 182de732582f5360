"""A model's inference graph built for speed: BatchNorm folded away, convolutions lowered per layer.

    fast = build_inference_model(model, dtype=jnp.bfloat16, policy="measure")
    probs = jax.nn.softmax(fast(x), -1)     # same call, same logits (to rounding) as model.eval()

Design: no model is rewritten by hand. The graph is found by walking the NNX module tree and
watching one abstract forward pass:

1. The model is cloned and put in eval mode (BatchNorm running statistics, dropout off).
2. Every `nnx.Conv`, `nnx.ConvTranspose` and `nnx.BatchNorm` in the tree is swapped for a probe
   that records the call order and the identity of its input and output tracers; the model is
   traced once with `jax.make_jaxpr` on a tiny input (no FLOPs), and the originals put back.
   A BatchNorm whose input *is* the output of a convolution follows that convolution directly
   (conv -> BN, the only pattern of the zoo: ConvBNAct, ResNet blocks and shortcuts, the
   pointwise half of DeepLabV3+'s separable convs). The pair is folded only when the jaxpr of
   that pass shows the BatchNorm to be the convolution's *only* consumer (an output that also
   feeds a skip connection must keep its unnormalised values) and each of the two layers is
   called once (folding rewrites the layer's weights for every call of it).
   A model outside the zoo is also checked numerically once: folded and unfolded logits (both
   in float32, XLA's convolutions) on a random input; when they differ, the plain eval-mode
   model is returned instead, with one `note:` line on stderr (`build_inference_model`).
   tests/test_inference_graph.py checks every zoo model against the unfolded one.
3. Each such pair becomes one `FastConv` whose kernel and bias absorb the BatchNorm:
   W' = W * g / sqrt(v + eps) per output channel, b' = (b - m) * g / sqrt(v + eps) + beta; the
   BatchNorm becomes `Identity`. Every other convolution becomes a `FastConv` too (same weights),
   so the lowering applies everywhere. On the CPU (policy other than "xla") a 2x2 stride-2
   transposed convolution (the classic U-Net's up-sampling) becomes one dot product and a pixel
   shuffle. LayerNorm, attention, linear
   layers and an unpaired BatchNorm stay as they are (eval mode).
4. `dtype` sets the compute dtype of every layer except the first and last convolutions called,
   which stay float32 (the FP32_EDGES rule of bonejax.models.layers: the raw scan in, the logits
   out). Folded kernels are stored in their layer's compute dtype (cast once, not per call).
   Where those two run on oneDNN they are computed as three bf16 products each, to float32's
   accuracy (`FastConv.bf16x3`, `bonejax.models.onednn.bf16x3`; training's `lower_convs` too).
5. Each `FastConv` asks a shared `conv_lowering.Planner` at trace time which lowering to use
   for its input shape (XLA's convolution, bf16 dot products or oneDNN; measured per machine,
   cached).
6. Where that may be oneDNN (a custom call XLA cannot fuse an elementwise loop into), the
   module's class becomes a subclass whose call is `graph_fusion.fused_call` of the model's:
   a ReLU and a residual add that follow a oneDNN convolution become its post-ops, where the
   jaxpr of the forward pass proves it equivalent (`fused_class`, `bonejax.models.graph_fusion`).

Activations are not fused by hand: the model's own code applies them after the (now Identity)
BatchNorm. After XLA's convolutions and the dot lowerings XLA fuses bias + activation + cast
into one elementwise loop; after oneDNN's, 6. folds them into the convolution.

The result is an ordinary NNX module: `nnx.split` it once and jit a pure forward, as the
predictor does with the model itself. `lower_convs` is the training-side variant: convolutions
lowered (sharing the original Param variables, so the state tree and checkpoints are unchanged),
nothing folded.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bonejax.models import conv_lowering, graph_fusion
from bonejax.models.conv_lowering import ConvSpec, Planner


class Identity(nnx.Module):
  """Stands where a folded BatchNorm was; takes (and ignores) BatchNorm's call arguments."""

  def __call__(self, x, *args, **kwargs):
    del args, kwargs
    return x


def _pairs(value, n: int = 2) -> tuple:
  if value is None:
    value = 1
  return (int(value),) * n if isinstance(value, int) else tuple(int(v) for v in value)


def _explicit_padding(conv: nnx.Conv) -> tuple[tuple[int, int], tuple[int, int]]:
  pad = conv.padding
  if isinstance(pad, str):
    if pad.upper() == "VALID":
      return ((0, 0), (0, 0))
    if pad.upper() == "SAME" and _pairs(conv.strides) == (1, 1):
      # At stride 1 "SAME" does not depend on the input size: (k - 1) * d split low-first.
      pads = []
      for k, d in zip(conv.kernel_size, _pairs(conv.kernel_dilation)):
        total = (int(k) - 1) * d
        pads.append((total // 2, total - total // 2))
      return tuple(pads)
    raise ValueError(f"FastConv needs explicit, VALID or stride-1 SAME padding, got {pad!r} "
                     f"at strides {conv.strides}")
  if isinstance(pad, int):
    return ((pad, pad), (pad, pad))
  return tuple((int(p), int(p)) if isinstance(p, int) else (int(p[0]), int(p[1]))
               for p in pad)


class FastConv(nnx.Module):
  """A 2D convolution (NHWC, HWIO kernel) whose lowering a `Planner` picks per input shape.

  Attribute names match `nnx.Conv` (`kernel`, `bias`), so a model whose convs are swapped for
  FastConvs has the same state tree as before. The accumulator is float32; `out_dtype` is what
  the layer hands on (a folded BatchNorm's dtype, else the compute dtype).
  """

  def __init__(self, kernel: nnx.Variable | jax.Array, bias: nnx.Variable | jax.Array | None, *,
               strides, padding, dilation, groups: int, dtype: Any, out_dtype: Any = None,
               planner: Planner):
    self.kernel = kernel if isinstance(kernel, nnx.Variable) else nnx.Param(kernel)
    self.bias = bias if (bias is None or isinstance(bias, nnx.Variable)) else nnx.Param(bias)
    self.strides, self.padding = _pairs(strides), padding
    self.dilation, self.groups = _pairs(dilation), int(groups)
    self.dtype = jnp.dtype(dtype).type
    self.out_dtype = jnp.dtype(out_dtype or dtype).type
    self.planner = planner
    # A float32 layer of a bf16 model (FP32_EDGES): on oneDNN, three bf16 products
    # (onednn.bf16x3); set by `_mark_edges`.
    self.bf16x3 = False

  @classmethod
  def from_conv(cls, conv: nnx.Conv, *, planner: Planner, dtype: Any = None,
                out_dtype: Any = None, share: bool = True) -> "FastConv":
    """The same convolution; `share` keeps the very Param variables (training)."""
    dtype = dtype or conv.dtype or jnp.float32
    kernel, bias = conv.kernel, conv.bias
    if not share:
      kernel = nnx.Param(jnp.asarray(kernel[...]))
      bias = None if bias is None else nnx.Param(jnp.asarray(bias[...]))
    return cls(kernel, bias, strides=conv.strides, padding=_explicit_padding(conv),
               dilation=conv.kernel_dilation, groups=conv.feature_group_count, dtype=dtype,
               out_dtype=out_dtype, planner=planner)

  def spec(self, x) -> ConvSpec:
    kh, kw, _, cout = self.kernel.shape
    return ConvSpec(batch=int(x.shape[0]), height=int(x.shape[1]), width=int(x.shape[2]),
                    cin=int(x.shape[3]), cout=int(cout), kernel=(int(kh), int(kw)),
                    stride=self.strides, dilation=self.dilation, padding=self.padding,
                    groups=self.groups, dtype=jnp.dtype(self.dtype).name)

  def __call__(self, x: jax.Array) -> jax.Array:
    given = x
    x = x.astype(self.dtype)
    kernel = self.kernel[...]
    spec = self.spec(x)
    how = self.planner.choose(spec, self.out_dtype)
    bias = None if self.bias is None else self.bias[...]
    if how == "onednn":
      from bonejax.models import onednn
      from bonejax.models.onednn import bf16x3
      exact = given.dtype == jnp.bfloat16  # a bf16 input is exact: no low half to add
      if self.bf16x3 and bf16x3.supports(spec, exact, train=self.planner.train):
        return bf16x3.conv_bias(given if exact else x, kernel, bias, spec, self.out_dtype,
                                inference=not self.planner.train)
      # Training's float32 master kernel goes to oneDNN as it is: its reorder does the cast,
      # and the kernel's gradient stays float32 (onednn.conv).
      keep = self.planner.train and kernel.dtype == jnp.float32 and onednn.FLOAT32_KERNELS
      kernel = kernel if keep else kernel.astype(self.dtype)
    else:
      kernel = kernel.astype(self.dtype)
    return conv_lowering.conv_bias(how, x, kernel, bias, spec, self.out_dtype,
                                   inference=not self.planner.train)


class DotConvTranspose(nnx.Module):
  """A kxk, stride-k, VALID transposed convolution as one dot product and a pixel shuffle.

  Each input pixel paints its own kxk output block, so the transposed convolution is
  (B*H*W, C) x (C, k*k*O): a dense bf16-friendly matmul instead of XLA's dilated convolution.
  lax.conv_transpose (transpose_kernel=False) applies the kernel flipped; the stored kernel is
  flipped once at build time so that the call is a plain reshape.
  """

  def __init__(self, conv: nnx.ConvTranspose, *, dtype: Any):
    k = conv.kernel[...]
    kh, kw, cin, cout = k.shape
    self.k, self.cout = int(kh), int(cout)
    self.dtype = jnp.dtype(dtype).type
    flipped = k[::-1, ::-1]  # (kh, kw, C, O) -> (C, kh*kw*O), blocks in output order
    self.kernel = nnx.Param(jnp.transpose(flipped, (2, 0, 1, 3)).reshape(cin, kh * kw * cout)
                            .astype(self.dtype))
    self.bias = None if conv.bias is None else nnx.Param(jnp.asarray(conv.bias[...],
                                                                     jnp.float32))

  @staticmethod
  def applies(conv: nnx.ConvTranspose) -> bool:
    ks = tuple(conv.kernel_size)
    return (len(ks) == 2 and ks[0] == ks[1] and _pairs(conv.strides) == ks
            and isinstance(conv.padding, str) and conv.padding.upper() == "VALID"
            and not conv.transpose_kernel and _pairs(conv.kernel_dilation) == (1, 1)
            and conv.mask is None)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, _ = x.shape
    k, o = self.k, self.cout
    y = jax.lax.dot_general(x.astype(self.dtype), self.kernel[...], (((3,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32)
    if self.bias is not None:
      y = y + jnp.tile(self.bias[...], k * k)
    y = y.reshape(b, h, w, k, k, o).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * k, w * k, o)
    return y.astype(self.dtype)


# ---------------------------------------------------------------------------------------------
# Walking the module tree.
# ---------------------------------------------------------------------------------------------


def _modules(root: nnx.Module, types) -> list[tuple[tuple, nnx.Module]]:
  return [(tuple(path), node) for path, node in nnx.iter_graph(root)
          if isinstance(node, types) and path]


def _get(root, path):
  node = root
  for key in path:
    node = node[key] if isinstance(node, (nnx.List, nnx.Dict, list, dict)) else getattr(node, key)
  return node


def _set(root, path, new) -> None:
  parent = _get(root, path[:-1])
  if isinstance(parent, (nnx.List, nnx.Dict)):
    parent[path[-1]] = new
  else:
    setattr(parent, path[-1], new)


def _mark(x):
  # An equation of its own in the probe pass's jaxpr whose output is exactly this value, so the
  # value's consumers can be counted there (the pass is abstract: the barrier costs nothing).
  return jax.lax.optimization_barrier(x)


class _Probe(nnx.Module):
  """Stands in for a layer during the tracing pass and records what flows through it.

  A convolution's output and a BatchNorm's input pass through `_mark`; `marks` lists them in
  call order, which is the order of their equations in the jaxpr.
  """

  def __init__(self, inner: nnx.Module, path: tuple, log: list, marks: list):
    self.inner, self.path, self.log, self.marks = inner, path, log, marks

  def __call__(self, x, *args, **kwargs):
    x_in = x
    if isinstance(self.inner, nnx.BatchNorm):
      x = _mark(x)
      self.marks.append(("bn_in", len(self.log)))
    y = self.inner(x, *args, **kwargs)
    if isinstance(self.inner, nnx.Conv):
      y = _mark(y)
      self.marks.append(("conv_out", len(self.log)))
    self.log.append((self.path, x_in, y))
    return y


def _barriers(jaxpr) -> list[tuple[Any, Any]]:
  """(equation, its jaxpr) of every optimization_barrier, nested jaxprs included, in order."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "optimization_barrier":
      found.append((eqn, jaxpr))
    for sub in _subjaxprs(eqn.params.values()):
      found.extend(_barriers(sub))
  return found


def _subjaxprs(values):
  for v in values:
    if isinstance(v, jex.ClosedJaxpr):
      yield v.jaxpr
    elif isinstance(v, jex.Jaxpr):
      yield v
    elif isinstance(v, (tuple, list)):
      yield from _subjaxprs(v)


def _consumers(jaxpr, var) -> list:
  """Equations of `jaxpr` reading `var`, and a `None` for each time the jaxpr returns it."""
  uses = [e for e in jaxpr.eqns for v in e.invars if isinstance(v, jex.Var) and v is var]
  return uses + [None for v in jaxpr.outvars if v is var]


def trace_layers(model: nnx.Module, sample_shape: Sequence[int]):
  """(calls, sole): the conv / transposed conv / BatchNorm calls and a single-consumer test.

  calls: (path, input, output) of every call, in call order; inputs and outputs are the pass's
    tracers, compared by identity to find conv -> BN.
  sole(i, j): whether call j (a BatchNorm) is the only consumer of call i's output (a conv),
    read from the jaxpr of the pass. False whenever the jaxpr cannot say (e.g. a layer inside
    a cached inner jit, traced once for several calls: the marks and equations do not match).
  One abstract pass (`jax.make_jaxpr`: shapes only, nothing computed); the model is left as it
  was.
  """
  layers = _modules(model, (nnx.Conv, nnx.ConvTranspose, nnx.BatchNorm))
  log: list = []
  marks: list = []
  for path, node in layers:
    _set(model, path, _Probe(node, path, log, marks))
  try:
    closed = jax.make_jaxpr(lambda x: model(x))(
        jax.ShapeDtypeStruct(tuple(sample_shape), jnp.float32))
    calls = list(log)  # the tracers are dead after the trace, but identity still holds
  finally:
    for path, node in layers:
      _set(model, path, node)
  barriers = _barriers(closed.jaxpr)
  mapped = len(barriers) == len(marks)
  conv_eqn = {i: barriers[k] for k, (kind, i) in enumerate(marks)
              if mapped and kind == "conv_out"}
  bn_eqn = {i: barriers[k][0] for k, (kind, i) in enumerate(marks) if mapped and kind == "bn_in"}

  def sole(i: int, j: int) -> bool:
    if i not in conv_eqn or j not in bn_eqn:
      return False
    eqn, jaxpr = conv_eqn[i]
    users = _consumers(jaxpr, eqn.outvars[0])
    return len(users) == 1 and users[0] is bn_eqn[j]

  return calls, sole


def _eval_mode(model: nnx.Module) -> None:
  for _, node in _modules(model, nnx.Module):
    if hasattr(node, "use_running_average"):
      node.use_running_average = True
    if hasattr(node, "deterministic"):
      node.deterministic = True


def fold_batchnorm(conv_kernel, conv_bias, bn: nnx.BatchNorm):
  """(kernel, bias) of conv -> eval BatchNorm as one convolution, in float32."""
  kernel = jnp.asarray(conv_kernel, jnp.float32)
  scale = jnp.asarray(bn.scale[...], jnp.float32) if bn.scale is not None else 1.0
  shift = jnp.asarray(bn.bias[...], jnp.float32) if bn.bias is not None else 0.0
  inv = scale * jax.lax.rsqrt(jnp.asarray(bn.var[...], jnp.float32) + bn.epsilon)
  bias = jnp.zeros(kernel.shape[-1], jnp.float32) if conv_bias is None else \
      jnp.asarray(conv_bias, jnp.float32)
  return kernel * inv, (bias - jnp.asarray(bn.mean[...], jnp.float32)) * inv + shift


def _folded_pairs(model: nnx.Module, calls, sole) -> dict[tuple, tuple]:
  """conv path -> BN path of every conv -> BN pair that folds (see the module docstring)."""
  times: dict[tuple, int] = {}
  for path, _, _ in calls:
    times[path] = times.get(path, 0) + 1
  made_by = {}  # id(output tracer) -> (call index, path) of the conv that made it
  bn_of: dict[tuple, tuple] = {}
  for j, (path, x, y) in enumerate(calls):
    node = _get(model, path)
    if isinstance(node, nnx.Conv):
      made_by[id(y)] = (j, path)
    elif isinstance(node, nnx.BatchNorm) and id(x) in made_by:
      i, conv_path = made_by[id(x)]
      if times[conv_path] == 1 and times[path] == 1 and sole(i, j):
        bn_of[conv_path] = path
  return bn_of


def _set_dtypes(model: nnx.Module, dtype: Any, edges: set) -> None:
  for path, node in _modules(model, (nnx.Conv, nnx.ConvTranspose, nnx.BatchNorm, nnx.LayerNorm,
                                     nnx.Linear)):
    if path not in edges and hasattr(node, "dtype"):
      node.dtype = dtype


def _rewrite(model: nnx.Module, bn_of: dict, called: set, planner: Planner) -> None:
  """Folds the pairs of `bn_of` and lowers every called convolution, in place."""
  for path, node in _modules(model, (nnx.Conv, nnx.ConvTranspose)):
    if path not in called:
      continue  # defined but unused in this forward: leave it alone
    if isinstance(node, nnx.ConvTranspose):
      # A lowering change like the others: CPU only, and not under policy "xla".
      if (DotConvTranspose.applies(node) and planner.backend == "cpu"
          and planner.policy != "xla"):
        _set(model, path, DotConvTranspose(node, dtype=node.dtype or jnp.float32))
      continue
    cdt = node.dtype or jnp.float32
    if path in bn_of:
      bn = _get(model, bn_of[path])
      bias = None if node.bias is None else node.bias[...]
      kernel, bias = fold_batchnorm(node.kernel[...], bias, bn)
      fast = FastConv(kernel.astype(cdt), bias, strides=node.strides,
                      padding=_explicit_padding(node), dilation=node.kernel_dilation,
                      groups=node.feature_group_count, dtype=cdt,
                      out_dtype=bn.dtype or cdt, planner=planner)
      _set(model, bn_of[path], Identity())
    else:
      fast = FastConv.from_conv(node, planner=planner, dtype=cdt, share=False)
      fast.kernel = nnx.Param(jnp.asarray(fast.kernel[...], cdt))
    _set(model, path, fast)
  _mark_edges(model)


def _mark_edges(model: nnx.Module) -> None:
  """In a model whose convolutions compute in bf16, its float32 ones (the FP32_EDGES layers)
  run as three bf16 products where they run on oneDNN (`FastConv.bf16x3`)."""
  fast = [node for _, node in _modules(model, FastConv)]
  if any(jnp.dtype(f.dtype) == jnp.bfloat16 for f in fast):
    for f in fast:
      f.bf16x3 = jnp.dtype(f.dtype) == jnp.float32


def in_zoo(model: nnx.Module) -> bool:
  """Whether `model` is an instance of a bonejax.models class (checked by the zoo's tests)."""
  from bonejax import models
  return any(type(model) is models.model_class(name)[0] for name in models.MODEL_NAMES)


def _concrete(model: nnx.Module) -> bool:
  return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(nnx.state(model)))


# Folded vs unfolded float32 logits may differ by reordered rounding only: ~1e-6 of the largest
# logit in the zoo's tests. A wrong fold moves logits by a good part of their size.
FOLD_RTOL = 1e-3


def fold_difference(model: nnx.Module, bn_of: dict, called: set,
                    sample_shape: Sequence[int]) -> tuple[float, float]:
  """(max |folded - unfolded|, max |unfolded|) of the logits on one random float32 input.

  `model` is an eval-mode model (not changed). Both sides run in float32 with XLA's own
  convolutions, so only the fold itself is compared.
  """
  ref = nnx.clone(model)
  for _, node in _modules(ref, nnx.Module):
    if getattr(node, "dtype", None) is not None:
      node.dtype = jnp.float32
  folded = nnx.clone(ref)
  _rewrite(folded, bn_of, called, Planner("xla"))
  x = jax.random.normal(jax.random.key(0), tuple(sample_shape), jnp.float32)
  a = np.asarray(ref(x), np.float64)
  b = np.asarray(folded(x), np.float64)
  if not (np.isfinite(a).all() and np.isfinite(b).all()):
    return float("inf"), float(np.nanmax(np.abs(a)))
  return float(np.abs(a - b).max()), float(np.abs(a).max())


_FUSED_CLASSES: dict[type, type] = {}


def fused_class(cls: type) -> type:
  """The subclass of model class `cls` whose call is `graph_fusion.fused_call` of `cls`'s.

  One per class (an NNX graphdef names the class), same name, attributes and state tree: code
  that reads the graph's layers or attributes sees the model it built it from.
  """
  sub = _FUSED_CLASSES.get(cls)
  if sub is None:
    base_call = cls.__call__

    def __call__(self, *args, **kwargs):
      return graph_fusion.fused_call(lambda *a: base_call(self, *a, **kwargs), *args)

    sub = type(cls)(cls.__name__, (cls,), {"__call__": __call__, "__doc__": cls.__doc__,
                                           "__module__": cls.__module__,
                                           "__qualname__": cls.__qualname__})
    _FUSED_CLASSES[cls] = sub
  return sub


def build_inference_model(model: nnx.Module, *, dtype: Any = None, policy: str = "auto",
                          planner: Planner | None = None,
                          sample_shape: Sequence[int] | None = None,
                          verify: bool | None = None, fuse: bool = True) -> nnx.Module:
  """An eval-mode copy of `model` with BatchNorm folded and convolutions lowered per layer.

  dtype: compute dtype of the inner layers (None: each layer's own). The first and last
    convolution stay float32 either way.
  policy: "auto" | "measure" | "xla" | "dots" (see bonejax.models.conv_lowering); ignored when
    `planner` is given. On a GPU every policy keeps XLA's (cuDNN) convolutions.
  sample_shape: the NHWC shape of the tracing pass (default (1, S, S, model.in_channels) with S
    the model's stride); any valid input shape gives the same graph.
  verify: compare folded and unfolded logits once (`fold_difference`) and, when they differ,
    return the plain eval-mode model (with `dtype` applied, nothing folded or lowered) and print
    one `note:` line on stderr. None (default): for models outside the zoo whose weights are
    concrete (not inside a trace, e.g. `make_folder`'s).
  fuse: on the CPU under a policy that may choose oneDNN, fold ReLUs and residual adds into the
    oneDNN convolutions they follow (`graph_fusion`; the module's class becomes
    `fused_class(type(model))`). False: the model's own call.
  `model` itself is not changed. The returned module's `planner` attribute reports the choices;
  its `inference_graph` attribute is "folded", or "plain" after a fallback.
  """
  planner = planner or Planner(policy)
  model = nnx.clone(model)
  _eval_mode(model)
  if sample_shape is None:
    side = int(getattr(model, "stride", 32))
    sample_shape = (1, side, side, int(getattr(model, "in_channels", 1)))
  calls, sole = trace_layers(model, sample_shape)

  conv_calls = [c for c in calls if isinstance(_get(model, c[0]), (nnx.Conv, nnx.ConvTranspose))]
  edges = {conv_calls[0][0], conv_calls[-1][0]} if conv_calls else set()
  called = {c[0] for c in conv_calls}
  bn_of = _folded_pairs(model, calls, sole)

  if verify is None:
    verify = bool(bn_of) and not in_zoo(model) and _concrete(model)
  graph = "folded"
  if verify:
    diff, size = fold_difference(model, bn_of, called, sample_shape)
    if not diff <= FOLD_RTOL * max(size, 1.0):
      print(f"note: inference graph off for {type(model).__name__}: folding its BatchNorms "
            f"changes the logits (by up to {diff:.3g} on logits up to {size:.3g}); predicting "
            f"with the model as it is", file=sys.stderr, flush=True)
      graph = "plain"

  # Compute dtypes first (BN output dtypes decide the folded convs' output dtypes).
  if dtype is not None:
    _set_dtypes(model, jnp.dtype(dtype).type, edges)
  if graph == "folded":
    _rewrite(model, bn_of, called, planner)
    if (fuse and planner.backend == "cpu" and planner.policy in ("onednn", "auto", "measure")
        and not planner.train):
      model.__class__ = fused_class(type(model))
  model.planner = planner
  model.inference_graph = graph
  return model


def lower_convs(model: nnx.Module, *, policy: str = "auto", planner: Planner | None = None,
                dtype: Any = None) -> nnx.Module:
  """`model` with every `nnx.Conv` replaced, in place, by a FastConv over the same variables,
  and, on the CPU under a policy that may choose oneDNN, every `nnx.BatchNorm` made an
  `onednn.batch_norm.OnednnBatchNorm` (batch statistics on oneDNN, same variables) and every
  module's max-pools set to run on oneDNN (`pool_lowering`, see `layers.max_pool`).

  Nothing is folded and train mode is kept: this is the training-side use of the lowering.
  The state tree (`nnx.state(model)`) is unchanged, so optimiser states and checkpoints of the
  original model fit. Returns `model`.
  """
  planner = planner or Planner(policy, train=True)
  for path, node in _modules(model, nnx.Conv):
    _set(model, path, FastConv.from_conv(node, planner=planner, dtype=dtype))
  _mark_edges(model)
  if planner.backend == "cpu" and planner.policy in ("onednn", "auto", "measure"):
    # BatchNorm's batch statistics on oneDNN too (XLA's column reductions are ~10x slower);
    # the same variables, only the class changes (each call falls back to Flax's code where
    # oneDNN cannot take it, or where its extension is missing).
    from bonejax.models.onednn import batch_norm as onednn_bn
    for _, node in _modules(model, nnx.BatchNorm):
      if type(node) is nnx.BatchNorm:
        node.__class__ = onednn_bn.OnednnBatchNorm
    # And max-pools (exact either way): modules that pool say how in `pool_lowering`.
    for _, node in nnx.iter_graph(model):
      if isinstance(node, nnx.Module) and getattr(node, "pool_lowering", None) == "xla":
        node.pool_lowering = "onednn"
  return model


def make_folder(model: nnx.Module, *, dtype: Any = None, policy: str = "auto",
                planner: Planner | None = None, sample_shape: Sequence[int] | None = None):
  """(graphdef of the inference graph, fold) for a model whose weights keep changing.

  `fold(params, rest) -> state` is a pure, jittable function from the model's own state
  (`nnx.split(model, nnx.Param, ...)`, as the trainer holds it) to the inference graph's state,
  so `nnx.merge(graphdef, fold(params, rest))` is `build_inference_model` of the current
  weights: the trainer's validation can run the fast graph without rebuilding it in Python at
  every evaluation. The graph's structure (which BatchNorm folds into which conv, lowering
  planner, dtypes) is fixed here once, from `model`.
  """
  planner = planner or Planner(policy)
  graphdef_model, _, _ = nnx.split(model, nnx.Param, ...)
  kwargs = dict(dtype=dtype, planner=planner, sample_shape=sample_shape)

  def fold(params, rest):
    return nnx.split(build_inference_model(nnx.merge(graphdef_model, params, rest), **kwargs))[1]

  # The graph's structure only: traced abstractly, so `model` may be abstract too (the trainer's
  # nnx.eval_shape model) and no weights are folded here.
  found = {}

  def structure(params, rest):
    found["graphdef"], state = nnx.split(
        build_inference_model(nnx.merge(graphdef_model, params, rest), **kwargs))
    return state

  _, params, rest = nnx.split(model, nnx.Param, ...)
  jax.eval_shape(structure, params, rest)
  return found["graphdef"], fold
