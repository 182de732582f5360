"""Training checkpoints: orbax CheckpointManager over DIR/STEP/{state,host}.

- `state`: a device pytree (the train state: params, BatchNorm statistics, optimiser state, step;
  or the best model's params and statistics), saved with StandardSave. orbax copies every array
  to the host before `save` returns (its default transfer priority is SYNCHRONOUS) and writes the
  files in the background, so the train step may donate and overwrite those buffers right after
  `save` returns.
- `host`: JSON (data-iterator position, plateau scheduler, best metric, early-stopping counter,
  seed, step; or the best model's step, scores and id): everything else a resume needs.

A step directory appears under its final name only when complete (orbax writes to a temporary
name and renames), so a run killed mid-save resumes from the previous checkpoint. A complete step
can still be damaged later (a truncated or overwritten file, a full disk): `restore_newest`
then warns, moves the damaged step aside to DIR.corrupt/ (kept for inspection, out of the
manager's way) and falls back to the newest step that reads.

Only damage does that (`is_damage`: undecodable JSON or data, a missing file, a checksum or
decompression error). A device out of memory, a transient I/O error (a timeout, an unavailable
or busy filesystem, EIO) or a permission problem is raised as it is and nothing moves: a good
newest step must never be set aside. With several processes, each reports how its read went,
process 0 decides for all (any other error: stop; any damage: fall back; else resume) and
broadcasts the decision, so every process resumes from the same step or stops together.
"""

from __future__ import annotations

import copy
import errno
import json
import re
import struct
import sys
import uuid
import zlib
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from bonejax.core import errors
from bonejax.models import bundle

STATE, HOST = "state", "host"


class Mismatch(errors.UserError):
  """A checkpoint that reads, but belongs to another configuration."""


# Errors that say nothing about the files: retry later, free memory, fix permissions.
_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ENOMEM, errno.EIO,
                     errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ESTALE,
                     errno.EBUSY, errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS,
                     errno.EMFILE, errno.ENFILE, errno.EHOSTUNREACH, errno.ENETUNREACH}
_TRANSIENT_TEXT = ("RESOURCE_EXHAUSTED", "out of memory", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                   "CANCELLED", "ABORTED", "PERMISSION_DENIED", "timed out",
                   "Resource temporarily unavailable", "Too many open files")
# What a damaged step raises: bad JSON, bad or short data, a missing file.
_DAMAGE_TYPES = (ValueError, KeyError, IndexError, EOFError, FileNotFoundError,
                 NotADirectoryError, IsADirectoryError, zlib.error, struct.error)
_DAMAGE_TEXT = ("DATA_LOSS", "corrupt", "truncat", "checksum", "decod", "Unexpected end",
                "unexpected end", "NOT_FOUND", "INVALID_ARGUMENT", "FAILED_PRECONDITION",
                "OUT_OF_RANGE")
_OK, _DAMAGE, _STOP = 0, 1, 2


def _chain(e: BaseException) -> list[BaseException]:
  out, seen = [], set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    out.append(e)
    e = e.__cause__ or e.__context__
  return out


def is_damage(e: BaseException) -> bool:
  """Whether reading a step failed because its files are damaged (then an older step may be
  resumed and this one set aside), not for a reason of the moment (memory, I/O, permissions)."""
  chain = _chain(e)
  for x in chain:
    if isinstance(x, (MemoryError, KeyboardInterrupt, SystemExit)):
      return False
    if isinstance(x, OSError) and x.errno in _TRANSIENT_ERRNOS:
      return False
    if any(t.lower() in str(x).lower() for t in _TRANSIENT_TEXT):
      return False
  return any(isinstance(x, _DAMAGE_TYPES) or any(t in str(x) for t in _DAMAGE_TEXT)
             for x in chain)


def _reason(e: BaseException) -> str:
  """bundle.reason without the reprs of bound methods some bindings put in their messages."""
  text = re.sub(r"<bound method (?:[^<>]|<[^<>]*>)*>", "", bundle.reason(e))
  return re.sub(r"\s{2,}", " ", text).strip()


def _agree(code: int) -> int:
  """Process 0's decision from every process's outcome code (the highest), broadcast."""
  if jax.process_count() == 1:
    return code
  from jax.experimental import multihost_utils
  codes = np.asarray(multihost_utils.process_allgather(np.int32(code)))
  decision = np.int32(codes.max()) if jax.process_index() == 0 else np.int32(0)
  return int(multihost_utils.broadcast_one_to_all(decision))


