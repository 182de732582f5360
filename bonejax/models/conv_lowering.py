"""How one 2D convolution runs: XLA's convolution or bf16 matrix products, chosen per layer shape.

XLA's CPU backend computes every bf16 *convolution* in float32 (it upcasts both operands), but
runs bf16 *dot products* natively where the CPU has bf16 matrix units (AMX, AVX512-BF16): on a
2-core Sapphire-Rapids-class Xeon a 2048^2 bf16 dot reaches ~1,260 GFLOP/s, a float32 one ~277.
So a KHxKW convolution written as KH dot products - for each kernel row, the KW column shifts of
the input concatenated along channels, (B*Ho*Wo, KW*C) x (KW*C, O), accumulated in float32 -
runs 2-6x faster than XLA's convolution where the layer is compute-bound (few pixels, many
channels: a ResNet's deep stages), and slower where it is memory-bound (the concatenation
triples the input traffic: large maps with few channels). Hence a per-layer choice, not a switch:

  "xla"     lax.conv_general_dilated (cuDNN on GPU, XLA/YNNPACK on CPU)
  "rows"    KH dot_generals over the column-shifted input, float32 accumulation (any stride,
            dilation and padding; groups == 1; a 1x1 convolution is a single dot)
  "taps"    one dot over the padded input into KH*KW outputs per pixel, then the sum of the
            shifted products (stride 1; no input copy: best on small maps, many channels)
  "blocks"  the convolution on 2x2 pixel blocks (space-to-depth: 4x channels), as "taps"
            (stride 1, dilation 1: for few channels on large maps)
  "onednn"  oneDNN's convolution (what PyTorch runs on CPUs) as an XLA FFI custom call, bias
            fused, output in the layer's dtype, with oneDNN's backward as its custom_vjp
            (bonejax.models.onednn: only where its extension is built and oneDNN builds an
            optimised primitive for the shape; anything else stays on the other lowerings)

XLA's CPU backend also computes bf16 concatenations in float32 (convert, concatenate, convert
back), which makes the input-side copies of "rows" dearer than their byte count; "taps" and
"blocks" avoid them.

`Planner` makes the choice for a `ConvSpec` (the static shape of one call) under a policy:

  "xla"      always XLA (the reference; the GPU path)
  "dots"     "rows" wherever it applies (tests; forcing the lowering)
  "onednn"   "onednn" wherever oneDNN takes the layer, else "xla" (tests; forcing it)
  "auto"     deterministic rule: on a CPU backend, "onednn" where it is available and takes
             the layer (`_onednn_rule`); otherwise the dot lowerings on a CPU with native bf16
             dots, in bf16, on layers whose measured class favours them (`_auto_rule`), and on
             maps smaller than the kernel, which XLA's CPU backend runs as a naive loop
             (`xla_would_swap`; every CPU policy but "xla")
  "measure"  time each candidate on this machine once per spec (median of interleaved runs)
             and keep the faster; results are cached in memory and in a JSON file per machine
             (`cache_path()`), so a user pays the measurement once. Off the CPU: "xla".

Measurement happens at trace time, the first time a spec is seen, under
`jax.ensure_compile_time_eval()`: a jitted model needs no separate tuning call, and every
plane shape the predictor compiles gets its own choices.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from bonejax.models.conv_spec import ConvSpec
from jax import lax

POLICIES = ("xla", "dots", "onednn", "auto", "measure")
LOWERINGS = ("xla", "rows", "taps", "blocks", "onednn")


def candidates(spec: ConvSpec) -> tuple[str, ...]:
  """Lowerings that can compute `spec` (XLA always can)."""
  if spec.groups != 1:
    return ("xla",)
  out = ["xla", "rows"]
  unit_stride = spec.stride == (1, 1)
  if unit_stride and spec.kernel != (1, 1):
    out.append("taps")
  ho, wo = spec.out_hw
  if (unit_stride and spec.dilation == (1, 1) and spec.kernel != (1, 1)
      and ho % 2 == 0 and wo % 2 == 0):
    out.append("blocks")
  return tuple(out)


# ---------------------------------------------------------------------------------------------
# The lowerings. x (B, H, W, C) and kernel (KH, KW, C/groups, O) already in the compute dtype;
# the result is float32 (the accumulator), bias not yet added.
# ---------------------------------------------------------------------------------------------


def conv_xla(x, kernel, spec: ConvSpec):
  # On the CPU a float32 result costs nothing (XLA computes bf16 convolutions in float32
  # anyway) and saves a rounding. Elsewhere the call is exactly nnx.Conv's (output in the
  # compute dtype), so the GPU runs the same cuDNN convolutions as the unfolded model.
  cpu = jax.default_backend() == "cpu"
  y = lax.conv_general_dilated(
      x, kernel, spec.stride, spec.padding, rhs_dilation=spec.dilation,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=spec.groups,
      preferred_element_type=jnp.float32 if cpu else None)
  return y if cpu else y.astype(jnp.float32)


@jax.custom_vjp
def _dot_bf16(a, w):
  """(..., K) x (K, O) in bf16 with a float32 result, whose backward also runs bf16 dots.

  Plain autodiff would contract the float32 cotangent with the bf16 operands, a mixed dot that
  XLA computes in float32 (the slow path this lowering exists to avoid). Rounding the cotangent
  to bf16 first is what PyTorch's autocast backward does too; accumulation stays float32.
  """
  return lax.dot_general(a, w, (((a.ndim - 1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _dot_bf16_fwd(a, w):
  return _dot_bf16(a, w), (a, w)


def _dot_bf16_bwd(res, g):
  a, w = res
  g = g.astype(a.dtype)
  da = lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())),
                       preferred_element_type=jnp.float32).astype(a.dtype)
  dw = lax.dot_general(a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1]),
                       (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return da, dw.astype(w.dtype)


_dot_bf16.defvjp(_dot_bf16_fwd, _dot_bf16_bwd)


def _dot(a, w):
  if a.dtype == jnp.bfloat16 and w.dtype == jnp.bfloat16:
    return _dot_bf16(a, w)
  return lax.dot_general(a, w, (((a.ndim - 1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)


def conv_rows(x, kernel, spec: ConvSpec):
  """KH dot products over the KW column shifts of `x` concatenated along channels."""
  (kh, kw), (sh, sw), (dh, dw) = spec.kernel, spec.stride, spec.dilation
  ho, wo = spec.out_hw
  (pt, pb), (pl, pr) = spec.padding
  if pt or pb or pl or pr:
    x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  # Column shifts (strided by the column stride) concatenated along channels: (B, Hp, Wo, KW*C).
  cols = [lax.slice_in_dim(x, j * dw, j * dw + (wo - 1) * sw + 1, sw, axis=2) for j in range(kw)]
  xc = cols[0] if kw == 1 else jnp.concatenate(cols, axis=-1)
  out = None
  for r in range(kh):
    rows = lax.slice_in_dim(xc, r * dh, r * dh + (ho - 1) * sh + 1, sh, axis=1)
    w = kernel[r].reshape(kw * kernel.shape[2], kernel.shape[3])
    y = _dot(rows, w)
    out = y if out is None else out + y
  return out


def conv_taps(x, kernel, spec: ConvSpec):
  """Every tap on the output side: one dot (B*Hp*Wp, C) x (C, KH*KW*O) over the padded input,
  then the sum of KH*KW shifted slices of the float32 product (one fused loop). Nothing is
  copied on the input side but the padding; the product is KH*KW outputs wide. Stride 1."""
  (kh, kw), (dh, dw) = spec.kernel, spec.dilation
  ho, wo = spec.out_hw
  (pt, pb), (pl, pr) = spec.padding
  if pt or pb or pl or pr:
    x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  c, o = kernel.shape[2], kernel.shape[3]
  wide = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(c, kh * kw * o)
  y = _dot(x, wide).reshape(x.shape[:3] + (kh * kw, o))
  out = None
  for r in range(kh):
    for j in range(kw):
      t = y[:, r * dh:r * dh + ho, j * dw:j * dw + wo, r * kw + j]
      out = t if out is None else out + t
  return out


def block_kernel(kernel):
  """(KH, KW, C, O) -> (T, T, 4C, 4O), T = K//2 + 1: the kernel of the same convolution on
  2x2 pixel blocks. Output pixel 2i+b reads padded input 2i+b+t = block i+ti, element a with
  t = 2*ti + a - b; taps outside the kernel are zeros (1.8x the FLOPs of a 3x3 kernel)."""
  kh, kw, c, o = kernel.shape
  th, tw = kh // 2 + 1, kw // 2 + 1
  rows = []
  for ti in range(th):
    cols = []
    for tj in range(tw):
      blocks = []  # (ai, aj) x (bi, bj) blocks of C x O
      for ai in range(2):
        for aj in range(2):
          line = []
          for bi in range(2):
            for bj in range(2):
              r, q = 2 * ti + ai - bi, 2 * tj + aj - bj
              line.append(kernel[r, q] if 0 <= r < kh and 0 <= q < kw
                          else jnp.zeros((c, o), kernel.dtype))
          blocks.append(jnp.concatenate(line, axis=1))  # C x 4O
      cols.append(jnp.concatenate(blocks, axis=0))  # 4C x 4O
    rows.append(jnp.stack(cols))
  return jnp.stack(rows)  # (T, T, 4C, 4O)


def conv_blocks(x, kernel, spec: ConvSpec):
  """The convolution on 2x2 pixel blocks (space-to-depth): 4x the channels in and out, a
  (K//2+1)^2 kernel. Layers with few channels on large maps (a U-Net decoder's last stages,
  16-64 channels at 128-256 px) run XLA's convolution at a few % of the CPU's peak; as blocks
  they become one dense dot (B*Hb*Wb, 4C) x (4C, T*T*4O), which bf16 matrix units run well
  even with the 1.8x FLOPs of the zero taps. Stride 1, dilation 1, even output sides."""
  kh, kw = spec.kernel
  ho, wo = spec.out_hw
  th, tw = kh // 2 + 1, kw // 2 + 1
  (pt, _), (pl, _) = spec.padding
  b, h, w, c = x.shape
  # Pad so that the padded sides are exactly 2 * (blocks of output + T - 1).
  hp, wp = ho + 2 * (th - 1), wo + 2 * (tw - 1)
  x = jnp.pad(x, ((0, 0), (pt, hp - h - pt), (pl, wp - w - pl), (0, 0)))
  x = x.reshape(b, hp // 2, 2, wp // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(b, hp // 2, wp // 2, 4 * c)
  k = block_kernel(kernel)
  o = kernel.shape[3]
  wide = jnp.transpose(k, (2, 0, 1, 3)).reshape(4 * c, th * tw * 4 * o)
  y = _dot(x, wide).reshape(x.shape[:3] + (th * tw, 4 * o))
  out = None
  for r in range(th):
    for j in range(tw):
      t = y[:, r:r + ho // 2, j:j + wo // 2, r * tw + j]
      out = t if out is None else out + t
  out = out.reshape(b, ho // 2, wo // 2, 2, 2, o).transpose(0, 1, 3, 2, 4, 5)
  return out.reshape(b, ho, wo, o)


LOWERING_FNS = {"xla": conv_xla, "rows": conv_rows, "taps": conv_taps, "blocks": conv_blocks}


def conv_onednn(x, kernel, spec: ConvSpec):
  from bonejax.models import onednn
  return onednn.conv(x, kernel, None, spec, out_dtype=jnp.float32)


LOWERING_FNS["onednn"] = conv_onednn


def apply(how: str, x, kernel, spec: ConvSpec):
  return LOWERING_FNS[how](x, kernel, spec)


def conv_bias(how: str, x, kernel, bias, spec: ConvSpec, out_dtype, *,
              inference: bool = False):
  """The layer: convolution + float32 bias, handed on in `out_dtype`.

  oneDNN adds the bias and writes `out_dtype` itself (one pass over the output, no float32
  intermediate); the other lowerings return the float32 accumulator and XLA fuses the rest.
  `inference`: call oneDNN as one `onednn.conv_p` equation (the inference graph's, whose
  following ReLU / residual add `graph_fusion` folds into it) instead of its custom_vjp.
  """
  if how == "onednn":
    from bonejax.models import onednn
    call = onednn.conv_inference if inference else onednn.conv
    if onednn.supports(spec, out_dtype)[0]:
      return call(x, kernel, bias, spec, out_dtype=out_dtype)
    return call(x, kernel, bias, spec, out_dtype=spec.dtype).astype(out_dtype)
  y = apply(how, x, kernel, spec)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(out_dtype)


# ---------------------------------------------------------------------------------------------
# Choosing.
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        return frozenset(line.split(":", 1)[1].split())
  except OSError:
    pass
  return frozenset()


def native_bf16_dots() -> bool:
  """Whether the CPU has bf16 matrix/dot instructions that XLA's dot emitter uses."""
  return bool({"amx_bf16", "avx512_bf16"} & _cpu_flags())


