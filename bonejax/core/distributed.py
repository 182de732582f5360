"""Several processes as one job: `jax.distributed` from the command-line flags, and a process
group whose barriers fail with one line, never hang, when another process fails or dies.

`define_flags` declares the multi-host flags every command shares (`--coordinator_address
--num_processes --process_id`, or `--multihost` for cluster auto-detection) and `initialize` is
what they mean: the one definition of both (launch/train.py uses them).

`Group` serves jobs whose processes never meet inside XLA: multi-host prediction, where each
process predicts its own share of the planes into files on a shared filesystem and they meet
at barriers between the passes. Barriers, broadcasts and all-gathers go through the key-value
store of JAX's coordination service, polled, so a wait can also notice that another process
failed (it publishes its one-line error before leaving: `guard`) or died (its heartbeats
stopped: `get_live_nodes`), and gives up after `barrier_timeout_s` instead of waiting forever.

By default JAX's coordination service ends every process of a job with a fatal log as soon as
one of them dies or leaves early; `initialize(recoverable=True)` turns that off, so the others
can report it themselves. The service lives in process 0: if process 0 itself dies, the other
processes are still ended by JAX's client (they do not hang, but the message is JAX's). For the
same reason process 0 leaves last (`finish`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from typing import Any, Callable, Iterator

from bonejax.core import errors, jsonable

DEFAULT_BARRIER_TIMEOUT_S = 1800.0
DEFAULT_HEARTBEAT_TIMEOUT_S = 60
# Test hook: "I:NAME" makes process I kill itself (SIGKILL) on reaching the group operation
# NAME: how tests make a process die mid-run at a known point.
KILL_AT_ENV = "BONEJAX_TEST_KILL_AT"
_POLL_MAX_S = 0.05
_CHECK_EVERY_S = 0.5
# After a failure, how long process 0 waits for the others to notice it and leave (they check
# every slab); one still busy after that is ended by JAX when the service goes.
_LEAVE_AFTER_FAILURE_S = 60.0


def requested(coordinator_address: str | None, num_processes: int | None,
              process_id: int | None, multihost: bool) -> bool:
  """Whether the flags ask for several processes; a partial set of them is bad input."""
  given = [v for v in (coordinator_address, num_processes, process_id) if v is not None]
  if given and len(given) != 3:
    raise errors.UserError("multi-host needs all of --coordinator_address, --num_processes and "
                        "--process_id (or --multihost for auto-detection)")
  if given:
    if num_processes < 1:
      raise errors.UserError(f"--num_processes={num_processes} must be positive")
    if not 0 <= process_id < num_processes:
      raise errors.UserError(f"--process_id={process_id} not in [0, {num_processes})")
  return bool(given) or bool(multihost)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, multihost: bool = False, *,
               recoverable: bool = False, heartbeat_timeout_s: float | None = None,
               init_timeout_s: float | None = None) -> bool:
  """`jax.distributed.initialize` as the flags say; False (and nothing done) for one process.

  Must run before anything touches a JAX backend. `recoverable`: a process that dies or leaves
  does not end the others (see the module docstring). Returns True when initialised.
  """
  if not requested(coordinator_address, num_processes, process_id, multihost):
    return False
  import jax
  kw: dict[str, Any] = {}
  if heartbeat_timeout_s is not None:
    kw["heartbeat_timeout_seconds"] = max(1, int(heartbeat_timeout_s))
  if init_timeout_s is not None:
    kw["initialization_timeout"] = max(1, int(init_timeout_s))
  if recoverable:
    jax.config.update("jax_enable_recoverability", True)
  try:
    if coordinator_address is not None:
      jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                                 process_id=process_id, **kw)
    else:
      jax.distributed.initialize(**kw)
  except (RuntimeError, ValueError) as e:
    where = f" at {coordinator_address}" if coordinator_address else ""
    raise errors.UserError(f"cannot start the multi-process job{where}: "
                        f"{errors.short_message(e)}") from None
  return True


class Flags:
  """The multi-host absl flags of one command (`define_flags`)."""

  def __init__(self, flags_module: Any, module_name: str):
    f, m = flags_module, {"module_name": module_name}  # listed by the command's own --help
    self.coordinator_address = f.DEFINE_string(
        "coordinator_address", None, "host:port of process 0 (multi-host).", **m)
    self.num_processes = f.DEFINE_integer("num_processes", None,
                                          "Number of processes (multi-host).", **m)
    self.process_id = f.DEFINE_integer("process_id", None, "This process's index (multi-host).",
                                       **m)
    self.multihost = f.DEFINE_bool(
        "multihost", False, "Call jax.distributed.initialize() with cluster auto-detection "
        "(SLURM, Open MPI, GKE, Cloud TPU).", **m)

  def values(self) -> tuple[str | None, int | None, int | None, bool]:
    return (self.coordinator_address.value, self.num_processes.value, self.process_id.value,
            bool(self.multihost.value))

  def requested(self) -> bool:
    return requested(*self.values())

  def initialize(self, **kw: Any) -> bool:
    """`initialize` with these flags' values (keyword options as there)."""
    return initialize(*self.values(), **kw)


