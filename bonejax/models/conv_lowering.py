"""How one 2D convolution runs: XLA's convolution or bf16 matrix products, chosen per layer shape.

XLA's CPU backend computes every bf16 *convolution* in float32 (it upcasts both operands), but
runs bf16 *dot products* natively where the CPU has bf16 matrix units (AMX, AVX512-BF16): on a
2-core Sapphire-Rapids-class Xeon a 2048^2 bf16 dot reaches ~1,260 GFLOP/s, a float32 one ~277.
So a KHxKW convolution written as KH dot products - for each kernel row, the KW column shifts of
the input concatenated along channels, (B*Ho*Wo, KW*C) x (KW*C, O), accumulated in float32 -
runs 2-6x faster than XLA's convolution where the layer is compute-bound (few pixels, many
channels: a ResNet's deep stages), and slower where it is memory-bound (the concatenation
triples the input traffic: large maps with few channels). Hence a per-layer choice, not a switch:

  "xla"   lax.conv_general_dilated (cuDNN on GPU, XLA/YNNPACK on CPU)
  "rows"  KH dot_generals over the column-shifted input, float32 accumulation (any stride,
          dilation and padding; groups == 1; a 1x1 convolution is a single dot)

`Planner` makes the choice for a `ConvSpec` (the static shape of one call) under a policy:

  "xla"      always XLA (the reference; the GPU path)
  "dots"     "rows" wherever it applies (tests; forcing the lowering)
  "auto"     deterministic rule: "rows" only on a CPU backend with native bf16 dots, in bf16,
             on layers whose measured class favours it (see `_auto_rule`); XLA elsewhere
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
from jax import lax

POLICIES = ("xla", "dots", "auto", "measure")
LOWERINGS = ("xla", "rows")


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """The static shape of one convolution call: what a lowering choice depends on."""
  batch: int
  height: int
  width: int
  cin: int
  cout: int
  kernel: tuple[int, int]
  stride: tuple[int, int]
  dilation: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]
  groups: int
  dtype: str  # compute dtype of the operands

  def key(self) -> str:
    return (f"b{self.batch}_{self.height}x{self.width}_{self.cin}to{self.cout}"
            f"_k{self.kernel[0]}x{self.kernel[1]}_s{self.stride[0]}x{self.stride[1]}"
            f"_d{self.dilation[0]}x{self.dilation[1]}_p{self.padding[0][0]}.{self.padding[0][1]}"
            f".{self.padding[1][0]}.{self.padding[1][1]}_g{self.groups}_{self.dtype}")

  @property
  def out_hw(self) -> tuple[int, int]:
    return tuple(
        (n + p[0] + p[1] - d * (k - 1) - 1) // s + 1
        for n, p, d, k, s in zip((self.height, self.width), self.padding, self.dilation,
                                 self.kernel, self.stride))

  @property
  def flops(self) -> int:
    ho, wo = self.out_hw
    return 2 * self.batch * ho * wo * self.cout * self.kernel[0] * self.kernel[1] * (
        self.cin // self.groups)


def candidates(spec: ConvSpec) -> tuple[str, ...]:
  """Lowerings that can compute `spec` (XLA always can)."""
  if spec.groups == 1:
    return LOWERINGS
  return ("xla",)


# ---------------------------------------------------------------------------------------------
# The lowerings. x (B, H, W, C) and kernel (KH, KW, C/groups, O) already in the compute dtype;
# the result is float32 (the accumulator), bias not yet added.
# ---------------------------------------------------------------------------------------------


def conv_xla(x, kernel, spec: ConvSpec):
  # preferred f32: the accumulator stays float32 in bf16 too (cuDNN and XLA CPU both honour it).
  return lax.conv_general_dilated(
      x, kernel, spec.stride, spec.padding, rhs_dilation=spec.dilation,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=spec.groups,
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
    y = lax.dot_general(rows, w, (((3,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    out = y if out is None else out + y
  return out


LOWERING_FNS = {"xla": conv_xla, "rows": conv_rows}


def apply(how: str, x, kernel, spec: ConvSpec):
  return LOWERING_FNS[how](x, kernel, spec)


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


def _auto_rule(spec: ConvSpec) -> str:
  """The no-measurement choice on a CPU with native bf16 dots, in bf16.

  From `benchmarks/cpu_conv_lowering.py` on a 2-core Xeon with AMX: the dot lowering wins where
  each output pixel carries a lot of work relative to the bytes it moves, i.e. many channels on
  small maps (16^2 x 512, 32^2 x 256: 3-6x), and loses on large maps with few channels
  (128^2 x 64, 256^2 x 16). The threshold below keeps "rows" to the clear wins.
  """
  if spec.groups != 1:
    return "xla"
  cmin = min(spec.cin, spec.cout)
  pixels = spec.height * spec.width
  if cmin >= 256:
    return "rows"
  if cmin >= 128 and pixels <= 64 * 64:
    return "rows"
  return "xla"


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
  """$BONEJAX_CACHE_DIR/conv_lowering.json (default ~/.cache/bonejax)."""
  root = os.environ.get("BONEJAX_CACHE_DIR") or Path.home() / ".cache" / "bonejax"
  return Path(root) / "conv_lowering.json"


def time_lowerings(spec: ConvSpec, lowerings: Sequence[str], repeats: int = 5,
                   min_seconds: float = 0.02) -> dict[str, float]:
  """Median seconds per call of each lowering (conv + bias, output in the compute dtype).

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
    fns = {how: jax.jit(lambda x, k, b, how=how: (apply(how, x, k, spec) + b).astype(dtype))
           for how in lowerings}
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

  Hashes by identity (it sits in the static part of an NNX graph). `choices` records what was
  chosen for every spec seen, with measured times where there were any (`report()`).
  """

  _lock = threading.Lock()

  def __init__(self, policy: str = "auto", *, cache: bool | str | Path = True,
               backend: str | None = None, repeats: int = 5):
    if policy not in POLICIES:
      raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    self.policy, self.repeats, self._backend = policy, int(repeats), backend
    self._cache_file = (None if cache is False
                        else cache_path() if cache is True else Path(cache))
    self.choices: dict[str, dict[str, Any]] = {}

  def __repr__(self):
    return f"Planner({self.policy!r})"

  @property
  def backend(self) -> str:
    return self._backend or jax.default_backend()

  def choose(self, spec: ConvSpec) -> str:
    key = spec.key()
    if key in self.choices:
      return self.choices[key]["choice"]
    options = candidates(spec)
    record: dict[str, Any] = {"spec": dataclasses.asdict(spec)}
    if self.policy == "xla" or len(options) == 1 or self.backend != "cpu":
      choice = "xla"  # on GPU/TPU the graph keeps the vendor convolution
    elif self.policy == "dots":
      choice = "rows"
    elif self.policy == "auto":
      bf16 = spec.dtype == "bfloat16" and native_bf16_dots()
      choice = _auto_rule(spec) if bf16 else "xla"
    else:
      choice, seconds = self._measured(spec, options)
      record["seconds"] = seconds
    record["choice"] = choice
    self.choices[key] = record
    return choice

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
    key = spec.key()
    hit = self._load().get(key)
    if hit and set(hit.get("seconds", {})) >= set(options):
      return hit["choice"], hit["seconds"]
    seconds = time_lowerings(spec, options, repeats=self.repeats)
    choice = min(seconds, key=seconds.get)
    self._store(key, {"choice": choice, "seconds": seconds})
    return choice, seconds

  def report(self) -> list[dict[str, Any]]:
    """One row per spec seen: its key, the choice and the measured seconds (if any)."""
    return [{"spec": k, "choice": v["choice"], **{f"s_{h}": t for h, t in
                                                   v.get("seconds", {}).items()}}
            for k, v in self.choices.items()]
