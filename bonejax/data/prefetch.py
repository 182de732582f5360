"""The iteration, prefetch and state machinery shared by the 2D and 3D patch streams.

A stream is a pure function of its position: `batch_at(start)` reads the host's share of the
global batch that starts at stream position `start` (`records`, `local_positions` and
`read_batch` are the stream's own). Iterating submits the next `prefetch + 1` batches to a
producer thread, so reading overlaps the training step; `get_state` / `set_state` save and
restore the position alone, and a restore cancels batches prefetched for the old position.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np


class PrefetchedStream:
  """Mixin: needs `_lock`, `_pending` (a deque of (start, future)), `_producer` and `_pool`
  (executors), `position`, `prefetch`, `global_batch_size`, `records_per_epoch`, `seed`, and
  the methods `records`, `local_positions`, `read_batch`."""

  def batch_at(self, batch_start: int) -> dict[str, np.ndarray]:
    """This host's share of the global batch starting at stream position `batch_start`."""
    return self.read_batch(self.records(self.local_positions(batch_start)))

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    with self._lock:
      want = self.position
      while self._pending and self._pending[0][0] != want:  # stale after set_state
        self._pending.popleft()[1].cancel()
      last = self._pending[-1][0] if self._pending else want - self.global_batch_size
      while len(self._pending) < self.prefetch + 1:
        last += self.global_batch_size
        self._pending.append((last, self._producer.submit(self.batch_at, last)))
      _, fut = self._pending.popleft()
      self.position += self.global_batch_size
    return fut.result()

  @property
  def epoch(self) -> int:
    return self.position // self.records_per_epoch

  def get_state(self) -> dict[str, int]:
    """JSON-able; `position` alone determines what follows."""
    return {"position": int(self.position), "epoch": int(self.epoch), "seed": self.seed,
            "records_per_epoch": int(self.records_per_epoch)}

  def set_state(self, state: dict[str, Any]) -> None:
    with self._lock:
      self.position = int(state["position"])
      while self._pending:
        self._pending.popleft()[1].cancel()

  def close(self) -> None:
    with self._lock:
      while self._pending:
        self._pending.popleft()[1].cancel()
    self._producer.shutdown(wait=True)
    self._pool.shutdown(wait=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
