"""3D patches cut on the devices from scans held in device memory: the 3D `device_sampler`.

The training scans are loaded once, replicated on every device: images raw in the narrowest
dtype holding all of them, labels uint8, stacked as (S, Z, Y, X) at the largest scan's shape
(smaller scans are zero-padded; no record reaches the padding, `PatchStream3d` keeps every crop
inside its scan). A step moves only its records from the host (4 int32 per patch: scan and
origin, `PatchStream3d.records` at the same stream positions); one jitted gather
(`lax.dynamic_slice` per example) cuts the crops and normalises them with each scan's offset
and scale in float32, the host stream's formula, so both paths give bit-identical batches and a
run may switch paths when it resumes. The batch comes out sharded on the mesh's `data` axis.

Several processes (hosts): every process loads the scans onto its own devices (each holds the
same replicated copy), computes only the records `PatchStream3d` gives it (its
`local_positions`) and places them where `mesh.put_batch` places the host stream's rows of that
process, so the global batch is the one process's, row for row, whatever the process count.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bonejax.core import errors
from bonejax.data import store
from bonejax.data.patches3d import PatchStream3d
from bonejax.io import intensity


def resident_bytes(stream: PatchStream3d) -> int:
  """Device memory per device for the stacked scans (images + labels)."""
  dtype = np.result_type(*[np.dtype(s.scan.image.dtype.numpy_dtype) for s in stream.scans])
  n = len(stream.scans) * int(np.prod(stream.shapes.max(0)))
  return n * (dtype.itemsize + 1)


def _replicated(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """`x` on every device of `sharding` (this process's devices from its own copy: every
  process read the same scans)."""
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


class DeviceSampler3d:
  """`next(sampler)` -> dict(image float32 (B, D, H, W, 1), label int32 (B, D, H, W)) sharded
  on `mesh`'s 'data' axis; the state is the stream's position."""

  def __init__(self, stream: PatchStream3d, mesh: Mesh, budget_bytes: int | None = None):
    need = resident_bytes(stream)
    if budget_bytes is not None and need > budget_bytes:
      raise errors.UserError(f"the training scans need {need / 2**20:.0f} MiB per device, "
                             f"over the {budget_bytes / 2**20:.0f} MiB budget; use "
                             "sampler=host")
    self.stream, self.mesh = stream, mesh
    self.replicated = NamedSharding(mesh, P())
    self.sharded = NamedSharding(mesh, P("data"))
    dtype = np.result_type(*[np.dtype(s.scan.image.dtype.numpy_dtype) for s in stream.scans])
    top = tuple(int(v) for v in stream.shapes.max(0))
    images = np.zeros((len(stream.scans),) + top, dtype)
    labels = np.zeros((len(stream.scans),) + top, np.uint8)
    offsets, scales, clips = [], [], set()
    for i, s in enumerate(stream.scans):
      box = tuple(slice(0, n) for n in s.shape)
      images[(i,) + box] = store.read_slab(s.scan.image, 0, 0, s.shape[0])
      labels[(i,) + box] = store.read_slab(s.scan.labels, 0, 0, s.shape[0])
      o, sc, clip = intensity.normalize_params(s.norm, stream.normalization)
      offsets.append(o)
      scales.append(sc)
      clips.add(clip)
    self.images = _replicated(images, self.replicated)
    self.labels = _replicated(labels, self.replicated)
    self.offsets = _replicated(np.asarray(offsets, np.float32), self.replicated)
    self.scales = _replicated(np.asarray(scales, np.float32), self.replicated)
    clip, patch = clips.pop(), stream.patch

    def cut(images, labels, offsets, scales, rows):
      def one(r):
        start = (r[0], r[1], r[2], r[3])
        img = jax.lax.dynamic_slice(images, start, (1,) + patch)[0]
        lab = jax.lax.dynamic_slice(labels, start, (1,) + patch)[0]
        x = (img.astype(jnp.float32) - offsets[r[0]]) * scales[r[0]]
        return (jnp.clip(x, 0.0, 1.0) if clip else x)[..., None], lab.astype(jnp.int32)

      image, label = jax.vmap(one)(rows)
      return {"image": image, "label": label}

    self._cut = jax.jit(cut, out_shardings=self.sharded)

  @property
  def kind(self) -> str:
    return "device (3D, replicated)"

  def batch_at(self, batch_start: int) -> dict[str, jax.Array]:
    """The global batch at stream position `batch_start`: this process's records, cut by its
    devices into its rows of the batch (the rows `put_batch` gives its host stream)."""
    rows = self.stream.records(self.stream.local_positions(batch_start)).astype(np.int32)
    rows = jax.make_array_from_process_local_data(self.sharded, rows,
                                                  (self.stream.global_batch_size, 4))
    return self._cut(self.images, self.labels, self.offsets, self.scales, rows)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    out = self.batch_at(self.stream.position)
    self.stream.position += self.stream.global_batch_size
    return out

  @property
  def position(self) -> int:
    return self.stream.position

  def get_state(self) -> dict[str, Any]:
    return self.stream.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self.stream.set_state(state)

  def close(self) -> None:
    self.stream.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
