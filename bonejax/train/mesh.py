"""The device mesh and how host batches become global, sharded arrays.

One mesh axis, 'data': batches are split over it (NamedSharding P('data')), parameters and
optimiser state are replicated (P()). Under `jit` the model then runs data-parallel and every
batch reduction (the loss, BatchNorm statistics, confusion matrices) is global, with XLA inserting
the all-reduces. The same code runs on one CPU, 8 GPUs or several hosts.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from bonejax.core import errors


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D 'data' mesh over `devices` (all devices of all processes by default)."""
  if devices is None:
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
  return jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,),
                       devices=list(devices))


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "batch_size") -> None:
  n = mesh.devices.size
  if global_batch < 1 or global_batch % n:
    raise errors.UserError(f"{what}={global_batch} is not a positive multiple of the {n} devices "
                        f"({jax.process_count()} process(es)); use e.g. {what}="
                        f"{max(n, (max(global_batch, 1) + n - 1) // n * n)}")
  if global_batch % jax.process_count():
    raise errors.UserError(f"{what}={global_batch} is not a multiple of the "
                        f"{jax.process_count()} processes")


def put_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding,
              global_batch: int) -> dict[str, jax.Array]:
  """This process's rows of a global batch -> global arrays sharded on the leading axis.

  The only host->device transfer of the step. Works unchanged on one host and on many: each
  process passes its own `global_batch / process_count` rows.
  """
  return {k: jax.make_array_from_process_local_data(sharding, v,
                                                    (global_batch,) + tuple(v.shape[1:]))
          for k, v in batch.items()}


def local_rows(batch: Mapping[str, np.ndarray], global_batch: int) -> dict[str, np.ndarray]:
  """This process's slice of a batch every process holds in full (validation batches)."""
  n = global_batch // jax.process_count()
  lo = jax.process_index() * n
  return {k: v[lo:lo + n] for k, v in batch.items()}