def xla_would_swap(spec: ConvSpec) -> bool:
  """Whether XLA's CPU backend runs `spec` as a naive loop, 10-50x slower than its convolution
  kernels: its algebraic simplifier swaps kernel and input of a stride-1, undilated
  convolution whose input has fewer pixels than the kernel has taps (a 3x3 convolution on the
  2x4 bottleneck of a 64 x 128 plane through a stride-32 network). The Planner lowers those
  layers to oneDNN or to dot products instead (exact: the same sums), so a small plane runs at
  speed without being padded (padding would change what the model computes)."""
  return (spec.stride == (1, 1) and spec.dilation == (1, 1)
          and spec.height * spec.width < spec.kernel[0] * spec.kernel[1])


def _auto_rule(spec: ConvSpec) -> str:
  """The no-measurement choice on a CPU with native bf16 dots, in bf16.

  From `benchmarks/cpu_conv_lowering.py` on a 2-core Xeon with AMX (unet_resnet18's layers,
  batch 4): the dot lowerings win where each pixel carries many channels on a small map - the
  ResNet's last stages and the decoder's first blocks, 8^2-32^2 px with 128-768 channels: 2.6-12x
  faster than XLA's convolution ("taps" for stride 1, "rows" for stride 2) - and a 1x1
  convolution is a plain dot; XLA's convolution stays on the large maps with few channels
  (64^2 and up), where the lowerings' extra memory traffic costs more than the dots save.
  """
  cmin = min(spec.cin, spec.cout)
  if spec.groups != 1:
    return "xla"
  if spec.kernel == (1, 1):
    return "rows"
  if spec.height * spec.width <= 32 * 32 and cmin >= 128:
    return "taps" if spec.stride == (1, 1) else "rows"
  return "xla"