class Checkpoints:

  def __init__(self, directory: str | Path, keep: int = 2, async_save: bool = True):
    self.directory = Path(directory).absolute()
    self.keep = max(1, int(keep))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self.keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=(STATE, HOST))

  def steps(self) -> list[int]:
    return sorted(int(s) for s in self.manager.all_steps())

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

  def read_host(self, step: int) -> dict[str, Any]:
    """The JSON item of a step, read directly (no arrays touched)."""
    path = self.directory / str(step) / HOST / "metadata"
    host = json.loads(path.read_text())
    if not isinstance(host, dict):
      raise ValueError(f"{path} holds a JSON {type(host).__name__}, not an object")
    return host

  def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
    """Restores into the structure, dtypes and shardings of `like` (arrays or ShapeDtypeStructs).

    Raises Mismatch when the stored arrays have other paths or shapes than `like`; anything
    else a damaged step raises is passed on (see restore_newest).
    """
    bundle.quiet_closed_loop_noise()
    host = self.read_host(step)
    why = bundle.shape_mismatch(
        bundle.tree_shapes(bundle.stored_arrays(self.directory / str(step) / STATE)),
        bundle.tree_shapes(like))
    if why:
      raise Mismatch(f"checkpoint {self.directory / str(step)} does not fit this configuration "
                     f"(another model or optimiser?): {why}; use a fresh --workdir")
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    out = self.manager.restore(int(step), args=ocp.args.Composite(
        **{STATE: ocp.args.StandardRestore(abstract)}))
    return out[STATE], host

  def restore_newest(self, like: Any, check: Callable[[dict[str, Any]], None] | None = None
                     ) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, host) of the newest step that reads; None when there is no step.

    `check(host)` runs on each candidate's JSON before its arrays are read and may raise a
    UserError (a run with another configuration): that, and a Mismatch, end the search. A
    damaged step (`is_damage`) is reported with a warning, and moved aside once an older one has
    restored; when none reads, one line names the newest. Any other error ends the search as it
    is. With several processes every one takes process 0's decision (see the module docstring).
    """
    bad: list[tuple[int, str]] = []
    for step in reversed(self.steps()):
      try:
        if check is not None:
          check(self.read_host(step))
        state, host = self.restore(step, like)
        outcome, error = _OK, None
      except Exception as e:  # pylint: disable=broad-except  (sorted below)
        error = e
        outcome = _DAMAGE if is_damage(e) and not isinstance(e, errors.UserError) else _STOP
      decision = _agree(outcome)
      if decision == _OK:
        self._set_aside([s for s, _ in bad])
        return step, state, host
      if decision == _STOP:
        if error is None or outcome != _STOP:
          raise errors.UserError(f"another process could not read checkpoint "
                                 f"{self.directory / str(step)} (see its message); nothing "
                                 "was moved aside") from None
        if not isinstance(error, errors.UserError):
          print(f"[checkpoint] reading {self.directory / str(step)} failed ({_reason(error)}); "
                "that is not damage, so nothing was moved aside: rerun once it is resolved",
                file=sys.stderr, flush=True)
        raise error
      reason = _reason(error) if error is not None else "unreadable on another process"
      bad.append((step, reason))
      print(f"[checkpoint] warning: {self.directory / str(step)} is unreadable ({reason}); "
            "trying the previous checkpoint", file=sys.stderr, flush=True)
    if bad:
      step, reason = bad[0]
      raise errors.UserError(f"no readable checkpoint in {self.directory}: the newest, "
                             f"{self.directory / str(step)}, fails with: {reason}; move it away "
                             "to resume from an older one, or use a fresh --workdir")
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Moves damaged steps to DIR.corrupt/STEP-ID so a resumed run can save those steps anew."""
    if not steps:
      return
    if jax.process_count() > 1:  # every process has finished reading before one renames
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("bonejax_checkpoint_fallback")
    if jax.process_index() == 0:
      aside = self.directory.with_name(self.directory.name + ".corrupt")
      aside.mkdir(exist_ok=True)
      for step in steps:
        target = aside / f"{step}-{uuid.uuid4().hex[:8]}"
        (self.directory / str(step)).rename(target)
        print(f"[checkpoint] moved the unreadable step {step} to {target}", file=sys.stderr,
              flush=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("bonejax_checkpoint_fallback_done")
    self.manager.reload()

  def delete(self, step: int) -> None:
    self.manager.delete(int(step))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def read_state(path: str | Path, like: Any = None) -> Any:
  """The numpy pytree of one saved state item (DIR/STEP/state), read by this process alone.

  Into the structure of `like` (ShapeDtypeStructs), or the stored one (plain dicts); onto one
  local device, whatever devices or processes wrote it. No other process takes part (process 0
  exports the best model from it while the others train on).
  """
  bundle.quiet_closed_loop_noise()
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if like is None:
    like = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local),
                        bundle.stored_arrays(path))
  handler = ocp.StandardCheckpointHandler(multiprocessing_options=bundle.this_process_only())
  try:
    state = handler.restore(Path(path).absolute(), args=ocp.args.StandardRestore(like))
  finally:
    handler.close()
  return jax.tree.map(np.asarray, state)


def load_state(workdir: str | Path, step: int | None = None,
               directory: str = "checkpoints") -> tuple[int, dict[str, Any]]:
  """(step, numpy pytree of the saved train state) of a run: for tests and tools."""
  root = Path(workdir).absolute() / directory
  mgr = ocp.CheckpointManager(root, item_names=(STATE, HOST),
                              options=ocp.CheckpointManagerOptions(read_only=True))
  step = mgr.latest_step() if step is None else step
  mgr.close()
  if step is None:
    raise errors.UserError(f"no checkpoint in {root}")
  return int(step), read_state(root / str(step) / STATE)
