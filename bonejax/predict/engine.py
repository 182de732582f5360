"""The plane engine: raw planes in, class probabilities out, one compiled call per plane shape.

`PlaneEngine` turns stacks of 2D planes (n, H, W[, C]) of raw intensities (uint8 / uint16 /
float32) into softmax probabilities (n, H, W, K). Everything per batch runs inside one jitted
function: normalisation from two traced scalars (so another scan does not recompile), an optional
in-plane 90-degree rotation (the 12-plane mode), padding to the model's stride, the forward pass
in the compute dtype, softmax in float32, the crop and the rotation back. Batches have a fixed
size (the last one is padded), so each (plane shape, rotation) compiles exactly once.

Every batch is spread over the engine's devices (all local devices by default): a one-axis
`data` mesh, the weights replicated on it once, each device running the same per-device program
on its `batch` planes (`shard_map`: no communication, so a plane's probabilities do not depend on
the number of devices), the global batch `batch x devices`. Several hosts do not share batches:
each process predicts its own planes on its own devices (`hosts`).

The device-memory budget is per device, checked with XLA's own memory analysis of the
compiled function (per device; or, where a backend has none, an estimate from the traced
per-device program: `memory.peak_bytes`): when a batch does not fit, the batch shrinks; when a
single plane does not fit, the plane is cut into overlapping tiles inside the same function and
blended with a separable window that is zero for `margin` pixels next to each interior tile
edge and a sin^2 ramp after it. For a model whose
receptive field is within the margin (and tile origins on the stride grid), tiled equals untiled
up to float rounding; for real networks the smooth ramp hides the seams. A plane is padded to
the stride multiple and no further: its probabilities are what the model computes on it, on
every backend and lowering (XLA's CPU backend runs convolutions on maps smaller than their
kernel as a slow loop; the inference graph lowers those itself: `conv_lowering.xla_would_swap`).

`stream` keeps a couple of batches in flight: JAX dispatch is asynchronous, so the host copies
the next batch in and the last results out while the devices compute; nothing in the loop waits
for the device except the collection of the oldest batch. It is the one place batches meet the
devices. (Nothing is donated: the raw planes in and the probabilities out never share a
buffer's size, so XLA could not reuse one for the other.)
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bonejax.io import intensity
from bonejax.models.utils import pad_to_multiple
from bonejax.predict import memory

STRIDE = 32  # the model zoo's promise (bonejax.models.STRIDE)
DEFAULT_BATCH = 8
IN_FLIGHT = 2  # batches dispatched ahead of the one being collected
DTYPES = ("float32", "bfloat16", "float16")
# The inference graph (bonejax.models.inference_graph): BatchNorm folded into the convolutions,
# each convolution lowered as its policy says ("auto": a fixed rule, bf16 dot products where the
# CPU has native bf16 dots and the layer is compute-bound; "measure": timed once per machine and
# layer shape, cached; "xla": XLA's convolutions, as on GPUs) or "off": the model as it is.
# A model outside the zoo whose fold would change its logits runs as it is (graph becomes
# "off", one `note:` line on stderr: inference_graph.build_inference_model).
GRAPHS = ("auto", "measure", "xla", "off")


def compute_dtype(name: Any) -> Any:
  """'float32' | 'bfloat16' | 'float16' | None -> a jnp dtype (None: the model's own)."""
  if name is None:
    return None
  try:
    dt = jnp.dtype(name)
  except TypeError:
    raise ValueError(f"unknown dtype {name!r} (float32, bfloat16 or float16)") from None
  if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(f"compute dtype must be float32, bfloat16 or float16, got {dt}")
  return dt.type


def _ceil_to(n: int, m: int) -> int:
  return -(-int(n) // int(m)) * int(m)


def tile_starts(length: int, tile: int, overlap: int) -> tuple[int, ...]:
  """Tile origins covering [0, length) with tiles of `tile` overlapping by >= `overlap`."""
  if tile >= length:
    return (0,)
  step = tile - overlap
  starts = list(range(0, length - tile, step)) + [length - tile]
  return tuple(sorted(set(starts)))


def blend_window(length: int, margin: int, ramp: int, first: bool, last: bool) -> np.ndarray:
  """1D weights of a tile: 1 inside; at an interior edge, `margin` zeros then a sin^2 ramp.

  Edges on the plane border (`first`/`last`) keep weight 1: no other tile covers them.
  """
  w = np.ones(length, np.float64)
  up = np.sin(0.5 * np.pi * (np.arange(ramp) + 0.5) / ramp) ** 2 if ramp else np.zeros(0)
  if not first:
    w[:margin] = 0.0
    w[margin:margin + ramp] = up
  if not last:
    w[length - margin:] = 0.0
    w[length - margin - ramp:length - margin] = np.minimum(w[length - margin - ramp:
                                                             length - margin], up[::-1])
  return w


def with_compute_dtype(model: nnx.Module, dtype: Any) -> nnx.Module:
  """A copy of `model` that computes in `dtype` wherever it computes in its own compute dtype.

  The model's own compute dtype is its `dtype` attribute (every model of the zoo has one: the
  dtype it was built with). Submodules computing in it take `dtype`; submodules the model keeps
  in another dtype keep theirs (the float32 stem and head of a zoo model built in bfloat16: see
  FP32_EDGES in bonejax.models.layers). A model built in float32 cannot show which of its
  float32 modules are pinned there, so every one of them changes: rebuild such a model in the
  compute dtype instead (`load_bundle(dtype=...)`, `models.create(dtype=...)`; `make_engine` does
  it for a `bundle.Bundle`). A model without a `dtype` of its own has every submodule's set.
  """
  own = getattr(model, "dtype", None)
  own = None if own is None else jnp.dtype(own)
  model = nnx.clone(model)
  for _, m in nnx.iter_modules(model):
    current = getattr(m, "dtype", False)
    if current is False:
      continue
    if own is None or (current is not None and jnp.dtype(current) == own):
      setattr(m, "dtype", dtype)
  return model


def background_value(stats: dict[str, Any], rule: str) -> float:
  """The raw intensity of the background: what voxels the volume does not have look like.

  The low percentile (p0_5: what the percentile rule maps to 0, dark air or embedding medium).
  Not the value that normalises to 0: under z-score that is the mean intensity, mid-grey, and
  45-degree rotations filled with it would show the model grey corners. Falls back to the
  minimum, then to the normalisation offset, for statistics without percentiles.
  """
  for key in ("p0_5", "min"):
    if stats.get(key) is not None:
      return float(stats[key])
  return float(intensity.normalize_params(stats, rule)[0])


@dataclasses.dataclass(frozen=True)
class Plan:
  """How one plane shape runs: planes per call and, for planes too big, the tiling."""
  shape: tuple[int, int]              # plane (H, W) as given
  k90: int                            # in-plane rotation by k * 90 degrees before the model
  channels: int
  raw_dtype: str
  clip: bool
  batch: int                          # planes per call and device
  tile: tuple[int, int] | None = None  # (th, tw) in the rotated, padded frame; None: whole plane
  overlap: int = 0
  device_bytes: int = 0               # one call's peak memory per device (XLA's, else estimated)

  @property
  def rotated_shape(self) -> tuple[int, int]:
    h, w = self.shape
    return (w, h) if self.k90 % 2 else (h, w)


_WARNED_ESTIMATE = False


def _warn_estimated() -> None:
  global _WARNED_ESTIMATE
  if not _WARNED_ESTIMATE:
    _WARNED_ESTIMATE = True
    logging.warning("bonejax.predict: this backend reports no memory analysis of compiled "
                    "calls; device memory per call is estimated from the traced program "
                    "(pass a smaller device_memory_gb if calls run out of memory)")


class PlaneEngine:
  """Compiled whole-plane inference for one model; see the module docstring.

  Args:
    model: any nnx module mapping NHWC floats to logits (B, H, W, K). Its eval view is used
      (BatchNorm running statistics, dropout off); the module itself is not changed.
    in_channels: the model's input channels (planes are (n, H, W) for 1, else (n, H, W, C)).
    context_slices: 2.5D (k > 0): the model takes the 2k + 1 planes around each plane as its
      channels; the runner stacks them (bonejax.data.context), the engine only records k.
    batch_size: planes per call and device (shrunk per shape to fit `device_budget_bytes`);
      a call takes `batch_size x len(devices)` planes.
    dtype: compute dtype (e.g. bfloat16): replaces the model's own compute dtype where the
      model uses it, like building the model with that dtype (see `with_compute_dtype`;
      parameters keep their own dtype).
    stride: planes are padded (reflect) to multiples of this.
    device_budget_bytes: peak memory one call may use on each device (None: no limit).
    tile_size / tile_overlap: force tiling with this tile (pixels, rounded up to the stride).
    devices: the devices batches are spread over (default: all of this process's devices).
  """

  def __init__(self, model: nnx.Module, *, in_channels: int = 1,
               batch_size: int = DEFAULT_BATCH, dtype: Any = None, stride: int = STRIDE,
               device_budget_bytes: int | None = None, tile_size: int | None = None,
               tile_overlap: int | None = None, devices: Sequence[Any] | None = None,
               graph: str = "auto", context_slices: int = 0):
    view = nnx.view(model, use_running_average=True, deterministic=True,
                    raise_if_not_found=False)
    self.dtype = compute_dtype(dtype)
    if self.dtype is not None:
      view = with_compute_dtype(view, self.dtype)
    if graph not in GRAPHS:
      raise ValueError(f"graph={graph!r} must be one of {', '.join(GRAPHS)}")
    self.graph = graph
    if graph != "off":
      # Built once per engine; each layer keeps the dtype it has now (float32 edges included).
      from bonejax.models import inference_graph
      s = max(1, int(stride))
      try:
        view = inference_graph.build_inference_model(
            view, policy=graph, sample_shape=(1, s, s, int(in_channels)))
        if view.inference_graph == "plain":  # its fold would change the logits (a note says)
          self.graph = "off"
      except ValueError as e:  # a layer the graph cannot rewrite: the model as it is
        logging.getLogger(__name__).warning("inference graph off for this model: %s", e)
        self.graph = "off"
    self.graphdef, state = nnx.split(view)
    self.devices = list(devices) if devices is not None else jax.local_devices()
    if not self.devices:
      raise ValueError("a PlaneEngine needs at least one device")
    self.mesh = Mesh(np.array(self.devices), ("data",))
    self.replicated = NamedSharding(self.mesh, P())
    self.sharded = NamedSharding(self.mesh, P("data"))
    self.state = jax.device_put(state, self.replicated)  # once, on every device
    self.state_bytes = int(sum(x.nbytes for x in jax.tree.leaves(self.state)))
    self.in_channels = int(in_channels)
    self.context_slices = int(context_slices)
    self.batch_size = max(1, int(batch_size))
    self.stride = max(1, int(stride))
    self.device_budget_bytes = device_budget_bytes
    self.tile_size = _ceil_to(tile_size, self.stride) if tile_size else None
    self.tile_overlap = tile_overlap
    self.offset, self.scale, self.clip = np.float32(0.0), np.float32(1.0), False
    self.background = np.float32(0.0)
    self._norm = jax.device_put((self.offset, self.scale), self.replicated)
    self._plans: dict[tuple, Plan] = {}
    self._compiled: dict[Plan, Any] = {}
    s = self.stride
    try:
      out = jax.eval_shape(lambda st, x: nnx.merge(self.graphdef, st)(x), self.state,
                           jax.ShapeDtypeStruct((1, s, s, self.in_channels), jnp.float32))
    except (ValueError, TypeError) as e:
      raise ValueError(f"the model does not take {self.in_channels}-channel planes: "
                       f"{str(e).splitlines()[0]}") from None
    if len(out.shape) != 4 or out.shape[:3] != (1, s, s):
      raise ValueError(f"the model maps (1, {s}, {s}, {self.in_channels}) to {out.shape}; "
                       f"expected (1, {s}, {s}, num_classes) logits")
    self.num_classes = int(out.shape[-1])

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  def global_batch(self, plan: Plan) -> int:
    """Planes per call: the plan's per-device batch on every device."""
    return plan.batch * self.num_devices

  # -------------------------------------------------------------------------------------------
  # Normalisation (traced scalars: a new scan never recompiles).
  # -------------------------------------------------------------------------------------------

  def set_normalization(self, stats: dict[str, Any], rule: str) -> None:
    offset, scale, clip = intensity.normalize_params(stats, rule)
    self.offset, self.scale, self.clip = np.float32(offset), np.float32(scale), bool(clip)
    self.background = np.float32(background_value(stats, rule))
    # On the devices once per scan, not once per batch.
    self._norm = jax.device_put((self.offset, self.scale), self.replicated)

  # -------------------------------------------------------------------------------------------
  # The jitted function.
  # -------------------------------------------------------------------------------------------

  def _function(self, plan: Plan):
    graphdef, stride, k = self.graphdef, self.stride, self.num_classes
    cdt = self.dtype or jnp.float32

    def forward(state, x):
      logits = nnx.merge(graphdef, state)(x.astype(cdt))
      return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    def tiled(state, xp):
      # One tile position at a time (of all `b` planes), accumulated in place: device memory
      # is the plane's arrays plus one tile's activations.
      b, hp, wp, c = xp.shape
      th, tw = plan.tile
      ys, xs = tile_starts(hp, th, plan.overlap), tile_starts(wp, tw, plan.overlap)
      margin = plan.overlap // 4
      ramp = plan.overlap - 2 * margin
      wy = np.stack([blend_window(th, margin, ramp, y == 0, y + th == hp) for y in ys])
      wx = np.stack([blend_window(tw, margin, ramp, x == 0, x + tw == wp) for x in xs])
      # The windows are separable and tile a grid, so their sum is too: outer(ty, tx).
      ty, tx = np.zeros(hp), np.zeros(wp)
      for y, w in zip(ys, wy):
        ty[y:y + th] += w
      for x, w in zip(xs, wx):
        tx[x:x + tw] += w
      ys_a, xs_a = jnp.asarray(ys, jnp.int32), jnp.asarray(xs, jnp.int32)
      wy_a, wx_a = jnp.asarray(wy, jnp.float32), jnp.asarray(wx, jnp.float32)
      nx = len(xs)

      def body(t, out):
        iy, ix = t // nx, t % nx
        corner = (0, ys_a[iy], xs_a[ix], 0)
        p = forward(state, jax.lax.dynamic_slice(xp, corner, (b, th, tw, c)))
        w = (wy_a[iy][:, None] * wx_a[ix][None, :])[None, :, :, None]
        cur = jax.lax.dynamic_slice(out, corner, (b, th, tw, k))
        return jax.lax.dynamic_update_slice(out, cur + p * w, corner)

      out = jax.lax.fori_loop(0, len(ys) * nx, body, jnp.zeros((b, hp, wp, k), jnp.float32))
      inv_y = jnp.asarray(1.0 / np.maximum(ty, 1e-30), jnp.float32)
      inv_x = jnp.asarray(1.0 / np.maximum(tx, 1e-30), jnp.float32)
      return out * inv_y[None, :, None, None] * inv_x[None, None, :, None]

    def fn(state, x, offset, scale):
      if x.ndim == 3:
        x = x[..., None]
      x = (x.astype(jnp.float32) - offset) * scale
      if plan.clip:
        x = jnp.clip(x, 0.0, 1.0)
      if plan.k90:
        x = jnp.rot90(x, plan.k90, axes=(1, 2))
      xp, hw = pad_to_multiple(x, stride)
      p = forward(state, xp) if plan.tile is None else tiled(state, xp)
      p = p[:, :hw[0], :hw[1]]
      if plan.k90:
        p = jnp.rot90(p, -plan.k90, axes=(1, 2))
      return p

    return fn

  def _compile(self, plan: Plan) -> tuple[Any, int]:
    h, w = plan.shape
    rest = (h, w) + ((plan.channels,) if plan.channels > 1 else ())
    dtype = np.dtype(plan.raw_dtype)
    x = jax.ShapeDtypeStruct((self.global_batch(plan),) + rest, dtype, sharding=self.sharded)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=self.replicated)
    per_device = self._function(plan)
    # Each device runs the single-device program on its own planes: no collectives, and the
    # memory analysis below is per device.
    # (No collectives, so the varying-axes check has nothing to check; it would reject the
    # tiled path's loop, whose zero carry does not vary over devices until the first tile.)
    fn = jax.jit(jax.shard_map(per_device, mesh=self.mesh, in_specs=(P(), P("data"), P(), P()),
                               out_specs=P("data"), check_vma=False),
                 in_shardings=(self.replicated, self.sharded, self.replicated, self.replicated),
                 out_shardings=self.sharded)
    compiled = fn.lower(self.state, x, scalar, scalar).compile()
    nbytes = memory.xla_bytes(compiled)
    if nbytes is None:
      # No memory analysis on this backend: estimate from the traced program, so the device
      # budget still holds (batches shrink, planes tile) rather than silently turning off.
      _warn_estimated()
      local = jax.ShapeDtypeStruct((plan.batch,) + rest, dtype)
      flat = jax.ShapeDtypeStruct((), jnp.float32)
      nbytes = memory.peak_bytes(jax.make_jaxpr(per_device)(self.state, local, flat, flat))
    return compiled, int(nbytes)

  # -------------------------------------------------------------------------------------------
  # Planning: batch size and tiling per plane shape, from XLA's memory analysis.
  # -------------------------------------------------------------------------------------------

  def plan(self, shape: tuple[int, int], raw_dtype: Any, k90: int = 0) -> Plan:
    key = (tuple(int(s) for s in shape), np.dtype(raw_dtype).name, int(k90) % 4, self.clip)
    if key in self._plans:
      return self._plans[key]
    base = Plan(shape=key[0], k90=key[2], channels=self.in_channels, raw_dtype=key[1],
                clip=self.clip, batch=self.batch_size)
    hr, wr = base.rotated_shape
    hp, wp = _ceil_to(hr, self.stride), _ceil_to(wr, self.stride)
    budget = self.device_budget_bytes
    if self.tile_size and (hp > self.tile_size or wp > self.tile_size):
      plan = self._tiled(base, hp, wp, self.tile_size)
      compiled, nbytes = self._compile(plan)
    else:
      plan = base
      compiled, nbytes = self._compile(plan)
      if budget and nbytes > budget:
        plan, compiled, nbytes = self._fit(base, hp, wp, nbytes, budget)
    plan = dataclasses.replace(plan, device_bytes=nbytes)
    self._plans[key] = plan
    self._compiled[plan] = compiled
    return plan

  def _tiled(self, base: Plan, hp: int, wp: int, tile: int, batch: int | None = None) -> Plan:
    tile = max(2 * self.stride, _ceil_to(tile, self.stride))
    overlap = self.tile_overlap if self.tile_overlap is not None else tile // 4
    overlap = min(max(self.stride, _ceil_to(overlap, self.stride)), tile - self.stride)
    th, tw = min(tile, hp), min(tile, wp)
    return dataclasses.replace(base, batch=batch or base.batch, tile=(th, tw), overlap=overlap)

  def _fit(self, base: Plan, hp: int, wp: int, nbytes: int, budget: int):
    """Shrinks the batch, then tiles (smaller and smaller), until the call's memory fits."""
    fixed = self.state_bytes
    per_plane = max((nbytes - fixed) / base.batch, 1.0)
    batch = min(base.batch - 1, int((budget - fixed) // per_plane))
    if batch >= 1:
      batch = 1 << (batch.bit_length() - 1)  # a power of two: slabs of 2^k planes split evenly
    while batch >= 1:
      plan = dataclasses.replace(base, batch=batch)
      compiled, nb = self._compile(plan)
      if nb <= budget:
        return plan, compiled, nb
      batch //= 2
    per_px = per_plane / (hp * wp)
    tile = int(math.sqrt(max(budget - fixed, 1) / per_px)) // self.stride * self.stride
    while True:
      plan = self._tiled(base, hp, wp, tile, batch=1)
      compiled, nb = self._compile(plan)
      if nb <= budget or tile <= 2 * self.stride:
        return plan, compiled, nb  # the smallest tile, even if still over: nothing smaller works
      tile = int(tile * 0.75) // self.stride * self.stride

  # -------------------------------------------------------------------------------------------
  # Running.
  # -------------------------------------------------------------------------------------------

  def stream(self, slabs: Iterable[tuple[Any, np.ndarray]], k90: int = 0,
             in_flight: int = IN_FLIGHT) -> Iterator[tuple[Any, np.ndarray]]:
    """(key, planes (n, H, W[, C])) in -> (key, probabilities (n, H, W, K) float32) out, in order.

    Batches of the next slab are dispatched before the last ones of this slab are collected,
    so the device never waits for the host between slabs.
    """
    pending: collections.deque = collections.deque()

    def collect():
      rec, b0, b1, y = pending.popleft()
      rec[1][b0:b1] = np.asarray(y)[:b1 - b0]
      rec[2] -= 1
      if rec[2] == 0:
        return rec[0], rec[1]
      return None

    for key, planes in slabs:
      n = int(planes.shape[0])
      if n == 0:
        continue
      plan = self.plan(planes.shape[1:3], planes.dtype, k90)
      fn = self._compiled[plan]
      b = self.global_batch(plan)
      out = np.empty((n,) + tuple(planes.shape[1:3]) + (self.num_classes,), np.float32)
      rec = [key, out, -(-n // b)]
      for b0 in range(0, n, b):
        x = planes[b0:b0 + b]
        if x.shape[0] < b:
          x = np.concatenate([x, np.zeros((b - x.shape[0],) + x.shape[1:], x.dtype)])
        # Placed explicitly (each device gets its rows): jit takes no sharded numpy input in
        # a multi-process job.
        y = fn(self.state, jax.device_put(x, self.sharded), *self._norm)
        y.copy_to_host_async()
        pending.append((rec, b0, min(b0 + b, n), y))
        while len(pending) > in_flight:
          done = collect()
          if done is not None:
            yield done
    while pending:
      done = collect()
      if done is not None:
        yield done

  def infer(self, planes: np.ndarray, k90: int = 0) -> np.ndarray:
    """Probabilities (n, H, W, K) of a stack of planes (n, H, W[, C])."""
    out = [p for _, p in self.stream([(0, planes)], k90)]
    return out[0] if out else np.zeros(tuple(planes.shape[:3]) + (self.num_classes,), np.float32)

  def describe(self) -> list[dict[str, Any]]:
    """The plans made so far (for logs and results)."""
    return [{"shape": list(p.shape), "k90": p.k90, "batch": p.batch,
             "tile": list(p.tile) if p.tile else None, "overlap": p.overlap,
             "devices": self.num_devices, "device_mb": round(p.device_bytes / 2**20, 1)}
            for p in self._plans.values()]