def _onednn_rule(spec: ConvSpec, train: bool = False) -> bool:
  """The no-measurement choice where oneDNN takes the layer: oneDNN, forward and training.

  From `benchmarks/cpu_conv_lowering.py` (unet_resnet18's 19 layer shapes, batch 4 x 256^2) on
  a 2-core AMD EPYC (Zen 4: AVX-512, AVX512-BF16, no AMX), busy (benchmarks/README.md,
  results/cpu_conv_lowering_*_epyc-2c.md). Forward, bf16: oneDNN fastest on 14 of 19 layers,
  1.7-4.3x XLA's convolution (which computes bf16 in float32) on the decoder's large maps; its
  layers sum to 1,020 ms against XLA's 2,281 and the best per-layer mix's 984. Forward, float32:
  fastest on 15 of 19, 1,437 ms against 1,871 (best mix 1,328). What the layers it loses cost
  is within the busy machine's run-to-run spread, so no exception list is drawn from it;
  "measure" finds them per machine. Training: layer by layer on the busy machine oneDNN lost
  the strided 3x3 / 7x7 and the 8^2-16^2 x 256-512 layers, and an earlier rule kept those on
  XLA; but whole training steps on the idle machine, side by side in one run
  (`benchmarks/cpu_train.py --policy=auto`, results/cpu_train_rule_before_epyc-2c.md), ran 6.31 patches/s
  with oneDNN everywhere against 4.93 with those exceptions (6.05 against 5.35 in the run
  committed at 9f4a5e0): every switch between oneDNN's and XLA's layouts costs more than the layer saved. So
  training takes oneDNN wherever it takes the layer, as the forward does.
  """
  del spec, train
  return True


