"""SIGTERM (what job schedulers and `kill` send) handled as Ctrl-C.

Python ends a process on SIGTERM at once: no `finally`, no clean-up, exit 143 without a word,
and a command's temporaries, locks and scratch directories stay behind. Inside
`sigterm_as_interrupt()` SIGTERM raises `Terminated` (a KeyboardInterrupt) in the main thread
instead, so the same clean-up as Ctrl-C runs and the command ends with its one line.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Terminated(KeyboardInterrupt):
  """Raised by SIGTERM inside `sigterm_as_interrupt`."""


def _raise(signum, frame):
  del signum, frame
  raise Terminated("terminated (SIGTERM)")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
  """SIGTERM raises `Terminated` in the block (main thread only; elsewhere a no-op)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = signal.signal(signal.SIGTERM, _raise)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
