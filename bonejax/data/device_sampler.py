"""The device-resident patch sampler: training scans in device memory, crops cut on the device.

Why: the host path (patches.PatchStream) reads, mirrors and normalises every crop on the CPU,
about 1,000 patches/s per core, while one GPU trains ~10k `unet_resnet18` patches/s and a host
of eight needs ~85k/s. Here the scans are loaded into device memory once, and a step moves only
its records from the host (5 int32 per patch: scan, axis, plane, row and column origin); one
jitted gather cuts, mirrors and normalises the crops on the devices.

Same batches as the host path. The records are PatchStream's own (`records` at the same stream
positions), the mirror indices are the same formula, and the normalisation is the same float32
`(x - offset) * scale` (then the same clip): for one seed both paths give bit-identical batches,
so a run may change paths when it resumes. The iterator state is the stream's one position.

The edge margin (config.edge_margin: crop origins past the borders, clamped back) needs nothing
here either: it lives in the records' origins, clamped back to where a crop without a margin may start.

Sparse labels need nothing here: the records (labelled planes and cells) are the stream's, and
the unlabelled value (255) is gathered like any label and masked by the loss.

Layout. The scans share one 2-D buffer per array, (rows, ROW) with ROW = 2^15 elements, each scan
starting on a row of its own: images raw in the narrowest dtype holding all of them (uint8 <
uint16 < float32: normalised on the device with each scan's offset and scale), labels uint8.
A voxel's (row, column) is computed from quotient/remainder pairs in int32 arithmetic, so a
dataset past 2^31 voxels needs no 64-bit integers (jax_enable_x64 stays off). Two placements:
- replicated: every device holds the whole buffer and cuts its own rows of the batch, with no
  communication;
- sharded: the buffer's rows are split over the devices of each host (and repeated on every
  host). Every device cuts all of its host's crops from the part it holds (zeros elsewhere) and a
  reduce-scatter over the host's devices (NVLink on a GPU host) sums them into each device's own
  rows; integer scans travel packed as image << 8 | label, 4 B per pixel.
`plan` picks replicated when it fits the per-device budget, else sharded, else neither (feed.py
then refuses or falls back to the host path).

Multi-host: the trainer's 'data' mesh is regrouped as (host, local) with the same device order,
host p cuts the records PatchStream gives process p, and the batch comes out sharded over 'data'
exactly where mesh.put_batch puts the host path's batch.

2.5D (`context_slices` = k): the plane term of `_buffer_index` is one per context plane (mirrored
along the axis like the crop's rows: context.context_planes), a channel axis of 2k + 1 on the
gather; the labels are gathered at the centre plane. Sharded, the channels and the label travel
together through one reduce-scatter (int32 or float32).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bonejax.data import context, store
from bonejax.io import intensity
from bonejax.data import patches

ROW_BITS = 15
ROW = 1 << ROW_BITS  # elements per buffer row
MAX_DIM = 1 << 16    # a scan side; keeps pos * (stride mod ROW) below 2^31 (see _term)
RECORD_STEPS = 16    # batches of records computed per call on the host
DEFAULT_DEVICE_FRACTION = 0.5  # of an accelerator's memory, when no budget is configured
DEFAULT_RAM_FRACTION = 0.25    # of the host's RAM (CPU devices), shared by its devices
_PLANE_DIMS = np.array([[1, 2], [0, 2], [0, 1]], np.int32)  # patches._plane_dims, per axis
_MIB = 1 << 20


def _fmt(nbytes: float) -> str:
  return f"{nbytes / _MIB:,.1f} MiB" if nbytes >= _MIB else f"{nbytes / 1024:,.1f} KiB"


# ---------------------------------------------------------------------------------------------
# Planning: where the scans go and whether they fit.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
  """The scans' place in the buffers, and the bytes each placement costs per device."""
  shapes: tuple[tuple[int, int, int], ...]
  start_rows: tuple[int, ...]      # each scan's first buffer row
  rows: int                        # buffer rows, a multiple of `local_devices`
  image_dtype: str
  local_devices: int
  budget: int                      # bytes per device
  placement: str                   # "replicated" | "sharded" | "" (does not fit)
  reason: str = ""                 # why the device path cannot be used at all, if it cannot

  @property
  def total_bytes(self) -> int:
    return self.rows * ROW * (np.dtype(self.image_dtype).itemsize + 1)

  def bytes_per_device(self, placement: str) -> int:
    return self.total_bytes // (self.local_devices if placement == "sharded" else 1)

  @property
  def fits(self) -> bool:
    return bool(self.placement)

  def describe(self) -> str:
    if self.reason:
      return self.reason
    voxels = sum(int(np.prod(s)) for s in self.shapes)
    what = (f"{len(self.shapes)} training scan(s), {voxels:,} voxels: {self.image_dtype} images + "
            f"uint8 labels = {_fmt(self.total_bytes)}")
    if self.placement:
      return (f"{what}, {self.placement} ({_fmt(self.bytes_per_device(self.placement))} per "
              f"device of a {_fmt(self.budget)} budget)")
    sharded = (f", {_fmt(self.bytes_per_device('sharded'))} sharded over {self.local_devices} "
               "devices" if self.local_devices > 1 else "")
    return (f"{what} per device replicated{sharded}: over the budget of {_fmt(self.budget)} "
            "per device (config.sampler_device_mb)")