def machine_key() -> str:
  """What a measured choice is valid for: backend, device kind, CPU model and flags, jax."""
  dev = jax.devices()[0]
  cpu = ""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  flags = ",".join(sorted(f for f in _cpu_flags() if f.startswith(("avx", "amx", "fma"))))
  raw = f"{dev.platform}|{getattr(dev, 'device_kind', '')}|{cpu}|{flags}|{os.cpu_count()}|" \
        f"{jax.__version__}"
  return hashlib.sha1(raw.encode()).hexdigest()[:16]


def cache_path() -> Path:
  """conv_lowering.json in bonejax's cache directory: $BONEJAX_CACHE_DIR, else
  $XDG_CACHE_HOME/bonejax, else ~/.cache/bonejax (core.cache_dirs)."""
  from bonejax.core.cache_dirs import user_cache_dir
  return user_cache_dir("conv_lowering.json")


def time_lowerings(spec: ConvSpec, lowerings: Sequence[str], repeats: int = 5,
                   min_seconds: float = 0.02, train: bool = False) -> dict[str, float]:
  """Median seconds per call of each lowering (conv + bias, output in the compute dtype).

  train=True times forward and backward (gradients of input and kernel) instead.

  Runs are interleaved (a, b, a, b, ...) so that load from other processes hits all alike.
  Called at trace time, so it evaluates eagerly whatever trace is live.
  """
  dtype = jnp.dtype(spec.dtype)
  rng = np.random.default_rng(0)
  with jax.ensure_compile_time_eval():
    x = jnp.asarray(rng.standard_normal((spec.batch, spec.height, spec.width, spec.cin),
                                        np.float32), dtype)
    k = jnp.asarray(rng.standard_normal(spec.kernel + (spec.cin // spec.groups, spec.cout),
                                        np.float32) * 0.05, dtype)
    b = jnp.zeros((spec.cout,), jnp.float32)
    def layer(x, k, b, how):
      return conv_bias(how, x, k, b, spec, dtype, inference=not train)

    if train:  # the cotangent's values do not matter for the time: sum of squares
      fns = {how: jax.jit(jax.grad(
          lambda x, k, b, how=how: jnp.sum(jnp.square(layer(x, k, b, how).astype(jnp.float32))),
          argnums=(0, 1))) for how in lowerings}
    else:
      fns = {how: jax.jit(functools.partial(layer, how=how)) for how in lowerings}
    calls = {}
    for how, f in fns.items():  # compile + warm up; count calls to fill `min_seconds`
      jax.block_until_ready(f(x, k, b))
      t0 = time.perf_counter()
      jax.block_until_ready(f(x, k, b))
      calls[how] = max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-6)))
    times: dict[str, list[float]] = {how: [] for how in fns}
    for _ in range(repeats):
      for how, f in fns.items():
        t0 = time.perf_counter()
        for _ in range(calls[how]):
          y = f(x, k, b)
        jax.block_until_ready(y)
        times[how].append((time.perf_counter() - t0) / calls[how])
  return {how: float(np.median(t)) for how, t in times.items()}


