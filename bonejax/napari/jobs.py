"""What a widget's background job needs from bonejax: a progress count it can poll, a way to
cancel it, and bad input as one line.

`predict_volume(..., progress=JobProgress())` reports planes done through the same hook that
draws the command line's progress line; the widget polls `fraction()` from a Qt timer (no
signal crosses threads), and `cancel()` makes the next update raise `Cancelled` inside the
prediction, which then unwinds like any failure: scratch files removed, an output being written
under a temporary name removed, nothing left half-written.
"""

from __future__ import annotations

import threading

from bonejax.core import errors
from bonejax.core.progress import Progress


class Cancelled(Exception):
  """The user pressed Cancel."""


class JobProgress(Progress):
  """A silent Progress: counts for a GUI's bar; raises Cancelled once cancelled."""

  def __init__(self, desc: str = "predict", unit: str = "planes"):
    super().__init__(total=None, desc=desc, unit=unit)
    self._cancel = threading.Event()

  def update(self, n: int = 1, extra: str = "") -> None:
    self.n += n
    self.check()

  def close(self) -> None:
    pass

  def cancel(self) -> None:
    self._cancel.set()

  @property
  def cancelled(self) -> bool:
    return self._cancel.is_set()

  def check(self) -> None:
    if self._cancel.is_set():
      raise Cancelled("cancelled")

  def fraction(self) -> float:
    return min(1.0, self.n / self.total) if self.total else 0.0


def message(e: BaseException) -> str:
  """One line for the user: bad input as bonejax words it, anything else with its type."""
  if isinstance(e, errors.UserError):
    return errors.one_line(e)
  if isinstance(e, Cancelled):
    return "cancelled"
  return errors.io_error(e) or f"{type(e).__name__}: {errors.short_message(e)}"
