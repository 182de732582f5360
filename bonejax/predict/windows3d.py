"""3D prediction by sliding windows with Gaussian blending, out of core, over every local device.

A 3D model (input (B, D, H, W, C)) sees the scan through windows of `window` voxels on a grid
spaced `(1 - overlap) x window` (nnU-Net's rule: evenly spread starts, the last flush with the
far side). Each window's softmax is weighted by a Gaussian importance map (sigma = 1/8 of the
window on every axis, as nnU-Net and MONAI: voxels near a window's border, which saw the least
context, count least) and the weighted sums divided by the summed weights.

Out of core along Z: the Z starts are taken in groups; a group reads the planes its windows
cover (its slab plus the window's overlap with the next group, the halo), adds its windows into
an accumulator spanning those planes, and hands on the planes no later window reaches
(finished: voted, written) while the overlap is carried into the next group's accumulator.
Host memory is then one group's accumulators and input slab, whatever the scan's depth
(`Plan3d.host_bytes`, chosen from `memory_budget_gb`).

Windows go to the devices in batches of `batch_size` per device: a one-axis `data` mesh, the
weights replicated once, the batch sharded (`NamedSharding(mesh, P("data"))`) and each device
running the same single-device program (`shard_map`, no communication: a window's
probabilities do not depend on the number of devices). The last batch is padded.

Test-time flips (`flips=n`: the first n of the 8 mirrorings of the three axes, nnU-Net's
mirroring) average the flipped predictions inside the compiled call; the blended fraction of
flips voting each class gives the uncertainty's disagreement channel, as the plane sets do in
the 2D predictor (`evaluate.uncertainty.maps`: entropy of the mean, fraction disagreeing).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bonejax.core import errors
from bonejax.io import intensity

SIGMA_SCALE = 1.0 / 8  # nnU-Net's and MONAI's Gaussian: sigma = window / 8
DEFAULT_WINDOW = 96
DEFAULT_OVERLAP = 0.5
DEFAULT_BATCH = 2
DEFAULT_BUDGET_GB = 2.0
# The mirrorings of nnU-Net's test-time augmentation, in the order `flips=n` takes them.
FLIPS: tuple[tuple[int, ...], ...] = ((), (2,), (1,), (0,), (1, 2), (0, 2), (0, 1), (0, 1, 2))


def gaussian_importance(window: Sequence[int], sigma_scale: float = SIGMA_SCALE) -> np.ndarray:
  """(D, H, W) float32 weights: a Gaussian centred in the window, sigma = sigma_scale x side on
  each axis, maximum 1. Separable and symmetric (MONAI's centring: (n - 1) / 2); never 0 (its
  smallest value, exp(-8) at a face for sigma = n / 8, keeps every voxel covered)."""
  axes = []
  for n in window:
    i = np.arange(int(n), dtype=np.float64) - (int(n) - 1) / 2.0
    sigma = max(float(n) * sigma_scale, 1e-6)
    axes.append(np.exp(-0.5 * (i / sigma)**2))
  g = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
  return (g / g.max()).astype(np.float32)


def window_starts(length: int, window: int, overlap: float) -> list[int]:
  """nnU-Net's starts along one axis: step = (1 - overlap) x window, as few windows as cover
  `length`, spread evenly from 0 to length - window (rounded)."""
  if length <= window:
    return [0]
  step = max(1.0, window * (1.0 - overlap))
  n = int(math.ceil((length - window) / step)) + 1
  actual = (length - window) / (n - 1)
  return [int(round(actual * i)) for i in range(n)]


@dataclasses.dataclass(frozen=True)
class Plan3d:
  shape: tuple[int, int, int]  # the scan (Z, Y, X)
  padded: tuple[int, int, int]  # at least a window on each axis (reflection past the far side)
  window: tuple[int, int, int]
  starts: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
  group: int  # Z starts per group (the slab); at least 1: a budget below one window-deep
  # group's accumulators (`host_bytes`) is exceeded, not refused
  batch: int  # windows per device per call
  devices: int
  host_bytes: int  # accumulators and input of one group

  @property
  def windows(self) -> int:
    return math.prod(len(s) for s in self.starts)


def _ceil_to(n: int, m: int) -> int:
  return -(-int(n) // m) * m


def _as_3d_model(model: Any) -> tuple[nnx.Module, int, str | None]:
  """(model, in_channels, normalisation rule or None) from an nnx module or a bundle."""
  from bonejax import models  # pylint: disable=import-outside-toplevel
  meta = getattr(model, "meta", None)
  if meta is not None:  # a bundle.Bundle
    if models.spatial_dims(meta["model"]) != 3:
      raise errors.UserError(f"the bundle's model {meta['model']!r} is 2D: predict it by planes "
                             "(predict_scan / predict_volume), not by 3D windows")
    return model.model, int(meta.get("in_channels", 1)), meta.get("normalization")
  if getattr(model, "spatial_dims", 2) != 3:
    raise errors.UserError(f"{type(model).__name__} is not a 3D model (input (B, D, H, W, C)); "
                           "3D windows need one, e.g. unet3d or unet3d_resnet18")
  return model, int(getattr(model, "in_channels", 1)), None


class _Reader:
  """Z slabs of a numpy array, a tensorstore or a `VolumeSource` (read_slab)."""

  def __init__(self, volume: Any):
    self.volume = volume
    self.shape = tuple(int(s) for s in volume.shape)
    if len(self.shape) not in (3, 4):
      raise errors.UserError(f"a 3D prediction needs a (Z, Y, X) or (Z, Y, X, C) volume, got "
                             f"shape {self.shape}")

  def read(self, z0: int, z1: int) -> np.ndarray:
    if hasattr(self.volume, "read_slab"):
      return np.asarray(self.volume.read_slab(z0, z1))
    region = self.volume[z0:z1]
    if hasattr(region, "read"):  # tensorstore
      return np.asarray(region.read().result())
    return np.asarray(region)


def _pad(data: np.ndarray, target: Sequence[int]) -> np.ndarray:
  """Pads the first three axes at the far side up to `target`, by reflection (edge for a
  side of one voxel): what the scan would look like past its border, as in the 2D predictor."""
  widths = [(0, max(0, int(t) - s)) for t, s in zip(target, data.shape[:3])]
  if not any(w for _, w in widths):
    return data
  widths += [(0, 0)] * (data.ndim - 3)
  mode = "reflect" if min(data.shape[:3]) > 1 else "edge"
  return np.pad(data, widths, mode=mode)


def make_plan(shape: Sequence[int], window: int | Sequence[int], overlap: float, stride: int,
              num_classes: int, in_channels: int, batch: int, devices: int,
              memory_budget_gb: float, keep_votes: bool) -> Plan3d:
  shape = tuple(int(s) for s in shape[:3])
  if not 0.0 <= float(overlap) < 1.0:
    raise errors.UserError(f"overlap={overlap} must be in [0, 1)")
  w = (int(window),) * 3 if np.isscalar(window) else tuple(int(v) for v in window)
  if len(w) != 3 or min(w) < 1:
    raise errors.UserError(f"window={window} must be one side or three (D, H, W), all >= 1")
  # A window is a multiple of the model's stride, and no larger than the scan needs.
  w = tuple(min(_ceil_to(v, stride), _ceil_to(s, stride)) for v, s in zip(w, shape))
  padded = tuple(max(s, v) for s, v in zip(shape, w))
  starts = tuple(tuple(window_starts(p, v, overlap)) for p, v in zip(padded, w))
  zs = starts[0]
  plane = padded[1] * padded[2]
  per_plane = plane * 4 * (num_classes * (2 if keep_votes else 1) + 1) + plane * 4 * in_channels
  budget = float(memory_budget_gb) * 2**30
  group = len(zs)
  while group > 1:
    span = zs[group - 1] - zs[0] + w[0]
    if span * per_plane <= budget:
      break
    group -= 1
  span = max(zs[min(i + group, len(zs)) - 1] + w[0] - zs[i] for i in range(0, len(zs), group))
  return Plan3d(shape, padded, w, starts, group, max(1, int(batch)), int(devices),
                int(span * per_plane))


class WindowEngine:
  """Raw windows (n, D, H, W[, C]) in, Gaussian-weighted probabilities (and flip votes) out,
  batches spread over `devices`; one compiled call per window shape."""

  def __init__(self, model: nnx.Module, *, in_channels: int, devices: Sequence[Any] | None,
               flips: int, dtype: Any = None, normalization: str | None = None):
    self.normalization = normalization  # the bundle's rule, when made from one
    view = nnx.view(model, use_running_average=True, deterministic=True,
                    raise_if_not_found=False)
    if dtype is not None:
      from bonejax.predict.engine import with_compute_dtype  # pylint: disable=C0415
      view = with_compute_dtype(view, jnp.dtype(dtype))
    self.graphdef, state = nnx.split(view)
    self.devices = list(devices) if devices is not None else jax.local_devices()
    self.mesh = Mesh(np.array(self.devices), ("data",))
    self.replicated = NamedSharding(self.mesh, P())
    self.sharded = NamedSharding(self.mesh, P("data"))
    self.state = jax.device_put(state, self.replicated)  # once, on every device
    self.in_channels, self.dtype = int(in_channels), dtype
    if not 1 <= int(flips) <= len(FLIPS):
      raise errors.UserError(f"flips={flips} must be in 1..{len(FLIPS)} (1: no test-time "
                             "flips)")
    self.flips = FLIPS[:int(flips)]
    self.stride = int(getattr(model, "stride", 32))
    s = self.stride
    out = jax.eval_shape(lambda st, x: nnx.merge(self.graphdef, st)(x), self.state,
                         jax.ShapeDtypeStruct((1, s, s, s, self.in_channels), jnp.float32))
    self.num_classes = int(out.shape[-1])
    self._compiled: dict[tuple, Any] = {}

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @property
  def compilations(self) -> int:
    """Compiled calls so far (one per window shape, input dtype and uncertainty on/off)."""
    return len(self._compiled)

  def _function(self, weight: np.ndarray, votes: bool):
    graphdef, flips, k = self.graphdef, self.flips, self.num_classes
    cdt = self.dtype or jnp.float32

    def fn(state, x, offset, scale, clip):
      if x.ndim == 4:
        x = x[..., None]
      x = (x.astype(jnp.float32) - offset) * scale
      x = jnp.where(clip, jnp.clip(x, 0.0, 1.0), x)
      model = nnx.merge(graphdef, state)
      probs = jnp.zeros(x.shape[:4] + (k,), jnp.float32)
      counts = jnp.zeros_like(probs)
      for axes in flips:
        ax = tuple(a + 1 for a in axes)
        xi = jnp.flip(x, ax) if ax else x
        p = jax.nn.softmax(model(xi.astype(cdt)).astype(jnp.float32), axis=-1)
        p = jnp.flip(p, ax) if ax else p
        probs = probs + p
        if votes:
          counts = counts + jax.nn.one_hot(jnp.argmax(p, -1), k, dtype=jnp.float32)
      g = jnp.asarray(weight)[None, :, :, :, None] * (1.0 / len(flips))
      return (probs * g, counts * g) if votes else (probs * g,)

    return fn

  def compiled(self, plan: Plan3d, raw_dtype: Any, votes: bool):
    key = (plan.window, plan.batch, np.dtype(raw_dtype).str, votes)
    if key not in self._compiled:
      fn = self._function(gaussian_importance(plan.window), votes)
      per_device = jax.shard_map(fn, mesh=self.mesh,
                                 in_specs=(P(), P("data"), P(), P(), P()),
                                 out_specs=P("data"), check_vma=False)
      self._compiled[key] = jax.jit(per_device)
    return self._compiled[key]


def make_window_engine(model: Any, *, devices: int | None = None, flips: int = 1,
                       dtype: Any = None) -> WindowEngine:
  """A `WindowEngine` for a 3D model or bundle on the first `devices` local devices (default
  all): build it once and pass it to `predict_volume_3d` for every scan, so each window shape
  compiles once."""
  net, in_channels, rule = _as_3d_model(model)
  local = jax.local_devices()
  n_dev = len(local) if devices is None else int(devices)
  if not 1 <= n_dev <= len(local):
    raise errors.UserError(f"devices={devices} must be in 1..{len(local)} (local devices)")
  return WindowEngine(net, in_channels=in_channels, devices=local[:n_dev], flips=flips,
                      dtype=dtype, normalization=rule)


def z_shares(depth: int, count: int, align: int = 64) -> list[tuple[int, int]]:
  """`count` contiguous Z ranges covering 0..depth, boundaries on multiples of `align` (the
  output's chunk depth: processes then never write one chunk together); some may be empty
  when the scan has fewer chunks than processes (skip those)."""
  chunks = -(-int(depth) // int(align))
  cuts = [min(depth, (chunks * i // count) * align) for i in range(count + 1)]
  return [(cuts[i], cuts[i + 1]) for i in range(count)]


@dataclasses.dataclass
class Prediction3d:
  labels: np.ndarray | None  # (Z, Y, X) uint8, when kept in memory
  probabilities: np.ndarray | None  # (Z, Y, X, K) float32, when kept
  plan: Plan3d
  seconds: float
  windows_run: int  # all of the plan's, or those reaching `z_range`

  def summary(self) -> dict[str, Any]:
    p = self.plan
    return {"mode": "3d_windows", "window": list(p.window), "windows": self.windows_run,
            "overlap_starts": [len(s) for s in p.starts], "group": p.group,
            "batch": p.batch, "devices": p.devices, "host_bytes": p.host_bytes,
            "seconds": round(self.seconds, 3)}


def _writer(out: Any) -> Callable[[int, np.ndarray], None] | None:
  """A `(z0, planes)` writer for a numpy array, a SlabVolume (write(axis, s0, planes)), a
  tensorstore, or None."""
  if out is None:
    return None
  if isinstance(out, np.ndarray):
    def write(z0, planes):
      out[z0:z0 + planes.shape[0]] = planes
    return write
  if hasattr(out, "plane_shape"):  # predict.volumes.SlabVolume
    return lambda z0, planes: out.write(0, z0, planes)
  return lambda z0, planes: out[z0:z0 + planes.shape[0]].write(planes).result()


class _Outputs:
  """Where finished planes go: divided by the summed weights, voted, handed to the sinks and
  kept in memory as asked; planes outside `z_range` (another process's) are dropped."""

  def __init__(self, shape, k, z_range, nvote, *, keep_labels, keep_probs, labels_out,
               probs_out, uncertainty_out):
    self.shape, (self.p0, self.p1), self.nvote = shape, z_range, nvote
    self.labels = np.zeros(shape, np.uint8) if keep_labels else None
    self.probs = np.zeros(tuple(shape) + (k,), np.float32) if keep_probs else None
    self.label_sinks = [w for w in (_writer(labels_out),) if w]
    self.prob_sinks = [w for w in (_writer(probs_out),) if w]
    self.uncertainty = uncertainty_out

  def finish(self, z0: int, acc: np.ndarray, wsum: np.ndarray, vacc: np.ndarray | None) -> None:
    """Planes z0.. of the padded grid are complete: divide, vote, hand on (inside the scan)."""
    a, z1 = max(z0, self.p0), min(z0 + acc.shape[0], self.p1)
    if z1 <= a:
      return
    _, h, w = self.shape
    o, z0, n = a - z0, a, z1 - a
    inv = 1.0 / wsum[o:o + n, :h, :w, None]
    mean = acc[o:o + n, :h, :w] * inv
    lab = np.argmax(mean, axis=-1).astype(np.uint8)
    if self.labels is not None:
      self.labels[z0:z1] = lab
    if self.probs is not None:
      self.probs[z0:z1] = mean
    for sink in self.label_sinks:
      sink(z0, lab)
    for sink in self.prob_sinks:
      sink(z0, mean)
    if self.uncertainty is not None:
      counts = vacc[o:o + n, :h, :w] * inv * np.float32(self.nvote)
      self.uncertainty.add(z0, lab, mean, counts, self.nvote)


def predict_volume_3d(model: Any, volume: Any, *, stats: dict[str, Any] | None = None,
                      normalization: str | None = None,
                      window: int | Sequence[int] = DEFAULT_WINDOW,
                      overlap: float = DEFAULT_OVERLAP, flips: int = 1,
                      batch_size: int = DEFAULT_BATCH, devices: int | None = None,
                      dtype: Any = None, memory_budget_gb: float = DEFAULT_BUDGET_GB,
                      labels_out: Any = None, probs_out: Any = None,
                      uncertainty_out: Any = None, keep_labels: bool = True,
                      keep_probs: bool = False, progress: Callable[[int, int], None] | None = None,
                      z_range: tuple[int, int] | None = None) -> Prediction3d:
  """Labels (and probabilities, uncertainty) of `volume` from the 3D `model` by sliding windows.

  model: a 3D nnx module (`unet3d`, `unet3d_resnet18`), a `bundle.Bundle` holding one (its
    normalisation rule then applies unless `normalization` is given), or a prepared
    `WindowEngine` (`make_window_engine`: keeps its compiled calls across scans; `devices`,
    `flips` and `dtype` are then the engine's).
  volume: (Z, Y, X[, C]) numpy array, tensorstore, or `VolumeSource`; read in Z slabs.
  stats: intensity statistics for the normalisation rule (default: `volume.stats`).
  window: the window's side (or D, H, W), rounded up to the model's stride; overlap: the
    fraction of a window neighbouring windows share. flips: test-time mirrorings (1: none, 8:
    all of nnU-Net's). devices: the first N local devices (default all).
  labels_out / probs_out: where finished Z slabs go (numpy array, `volumes.SlabVolume`,
    tensorstore); uncertainty_out: an `evaluate.uncertainty.UncertaintyWriter` (its `add`).
    keep_labels / keep_probs: also return them in memory (labels by default).
  memory_budget_gb: host memory for one group's accumulators and input (Z slabs).
  z_range: (z0, z1): finish only output planes z0..z1-1, running every window that reaches them
    (several processes on one scan: each its own range, `z_shares`; in-memory outputs keep the
    scan's shape, filled in that range).
  """
  t0 = time.perf_counter()
  engine = model if isinstance(model, WindowEngine) else make_window_engine(
      model, devices=devices, flips=flips, dtype=dtype)
  in_channels, n_dev = engine.in_channels, len(engine.devices)
  rule = normalization or engine.normalization or "percentile"
  stats = stats if stats is not None else getattr(volume, "stats", None)
  if not intensity.has_stats(stats, rule):
    raise errors.UserError(f"3D prediction needs the volume's intensity statistics for the "
                           f"{rule!r} normalisation (stats=...)")
  offset, scale, clip = intensity.normalize_params(stats, rule)
  reader = _Reader(volume)
  channels = reader.shape[3] if len(reader.shape) == 4 else 1
  if channels != in_channels:
    raise errors.UserError(f"the model takes {in_channels} channel(s), the volume has "
                           f"{channels}")
  votes = uncertainty_out is not None
  k = engine.num_classes
  plan = make_plan(reader.shape, window, overlap, engine.stride, k, in_channels, batch_size,
                   n_dev, memory_budget_gb, votes)
  shape, padded, (wd, wh, ww) = plan.shape, plan.padded, plan.window
  zs, ys, xs = plan.starts
  p0, p1 = (0, shape[0]) if z_range is None else (int(z_range[0]), int(z_range[1]))
  if not 0 <= p0 < p1 <= shape[0]:
    raise errors.UserError(f"z_range={z_range} must lie within 0..{shape[0]} and not be empty")
  zs = tuple(z for z in zs if z < p1 and z + wd > p0)  # the windows reaching the range
  total = len(zs) * len(ys) * len(xs)
  weight = gaussian_importance(plan.window)
  norm = jax.device_put((np.float32(offset), np.float32(scale), np.bool_(clip)),
                        engine.replicated)

  outs = _Outputs(shape, k, (p0, p1), len(engine.flips), keep_labels=keep_labels,
                  keep_probs=keep_probs, labels_out=labels_out, probs_out=probs_out,
                  uncertainty_out=uncertainty_out)

  fn = None
  gb = plan.batch * n_dev
  done_windows = 0
  carry = None  # (start plane, acc, wsum, votes) not yet finished
  for g0 in range(0, len(zs), plan.group):
    group = zs[g0:g0 + plan.group]
    base, top = group[0], group[-1] + wd
    raw = _pad(reader.read(base, min(top, shape[0])), (top - base,) + padded[1:])
    if fn is None:
      fn = engine.compiled(plan, raw.dtype, votes)
    span = top - base
    acc = np.zeros((span,) + padded[1:] + (k,), np.float32)
    wsum = np.zeros((span,) + padded[1:], np.float32)
    vacc = np.zeros_like(acc) if votes else None
    if carry is not None:  # the overlap of the previous group's windows
      c0, cacc, cw, cv = carry
      o = c0 - base
      acc[o:o + cacc.shape[0]] += cacc
      wsum[o:o + cw.shape[0]] += cw
      if votes:
        vacc[o:o + cv.shape[0]] += cv
    corners = [(z - base, y, x) for z in group for y in ys for x in xs]
    for b0 in range(0, len(corners), gb):
      batch = corners[b0:b0 + gb]
      win = np.stack([raw[z:z + wd, y:y + wh, x:x + ww] for z, y, x in batch]
                     + [raw[:wd, :wh, :ww]] * (gb - len(batch)))
      out = fn(engine.state, jax.device_put(win, engine.sharded), *norm)
      out = [np.asarray(o) for o in out]
      for i, (z, y, x) in enumerate(batch):
        acc[z:z + wd, y:y + wh, x:x + ww] += out[0][i]
        wsum[z:z + wd, y:y + wh, x:x + ww] += weight
        if votes:
          vacc[z:z + wd, y:y + wh, x:x + ww] += out[1][i]
      done_windows += len(batch)
      if progress is not None:
        progress(done_windows, total)
    nxt = zs[g0 + plan.group] if g0 + plan.group < len(zs) else top
    cut = nxt - base  # planes before the next group's first window are finished
    outs.finish(base, acc[:cut], wsum[:cut], vacc[:cut] if votes else None)
    carry = (nxt, acc[cut:].copy(), wsum[cut:].copy(),
             vacc[cut:].copy() if votes else None) if cut < span else None
  return Prediction3d(outs.labels, outs.probs, plan, time.perf_counter() - t0, done_windows)