class Planner:
  """Chooses a lowering per `ConvSpec` under `policy`; one instance is shared by a model's layers.

  Hashes by identity (it sits in the static part of an NNX graph). `train=True` (for
  `inference_graph.lower_convs`) measures forward + backward. `choices` records what was
  chosen for every spec seen, with measured times where there were any (`report()`).
  """

  _lock = threading.Lock()

  def __init__(self, policy: str = "auto", *, cache: bool | str | Path = True,
               backend: str | None = None, repeats: int = 5, train: bool = False):
    if policy not in POLICIES:
      raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    self.policy, self.repeats, self._backend = policy, int(repeats), backend
    self.train = bool(train)  # measure forward + backward (a training step) instead
    self._cache_file = (None if cache is False
                        else cache_path() if cache is True else Path(cache))
    self.choices: dict[str, dict[str, Any]] = {}

  def __repr__(self):
    return f"Planner({self.policy!r})"

  @property
  def backend(self) -> str:
    return self._backend or jax.default_backend()

  def choose(self, spec: ConvSpec, out_dtype: Any = None) -> str:
    """The lowering of `spec`; `out_dtype` (default the compute dtype) is what the layer hands
    on, which oneDNN writes itself and is asked about."""
    out = jnp.dtype(out_dtype or spec.dtype).name
    key = spec.key() + ("" if out == spec.dtype else f"_out{out}")
    if key in self.choices:
      return self.choices[key]["choice"]
    options = candidates(spec)
    record: dict[str, Any] = {"spec": dataclasses.asdict(spec)}
    cpu = self.backend == "cpu" and self.policy != "xla"
    if cpu and self.policy in ("onednn", "auto", "measure"):
      onednn_ok, record["onednn"] = self._onednn(spec, out)
      if onednn_ok:
        options = options + ("onednn",)
    if not cpu or len(options) == 1:
      choice = "xla"  # on GPU/TPU the graph keeps the vendor convolution
    elif self.policy == "dots":
      choice = "rows" if "rows" in options else "xla"
    elif self.policy == "onednn":
      choice = "onednn" if "onednn" in options else "xla"
    elif self.policy == "auto":
      bf16 = spec.dtype == "bfloat16" and native_bf16_dots()
      choice = ("onednn" if "onednn" in options and _onednn_rule(spec, self.train) else
                _auto_rule(spec) if bf16 and spec.groups == 1 else "xla")
    else:
      choice, seconds = self._measured(spec, options)
      record["seconds"] = seconds
    if (cpu and self.policy != "measure" and choice == "xla" and xla_would_swap(spec)
        and "rows" in options):
      # Not XLA's naive loop: dot products, the same sums (any policy but "xla").
      choice = "taps" if "taps" in options else "rows"
      record["why"] = "xla would swap"
    record["choice"] = choice
    self.choices[key] = record
    return choice

  def _onednn(self, spec: ConvSpec, out: str) -> tuple[bool, str]:
    """Whether oneDNN takes `spec` (forward, and backward when training), and what it said."""
    from bonejax.models import onednn
    if not onednn.available():  # says once (a note) why not
      return False, "unavailable"
    ok, said = onednn.supports(spec, out, train=self.train)
    if not ok and out != spec.dtype:  # e.g. float32 in, bf16 out: write float32, XLA casts
      ok, said = onednn.supports(spec, spec.dtype, train=self.train)
    if not ok and spec.dtype not in onednn.DTYPES:  # one note for the whole model
      onednn.note(f"oneDNN takes float32 and bfloat16 only: {spec.dtype} convolutions run on "
                  "XLA")
    elif not ok:
      onednn.note(f"oneDNN does not take convolution {spec.key()} ({said}); it runs on XLA")
    return ok, said

  # -- measurement and its on-disk cache ------------------------------------------------------

  def _load(self) -> dict:
    if self._cache_file is None or not self._cache_file.exists():
      return {}
    try:
      return json.loads(self._cache_file.read_text()).get(machine_key(), {})
    except (OSError, ValueError):
      return {}  # a damaged cache is only lost time: measure again

  def _store(self, key: str, entry: dict) -> None:
    if self._cache_file is None:
      return
    with self._lock:
      try:
        self._cache_file.parent.mkdir(parents=True, exist_ok=True)
        data = (json.loads(self._cache_file.read_text()) if self._cache_file.exists() else {})
      except (OSError, ValueError):
        data = {}
      data.setdefault(machine_key(), {})[key] = entry
      tmp = self._cache_file.with_suffix(f".tmp{os.getpid()}")
      try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, self._cache_file)
      except OSError:
        pass  # read-only home: keep the choice in memory only

  def _measured(self, spec: ConvSpec, options) -> tuple[str, dict[str, float]]:
    key = spec.key() + ("_train" if self.train else "")
    hit = self._load().get(key)
    if hit and set(hit.get("seconds", {})) >= set(options):
      return hit["choice"], hit["seconds"]
    seconds = time_lowerings(spec, options, repeats=self.repeats, train=self.train)
    choice = min(seconds, key=seconds.get)
    self._store(key, {"choice": choice, "seconds": seconds})
    return choice, seconds

  def report(self) -> list[dict[str, Any]]:
    """One row per spec seen: its key, the choice and the measured seconds (if any)."""
    return [{"spec": k, "choice": v["choice"], **{f"s_{h}": t for h, t in
                                                   v.get("seconds", {}).items()}}
            for k, v in self.choices.items()]