def define_flags(flags_module: Any = None) -> Flags:
  """Declares --coordinator_address, --num_processes, --process_id and --multihost (absl)."""
  if flags_module is None:
    from absl import flags as flags_module
  import sys
  caller = sys._getframe(1).f_globals.get("__name__", "__main__")
  # absl files a script's own flags under its path (what its --help lists).
  return Flags(flags_module, sys.argv[0] if caller == "__main__" else caller)


def _client() -> Any:
  from jax._src import distributed as jax_distributed  # the coordination client JAX holds
  return jax_distributed.global_state.client


class Group:
  """The processes of one job, or just this one (`size` 1: every operation is a no-op).

  Every process must call the same operations in the same order (each gets the next sequence
  number, so keys never collide). Waits raise `errors.UserError` naming the process that failed,
  died or is late.
  """

  def __init__(self, index: int = 0, size: int = 1, client: Any = None,
               barrier_timeout_s: float = DEFAULT_BARRIER_TIMEOUT_S,
               namespace: str = "bonejax"):
    self.index, self.size = int(index), int(size)
    self.client = client
    self.timeout_s = float(barrier_timeout_s)
    self.ns = namespace
    self._seq = 0
    self._last_check = 0.0
    self._failed_here = False
    self._others_gone = False

  @classmethod
  def from_jax(cls, barrier_timeout_s: float = DEFAULT_BARRIER_TIMEOUT_S,
               namespace: str = "bonejax") -> "Group":
    """The processes of the initialised `jax.distributed` job (one process when it is not)."""
    import jax
    client = _client()
    if client is None or jax.process_count() == 1:
      return cls()
    return cls(jax.process_index(), jax.process_count(), client, barrier_timeout_s, namespace)

  @property
  def is_main(self) -> bool:
    return self.index == 0

  def __repr__(self) -> str:
    return f"Group(index={self.index}, size={self.size})"

  # -- operations ------------------------------------------------------------------------------

  def _next(self, name: str) -> str:
    self._seq += 1
    spec = os.environ.get(KILL_AT_ENV, "")
    if spec and spec.split(":", 1) == [str(self.index), name]:
      os.kill(os.getpid(), signal.SIGKILL)
    return f"{self.ns}/op{self._seq}"

  def barrier(self, name: str) -> None:
    """Returns once every process has reached this barrier."""
    self.allgather(name, "")

  def allgather(self, name: str, value: str) -> list[str]:
    """Every process's `value`, in process order."""
    if self.size == 1:
      self._next(name)
      return [value]
    key = self._next(name)
    self.client.key_value_set(f"{key}/{self.index}", value)

    def ready():
      entries = dict(self.client.key_value_dir_get(f"{key}/"))
      got = {int(k.rsplit("/", 1)[1]): v for k, v in entries.items()}
      return [got[i] for i in range(self.size)] if len(got) == self.size else None

    def missing():
      entries = dict(self.client.key_value_dir_get(f"{key}/"))
      return sorted(set(range(self.size)) - {int(k.rsplit("/", 1)[1]) for k in entries})

    return self._wait(name, ready, missing)

  def broadcast(self, name: str, value: str | None = None) -> str:
    """Process 0's `value` (a string), in every process."""
    if self.size == 1:
      self._next(name)
      return value
    key = self._next(name)
    if self.is_main:
      self.client.key_value_set(f"{key}/value", value)
      return value

    def ready():
      try:
        return self.client.key_value_try_get(f"{key}/value")
      except Exception:  # pylint: disable=broad-except  # NOT_FOUND: not there yet
        return None

    return self._wait(name, ready, lambda: [0])

  def broadcast_json(self, name: str, value: Any = None) -> Any:
    """Process 0's JSON-able `value` (floats round-trip exactly)."""
    text = self.broadcast(name, json.dumps(jsonable.to_jsonable(value)) if self.is_main else None)
    return value if self.size == 1 else json.loads(text)

  # -- failures --------------------------------------------------------------------------------

  def _failures(self) -> dict[int, str]:
    entries = self.client.key_value_dir_get(f"{self.ns}/failed/")
    return {int(k.rsplit("/", 1)[1]): v for k, v in entries}

  def _dead(self) -> list[int]:
    """Processes whose heartbeats stopped (empty where the client cannot tell)."""
    try:
      live = self.client.get_live_nodes(list(range(self.size)))
    except Exception:  # pylint: disable=broad-except  # older clients; or the job is ending
      return []
    return sorted(set(range(self.size)) - {int(i) for i in live})

  def _raise_if_others_failed(self, during: str) -> None:
    failed = {i: m for i, m in self._failures().items() if i != self.index}
    if failed:
      i = min(failed)
      raise errors.UserError(f"process {i} of {self.size} failed ({during}): {failed[i]}")
    dead = [i for i in self._dead() if i != self.index]
    if dead:
      raise errors.UserError(f"process {', '.join(map(str, dead))} of {self.size} stopped "
                          f"responding (killed or crashed?) during {during}")

  def check(self, during: str = "the run") -> None:
    """Raises if another process has failed or died (at most every half second; cheap)."""
    if self.size == 1:
      return
    now = time.monotonic()
    if now - self._last_check < _CHECK_EVERY_S:
      return
    self._last_check = now
    self._raise_if_others_failed(during)

  def _wait(self, name: str, ready: Callable[[], Any], missing: Callable[[], list[int]]) -> Any:
    start = time.monotonic()
    delay, last_check = 0.001, start
    while True:
      got = ready()
      if got is not None:
        return got
      now = time.monotonic()
      if now - last_check >= _CHECK_EVERY_S:
        last_check = now
        try:
          self._raise_if_others_failed(f"'{name}'")
        except errors.UserError:
          # A peer may have published its part and then failed or left (its heartbeats stop
          # once it exits) between `ready()` above and this check: the operation completed,
          # and a real failure shows at the next operation.
          got = ready()
          if got is not None:
            return got
          raise
      if now - start > self.timeout_s:
        got = ready()  # the last part may have come while this loop slept
        if got is not None:
          return got
        late = ", ".join(map(str, missing())) or "?"
        raise errors.UserError(f"process {late} of {self.size} did not reach '{name}' within "
                            f"{self.timeout_s:g} s (--barrier_timeout_s); is it stuck?")
      time.sleep(delay)
      delay = min(_POLL_MAX_S, delay * 2)

  def fail(self, message: str) -> None:
    """Tells the other processes that this one failed, and why (one line)."""
    if self.size == 1 or self._failed_here:
      return
    self._failed_here = True
    with contextlib.suppress(Exception):
      self.client.key_value_set(f"{self.ns}/failed/{self.index}", " ".join(message.split()),
                                allow_overwrite=True)

  # -- the end ---------------------------------------------------------------------------------

  def _wait_others_gone(self, timeout_s: float) -> None:
    """Process 0 (which hosts the coordination service) waits for the others to disconnect:
    leaving first would end them with JAX's fatal error."""
    if self._others_gone:
      return
    deadline = time.monotonic() + timeout_s
    others = set(range(1, self.size))
    while time.monotonic() < deadline:
      try:
        live = {int(i) for i in self.client.get_live_nodes(list(range(self.size)))}
      except Exception:  # pylint: disable=broad-except  # no liveness query: use the notes
        left = {int(k.rsplit("/", 1)[1]) for k, _ in
                self.client.key_value_dir_get(f"{self.ns}/left/")}
        if others <= left:
          time.sleep(1.0)  # their disconnect follows the note at once
          self._others_gone = True
          return
      else:
        if not others & live:
          self._others_gone = True
          return
      time.sleep(0.05)

  def finish(self) -> None:
    """The orderly end of a job: the others disconnect, then process 0 (see the docstring)."""
    if self.size == 1 or self.client is None:
      return
    import jax
    if self.is_main:
      self._wait_others_gone(min(self.timeout_s, _LEAVE_AFTER_FAILURE_S) if self._failed_here
                             else self.timeout_s)
    else:
      with contextlib.suppress(Exception):
        self.client.key_value_set(f"{self.ns}/left/{self.index}", "1", allow_overwrite=True)
    with contextlib.suppress(Exception):
      jax.distributed.shutdown()
    self.client = None

  @contextlib.contextmanager
  def on_error(self) -> Iterator["Group"]:
    """On any error in the block: tell the others (one line) and, in process 0, wait for them
    to leave before the error goes on (and the shared files are cleaned up)."""
    try:
      yield self
    except BaseException as e:
      self.fail(_message(e))
      if self.is_main and self.size > 1 and self.client is not None:
        self._wait_others_gone(min(self.timeout_s, _LEAVE_AFTER_FAILURE_S))
      raise

  @contextlib.contextmanager
  def guard(self) -> Iterator["Group"]:
    """The whole job: `on_error`, then the orderly end (`finish`), failed or not."""
    try:
      with self.on_error():
        yield self
    finally:
      self.finish()


def _message(e: BaseException) -> str:
  if isinstance(e, errors.UserError):
    return str(e)
  if isinstance(e, KeyboardInterrupt):
    return "interrupted"
  if isinstance(e, SystemExit):
    return f"exited with status {e.code}"
  return errors.io_error(e) or f"{type(e).__name__}: {errors.short_message(e)}"


SINGLE = Group()  # this process alone
