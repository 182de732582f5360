"""The training input, host or device path, as `config.sampler` says.

- "host": patches.PatchStream reads and normalises the crops on the CPU (about 1,000 patches/s
  per core) and each batch is copied to the devices: for scans of any size.
- "device": device_sampler.DeviceSampler keeps the scans in device memory and cuts the crops
  there; a step moves only 5 integers per patch. Refused, in one line naming the sizes, when the
  scans do not fit the per-device budget (`sampler_device_mb`, default half the device memory).
- "auto" (the default): the device path when the scans fit, else the host path with one
  `warning:` line. Running out of memory while loading them counts as not fitting (in a
  single-process run; with several processes it is an error, since all must take one path).

Both give the same batches for a seed (device_sampler.py says why), so the choice changes speed,
never the run, and a run may resume under the other path. Either way the trainer sees one
interface: `next(feed)` -> global device arrays sharded over 'data', `get_state` / `set_state`
(one position), `close`, and `kind` for its result.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from bonejax.core import errors
from bonejax.data import device_sampler, patches

SAMPLERS = ("auto", "device", "host")


class HostFeed:
  """PatchStream batches, each placed on the devices by `put` (the trainer's put_batch)."""

  kind = "host"

  def __init__(self, stream: patches.PatchStream,
               put: Callable[[Mapping[str, np.ndarray]], dict[str, jax.Array]]):
    self.stream, self.put = stream, put

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    return self.put(next(self.stream))

  def get_state(self) -> dict[str, int]:
    return self.stream.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self.stream.set_state(state)

  def close(self) -> None:
    self.stream.close()


def make_feed(sampler: str, stream: patches.PatchStream, mesh: Mesh,
              put: Callable[[Mapping[str, np.ndarray]], dict[str, jax.Array]], *,
              budget_mb: int = 0):
  """The feed `sampler` asks for over `stream`'s records (it takes ownership of `stream`)."""
  if sampler not in SAMPLERS:
    raise errors.UserError(f"sampler={sampler!r}; known: {', '.join(SAMPLERS)}")
  if sampler == "host":
    return HostFeed(stream, put)
  layout = device_sampler.plan([s.shape for s in stream.scans],
                               [s.scan.dtype for s in stream.scans], mesh,
                               device_sampler.device_budget(list(mesh.devices.flat), budget_mb))
  why = layout.describe()
  if layout.fits:
    try:
      return device_sampler.DeviceSampler(stream, mesh, layout)
    except (MemoryError, jax.errors.JaxRuntimeError) as e:
      # The budget is an estimate: other users of the memory can leave less. One process may
      # change its path alone only when it is the only one (the others would wait on it).
      if jax.process_count() > 1 or not (isinstance(e, MemoryError) or
                                         "RESOURCE_EXHAUSTED" in str(e)):
        stream.close()
        raise
      why = f"{why}, but loading it ran out of memory ({errors.one_line(str(e))[:200]})"
    except BaseException:  # a damaged chunk or a bad label value while loading
      stream.close()
      raise
  if sampler == "device":
    stream.close()
    raise errors.UserError(f"sampler=device: {why}; set sampler=host or auto, or a larger "
                        "sampler_device_mb")
  errors.warn(f"sampler=auto: {why}; training from the host patch stream")
  return HostFeed(stream, put)