def device_budget(devices: Sequence[jax.Device], budget_mb: int = 0) -> int:
  """Bytes per device the scans may take: `budget_mb` MiB, or by default half an
  accelerator's memory (a quarter of the host's RAM shared by its CPU devices).

  Several processes take the smallest of their budgets, so all of them choose the same path.
  """
  if budget_mb > 0:
    budget = int(budget_mb) * _MIB
  else:
    local = [d for d in devices if d.process_index == jax.process_index()] or list(devices)
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in local]
    if all(limits):
      budget = int(min(limits) * DEFAULT_DEVICE_FRACTION)
    else:
      ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
      budget = int(ram * DEFAULT_RAM_FRACTION) // len(local)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    budget = int(np.min(multihost_utils.process_allgather(np.int64(budget))))
  return budget


def host_groups(mesh: Mesh) -> Mesh | None:
  """The 1-D 'data' mesh as (host, local), same device order; None when a process's devices
  are not contiguous in it."""
  if mesh.devices.size % jax.process_count():
    return None
  devices = mesh.devices.reshape(jax.process_count(), -1)
  if any(len({d.process_index for d in row}) != 1 for row in devices):
    return None
  return Mesh(devices, ("host", "local"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def plan(shapes: Sequence[Sequence[int]], dtypes: Sequence[Any], mesh: Mesh,
         budget: int) -> Layout:
  """Replicated if it fits `budget` bytes per device, else sharded over each host's devices,
  else a Layout that does not fit (or names why the device path cannot run at all)."""
  shapes = tuple(tuple(int(v) for v in s) for s in shapes)
  image_dtype = np.result_type(*[np.dtype(d) for d in dtypes])
  groups = host_groups(mesh)
  local = groups.shape["local"] if groups is not None else 1
  starts, row = [], 0
  for s in shapes:
    starts.append(row)
    row += -(-int(np.prod(s)) // ROW)
  rows = -(-max(row, 1) // local) * local
  reason = ""
  if image_dtype not in (np.uint8, np.uint16, np.float32):
    reason = (f"the device sampler cannot hold images of dtype {image_dtype} (uint8, uint16, "
              "float32)")
  elif max(max(s) for s in shapes) >= MAX_DIM:
    reason = (f"the device sampler cannot hold a scan side of {max(max(s) for s in shapes)} "
              f"voxels (>= {MAX_DIM})")
  elif rows >= 2**31:
    reason = f"the device sampler cannot index {rows} buffer rows (>= 2^31)"
  elif groups is None:
    reason = "the device sampler needs each process's devices side by side in the mesh"
  layout = Layout(shapes, tuple(starts), rows, image_dtype.name, local, int(budget), "", reason)
  if reason:
    return layout
  for placement in ("replicated", "sharded") if local > 1 else ("replicated",):
    if layout.bytes_per_device(placement) <= budget:
      return dataclasses.replace(layout, placement=placement)
  return layout


# ---------------------------------------------------------------------------------------------
# The crop, on the device.
# ---------------------------------------------------------------------------------------------


def _reflect(i: jax.Array, n: jax.Array) -> jax.Array:
  """The mirror rule (context.reflect_index) with a per-crop n."""
  return context.reflect_index(i, n, jnp)


def _term(pos: jax.Array, sq: jax.Array, sr: jax.Array) -> tuple[jax.Array, jax.Array]:
  """pos * stride as (quotient, remainder) by ROW, with stride = sq * ROW + sr.

  int32-safe: pos < 2^16 and sr < 2^15 keep pos * sr below 2^31.
  """
  low = pos * sr
  return pos * sq + (low >> ROW_BITS), low & (ROW - 1)


def _buffer_index(t: dict[str, jax.Array], rows: jax.Array, patch: int, context: int = 0):
  """Buffer (row, column), each (n, P, P, 2 * context + 1) int32, of every pixel of the crops
  `rows` (n, 5), channel c at plane + c - context (mirrored into the scan)."""
  s, axis, plane, oy, ox = (rows[:, k] for k in range(5))
  dims = jnp.asarray(_PLANE_DIMS)[axis]                        # (n, 2)
  pick = lambda a, d: jnp.take_along_axis(a[s], d[:, None], 1)[:, 0]  # noqa: E731
  ramp = jnp.arange(patch, dtype=jnp.int32)
  # The voxel offset is separable: plane term (c) + row term (i) + column term (j).
  offsets = jnp.arange(-context, context + 1, dtype=jnp.int32)
  planes = _reflect(plane[:, None] + offsets, pick(t["shape"], axis)[:, None])  # (n, C)
  qb, rb = _term(planes, pick(t["stride_q"], axis)[:, None], pick(t["stride_r"], axis)[:, None])
  qb = qb + t["start_row"][s][:, None]
  terms = []
  for k, origin in ((0, oy), (1, ox)):
    d = dims[:, k]
    pos = _reflect(origin[:, None] + ramp, pick(t["shape"], d)[:, None])  # (n, P)
    terms.append(_term(pos, pick(t["stride_q"], d)[:, None], pick(t["stride_r"], d)[:, None]))
  (q0, r0), (q1, r1) = terms
  r = rb[:, None, None, :] + r0[:, :, None, None] + r1[:, None, :, None]  # < 3 * ROW
  q = qb[:, None, None, :] + q0[:, :, None, None] + q1[:, None, :, None] + (r >> ROW_BITS)
  return q, r & (ROW - 1)


@functools.lru_cache(maxsize=8)
def _crop_fn(groups: Mesh, out_sharding: NamedSharding, patch: int, clip: bool, sharded: bool,
             packed: bool, context: int = 0):
  """jit((image buffer, label buffer, tables, rows) -> batch), `rows` (G, 5) sharded by host."""
  n_local = groups.shape["local"]

  def body(image, label, t, rows):
    local = jax.lax.axis_index("local")
    own = rows.shape[0] // n_local  # this device's rows of its host's share
    if sharded:
      q, r = _buffer_index(t, rows, patch, context)
      q = q - local * image.shape[0]
      inside = (q >= 0) & (q < image.shape[0])
      q = jnp.clip(q, 0, image.shape[0] - 1)
      img = jnp.where(inside, image.at[q, r].get(mode="clip"), 0)
      c = context  # the centre plane's channel: its labels
      lab = jnp.where(inside[..., c], label.at[q[..., c], r[..., c]].get(mode="clip"), 0)
      # Each pixel is non-zero on at most one device: the sum is exact (x + 0 = x).
      scatter = functools.partial(jax.lax.psum_scatter, axis_name="local", scatter_dimension=0,
                                  tiled=True)
      if packed and context == 0:
        v = scatter((img[..., 0].astype(jnp.int32) << 8) | lab.astype(jnp.int32))
        img, lab = (v >> 8)[..., None], v & 0xFF
      else:  # the channels and the label as one array, one collective
        dt = jnp.int32 if packed else jnp.float32
        v = scatter(jnp.concatenate([img.astype(dt), lab[..., None].astype(dt)], -1))
        img, lab = v[..., :-1], v[..., -1]
      rows = jax.lax.dynamic_slice_in_dim(rows, local * own, own)
    else:
      rows = jax.lax.dynamic_slice_in_dim(rows, local * own, own)
      q, r = _buffer_index(t, rows, patch, context)
      img = image.at[q, r].get(mode="clip")
      lab = label.at[q[..., context], r[..., context]].get(mode="clip")
    s = rows[:, 0]
    # As intensity.normalize on the host: float32 (x - offset) * scale, then the clip.
    x = ((img.astype(jnp.float32) - t["offset"][s][:, None, None, None]) *
         t["scale"][s][:, None, None, None])
    if clip:
      x = jnp.clip(x, 0.0, 1.0)
    return {"image": x, "label": lab.astype(jnp.int32)}

  buf = P("local") if sharded else P()
  return jax.jit(jax.shard_map(body, mesh=groups, in_specs=(buf, buf, P(), P("host")),
                               out_specs=P(("host", "local"))),
                 out_shardings=out_sharding)


# ---------------------------------------------------------------------------------------------
# The sampler.
# ---------------------------------------------------------------------------------------------


class DeviceSampler:
  """`next(sampler)` -> dict(image float32 (G, P, P, C), label int32 (G, P, P)): global arrays
  sharded over the mesh's 'data' axis, equal to `put_batch(next(stream))` of the host path.

  `stream` supplies the records and the position (its reading machinery stays unused);
  `layout` comes from `plan` and must fit.
  """

  def __init__(self, stream: patches.PatchStream, mesh: Mesh, layout: Layout):
    if not layout.fits:
      raise ValueError(f"layout does not fit: {layout.describe()}")
    self.stream, self.mesh, self.layout = stream, mesh, layout
    self.global_batch_size = stream.global_batch_size
    self._rows, self._rows_first = None, None
    self._groups = host_groups(mesh)
    self._rows_sharding = NamedSharding(self._groups, P("host"))
    sharded = layout.placement == "sharded"
    buf_sharding = NamedSharding(self._groups, P("local") if sharded else P())
    self._image = self._load("image", np.dtype(layout.image_dtype), buf_sharding)
    self._label = self._load("labels", np.dtype(np.uint8), buf_sharding)
    self._tables = jax.device_put(self._make_tables(), NamedSharding(self._groups, P()))
    clip = intensity.normalize_params(stream.scans[0].norm, stream.normalization)[2]
    self._crop = _crop_fn(self._groups, NamedSharding(mesh, P("data")), stream.patch_size, clip,
                          sharded, np.issubdtype(np.dtype(layout.image_dtype), np.integer),
                          stream.context_slices)

  @property
  def kind(self) -> str:
    return f"device ({self.layout.placement})"

  # -- loading --------------------------------------------------------------------------------

  def _make_tables(self) -> dict[str, np.ndarray]:
    shapes = np.array(self.layout.shapes, np.int64)
    strides = np.stack([shapes[:, 1] * shapes[:, 2], shapes[:, 2], np.ones_like(shapes[:, 2])], 1)
    norm = [intensity.normalize_params(s.norm, self.stream.normalization)
            for s in self.stream.scans]
    return {"shape": shapes.astype(np.int32),
            "stride_q": (strides // ROW).astype(np.int32),
            "stride_r": (strides % ROW).astype(np.int32),
            "start_row": np.array(self.layout.start_rows, np.int32),
            "offset": np.array([n[0] for n in norm], np.float32),
            "scale": np.array([n[1] for n in norm], np.float32)}

  def _read_rows(self, what: str, dtype: np.dtype, r0: int, r1: int) -> np.ndarray:
    """Buffer rows [r0, r1) of the image or label buffer, read from the scans."""
    out = np.zeros((r1 - r0) * ROW, dtype)
    lo, hi = r0 * ROW, r1 * ROW
    for si, info in enumerate(self.stream.scans):
      shape = self.layout.shapes[si]
      zplane = shape[1] * shape[2]
      e0 = self.layout.start_rows[si] * ROW
      a, b = max(lo, e0) - e0, min(hi, e0 + zplane * shape[0]) - e0
      if a >= b:
        continue
      z0, z1 = a // zplane, -(-b // zplane)
      arr = info.scan.image if what == "image" else info.scan.labels
      block = patches._read(store.read_box(arr, (z0, 0, 0), (z1 - z0,) + shape[1:]), info,
                            what)
      if what == "labels":
        patches.check_labels(block, info, self.stream.classes, self.stream.unlabelled)
      flat = block.reshape(-1)[a - z0 * zplane:b - z0 * zplane]
      out[e0 + a - lo:e0 + b - lo] = flat
    return out.reshape(r1 - r0, ROW)

  def _load(self, what: str, dtype: np.dtype, sharding: NamedSharding) -> jax.Array:
    """The buffer on the devices; each process reads only the rows its devices hold (each
    distinct block once)."""
    blocks: dict[tuple[int, int], np.ndarray] = {}

    def block(index) -> np.ndarray:
      rows = index[0]
      key = (rows.start or 0, self.layout.rows if rows.stop is None else rows.stop)
      if key not in blocks:
        blocks[key] = self._read_rows(what, dtype, *key)
      return blocks[key]

    return jax.make_array_from_callback((self.layout.rows, ROW), sharding, block)

  # -- batches --------------------------------------------------------------------------------

  def rows_at(self, batch_start: int) -> np.ndarray:
    """This host's records of the batch at `batch_start`, computed RECORD_STEPS batches at a
    time: records() costs ~1 ms per call plus ~1-10 us per record, and a host feeding 8 GPUs
    has ~3 ms per step."""
    g = self.global_batch_size
    first = self._rows_first
    if first is None or not first <= batch_start < first + len(self._rows) * g or \
        (batch_start - first) % g:
      starts = batch_start + g * np.arange(RECORD_STEPS)
      positions = np.concatenate([self.stream.local_positions(int(b)) for b in starts])
      self._rows = self.stream.records(positions).astype(np.int32).reshape(RECORD_STEPS, -1, 5)
      self._rows_first = first = batch_start
    return self._rows[(batch_start - first) // g]

  def batch_at(self, batch_start: int) -> dict[str, jax.Array]:
    """The global batch at stream position `batch_start` (this host's rows cut by its devices)."""
    rows = jax.make_array_from_process_local_data(self._rows_sharding, self.rows_at(batch_start),
                                                  (self.global_batch_size, 5))
    return self._crop(self._image, self._label, self._tables, rows)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    batch = self.batch_at(self.stream.position)
    self.stream.position += self.global_batch_size
    return batch

  @property
  def position(self) -> int:
    return self.stream.position

  def get_state(self) -> dict[str, int]:
    return self.stream.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self.stream.set_state(state)

  def close(self) -> None:
    self._image = self._label = None  # frees the device buffers with the last reference
    self.stream.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
