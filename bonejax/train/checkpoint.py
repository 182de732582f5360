"""Training checkpoints: orbax CheckpointManager over WORKDIR/checkpoints/STEP/{state,host}.

- `state`: the device pytree (params, BatchNorm statistics, optimiser state, step), saved with
  StandardSave. orbax copies every array to the host before `save` returns (its default
  transfer priority is SYNCHRONOUS) and writes the files in the background, so the train step may
  donate and overwrite those buffers right after `save` returns.
- `host`: JSON (data-iterator position, plateau scheduler, best metric, early-stopping counter,
  seed, step): everything else an exact resume needs.

A step directory appears under its final name only when complete (orbax writes to a temporary
name and renames), so a run killed mid-save resumes from the previous checkpoint.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from bonejax import cli

STATE, HOST = "state", "host"


class Checkpoints:

  def __init__(self, directory: str | Path, keep: int = 2, async_save: bool = True):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(1, int(keep)), create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=(STATE, HOST))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, host: dict[str, Any]) -> bool:
    """Starts an async save; returns once the arrays are on the host (safe to donate them)."""
    if step in self.manager.all_steps():
      return False
    # The JSON is written in the background too: hand orbax its own copy.
    return self.manager.save(int(step), args=ocp.args.Composite(
        **{STATE: ocp.args.StandardSave(state), HOST: ocp.args.JsonSave(copy.deepcopy(host))}),
        force=True)

  def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
    """Restores into the structure, dtypes and shardings of `like` (arrays or ShapeDtypeStructs)."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    try:
      out = self.manager.restore(int(step), args=ocp.args.Composite(
          **{STATE: ocp.args.StandardRestore(abstract), HOST: ocp.args.JsonRestore()}))
    except (ValueError, KeyError, TypeError) as e:
      raise cli.UserError(
          f"checkpoint {self.directory / str(step)} does not fit this configuration (another "
          f"model or optimiser?): {cli._one_line(e)[:300]}; use a fresh --workdir") from None
    return out[STATE], out[HOST]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def load_state(workdir: str | Path, step: int | None = None) -> tuple[int, dict[str, Any]]:
  """(step, numpy pytree of the saved train state) of a run: for tests and tools."""
  directory = Path(workdir).absolute() / "checkpoints"
  mgr = ocp.CheckpointManager(directory, item_names=(STATE, HOST),
                              options=ocp.CheckpointManagerOptions(read_only=True))
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise cli.UserError(f"no checkpoint in {directory}")
  mgr.close()
  path = directory / str(step) / STATE
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    # Onto one local device, whatever devices or processes wrote it.
    like = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local),
                        ckptr.metadata(path).item_metadata.tree)
    state = ckptr.restore(path, like)
  return int(step), jax.tree.map(np.asarray, state)
