"""What a widget's background job needs from bonejax: a progress count it can poll, a way to
cancel it, and bad input as one line.

`predict_volume(..., progress=JobProgress())` reports planes done through the same hook that
draws the command line's progress line; the widget polls `fraction()` and `text()` from a Qt
timer (no signal crosses threads), and `cancel()` makes the next update raise `Cancelled`
inside the prediction, which then unwinds like any failure: scratch files removed, an output
being written under a temporary name removed, nothing left half-written.

Before the first plane is done (loading the model, reading, compiling) there is no fraction to
show: the job names its `phase`, and the widget shows a busy bar with that name. The rate and
the ETA, as the command line prints them, count from the first plane done, so the time spent
compiling does not make the rate look low.
"""

from __future__ import annotations

import threading
import time

from bonejax.core import errors
from bonejax.core.progress import Progress, format_seconds


class Cancelled(Exception):
  """The user pressed Cancel."""


class JobProgress(Progress):
  """A silent Progress: counts for a GUI's bar; raises Cancelled once cancelled."""

  def __init__(self, desc: str = "predict", unit: str = "planes"):
    super().__init__(total=None, desc=desc, unit=unit)
    self._cancel = threading.Event()
    self.phase = "starting"
    self._first: tuple[float, int] | None = None  # (time, count) at the first update

  def set_phase(self, phase: str) -> None:
    """What the job does before (or after) counting planes: shown on the busy bar."""
    self.phase = phase
    self.check()

  def update(self, n: int = 1, extra: str = "") -> None:
    if self._first is None:
      self._first = (time.perf_counter(), self.n + n)
      self.phase = self.desc
    self.n += n
    self.check()

  def counting(self) -> bool:
    """Whether planes are being counted (the bar can show a fraction)."""
    return bool(self.total) and self.n > 0

  def rate(self) -> float:
    """Units a second since the first update (0 until a second one)."""
    if self._first is None:
      return 0.0
    dt = time.perf_counter() - self._first[0]
    return (self.n - self._first[1]) / dt if dt > 0 else 0.0

  def text(self) -> str:
    """The bar's words: the phase while busy, else count, rate and ETA as the CLI's line."""
    if not self.counting():
      return f"{self.phase}…"
    rate = self.rate()
    out = f"{self.desc} {self.n}/{self.total} {self.unit}"
    if rate > 0:
      out += f" · {rate:.3g} {self.unit}/s · eta {format_seconds((self.total - self.n) / rate)}"
    return out

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
