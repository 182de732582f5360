"""Progress on long work: a periodic stderr line with count, rate and ETA."""

from __future__ import annotations

import sys
import time
from typing import Iterable


class Progress:
  """A periodic stderr line with count, rate and ETA; quiet enough for logs and CI.

  Use as `for x in Progress(items, total=n, desc="predict", unit="planes")` or call `update`.
  """

  def __init__(self, iterable: Iterable | None = None, total: int | None = None,
               desc: str = "", unit: str = "it", every_s: float = 5.0,
               stream=None):
    self.iterable = iterable
    self.total = total if total is not None else (
        len(iterable) if hasattr(iterable, "__len__") else None)
    self.desc, self.unit, self.every_s = desc, unit, every_s
    self.stream = stream if stream is not None else sys.stderr
    self.n = 0
    self.start = time.perf_counter()
    self._last = self.start

  def __iter__(self):
    for item in self.iterable:
      yield item
      self.update(1)
    self.close()

  def rate(self) -> float:
    dt = time.perf_counter() - self.start
    return self.n / dt if dt > 0 else 0.0

  def line(self) -> str:
    rate = self.rate()
    done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
    eta = ""
    if self.total and rate > 0:
      eta = f" eta {format_seconds((self.total - self.n) / rate)}"
    elapsed = format_seconds(time.perf_counter() - self.start)
    return f"[{self.desc}] {done} {self.unit} {rate:.3g} {self.unit}/s elapsed {elapsed}{eta}"

  def update(self, n: int = 1, extra: str = "") -> None:
    self.n += n
    now = time.perf_counter()
    if now - self._last >= self.every_s:
      self._last = now
      print(self.line() + (f" {extra}" if extra else ""), file=self.stream, flush=True)

  def close(self) -> None:
    print(self.line() + " done", file=self.stream, flush=True)


def format_seconds(s: float) -> str:
  s = int(round(s))
  h, rem = divmod(s, 3600)
  m, sec = divmod(rem, 60)
  return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"
