"""A clean stop on SIGINT / SIGTERM: finish the step, write a checkpoint, exit 0.

The first signal only sets a flag; the training loop reads it after each step, writes a
checkpoint at that step and returns its usual result with `"stopped": "signal"`, so Ctrl-C, a
napari Stop button or a scheduler's SIGTERM cost no work and the same command resumes exactly
there. A second signal aborts at once (KeyboardInterrupt: exit 130), for a stop that hangs.

Several processes must stop at the same step (the others would wait in the next collective):
there the flag is combined over all of them every `log_every` steps (`should_stop`), and every
process stops at the first such step after any of them was signalled.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

import numpy as np

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
  """Set by the first SIGINT / SIGTERM while `installed()`; `name` is the signal's."""

  def __init__(self):
    self.name: str | None = None
    self.active = False  # handlers installed: only then do processes compare flags

  @property
  def requested(self) -> bool:
    return self.name is not None

  def _handle(self, signum, frame) -> None:
    del frame
    if self.name is not None:
      raise KeyboardInterrupt  # the second signal: abort now
    self.name = signal.Signals(signum).name

  @contextlib.contextmanager
  def installed(self, enabled: bool = True) -> Iterator["StopRequest"]:
    """Handles the signals inside the block (main thread only: Python's rule), then restores
    the previous handlers."""
    if not enabled or threading.current_thread() is not threading.main_thread():
      yield self
      return
    previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
    self.active = True
    try:
      yield self
    finally:
      self.active = False
      for s, h in previous.items():
        signal.signal(s, h)

  def should_stop(self, step: int, every: int, processes: int) -> bool:
    """Whether to stop after `step`: this process's flag, or with several processes, any
    process's flag at steps that are multiples of `every` (all processes ask at the same
    steps)."""
    if processes <= 1 or not self.active:
      return self.requested
    if step % max(1, every):
      return False
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))
