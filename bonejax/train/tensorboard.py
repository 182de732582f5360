"""TensorBoard event files without TensorFlow: scalars written beside metrics.csv.

Neither `tensorboard` nor `tensorboardX` is a dependency (and neither is installed with
bonejax), so this writes the format itself: a TFRecord file (each record: length, masked CRC-32C
of the length, the bytes, masked CRC-32C of the bytes) of `Event` protocol buffers, encoded by
hand (the few fields scalars need: wall_time, step, file_version, summary.value{tag,
simple_value}, session_log.status). TensorBoard reads WORKDIR/tensorboard/ as one run:

    tensorboard --logdir WORKDIR/tensorboard

A resumed run opens a new file and first writes a SessionLog START at the step it resumed from:
TensorBoard then drops the earlier file's points after that step (what the killed run logged
after its last checkpoint), as metrics.csv is cut back.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path
from typing import Any, Mapping

_CRC_TABLE: list[int] = []


def _crc_table() -> list[int]:
  if not _CRC_TABLE:
    for i in range(256):  # CRC-32C (Castagnoli), reflected polynomial
      c = i
      for _ in range(8):
        c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
      _CRC_TABLE.append(c)
  return _CRC_TABLE


def crc32c(data: bytes) -> int:
  table, c = _crc_table(), 0xFFFFFFFF
  for b in data:
    c = table[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
  """One TFRecord: the framing TensorBoard's reader checks."""
  n = struct.pack("<Q", len(data))
  return n + struct.pack("<I", _masked(n)) + data + struct.pack("<I", _masked(data))


# -- protocol buffer wire format: just what Event needs -----------------------------------------

def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # negative int64 as two's complement, as protobuf encodes it
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _key(field: int, wire: int) -> bytes:
  return _varint(field << 3 | wire)


def _bytes_field(field: int, data: bytes) -> bytes:
  return _key(field, 2) + _varint(len(data)) + data


def event(step: int, wall_time: float, *, scalars: Mapping[str, float] | None = None,
          file_version: str | None = None, session_start: bool = False) -> bytes:
  """An encoded tensorflow.Event (wall_time=1, step=2, file_version=3, summary=5,
  session_log=7); Summary.Value: tag=1, simple_value=2; SessionLog: status=1 (START = 1)."""
  out = _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(int(step))
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if scalars:
    values = b"".join(
        _bytes_field(1, _bytes_field(1, tag.encode()) + _key(2, 5) + struct.pack("<f", v))
        for tag, v in scalars.items())
    out += _bytes_field(5, values)
  if session_start:
    out += _bytes_field(7, _key(1, 0) + _varint(1))
  return out


class Writer:
  """Appends scalar events to DIR/events.out.tfevents.TIME.HOST.PID (flushed per write)."""

  def __init__(self, directory: str | os.PathLike, resume_step: int | None = None,
               enabled: bool = True):
    self.enabled = enabled
    self.path = None
    if not enabled:
      return
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = time.time()
    self.path = d / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
    self._write(event(0, now, file_version="brain.Event:2"))
    if resume_step is not None:
      self._write(event(resume_step, now, session_start=True))

  def _write(self, data: bytes) -> None:
    with open(self.path, "ab") as f:
      f.write(record(data))

  def scalars(self, step: int, values: Mapping[str, Any]) -> None:
    """Writes the finite numbers of `values` (tags as given) at `step`."""
    if not self.enabled:
      return
    good = {}
    for k, v in values.items():
      try:
        f = float(v)
      except (TypeError, ValueError):
        continue
      if f == f and abs(f) != float("inf"):
        good[k] = f
    if good:
      self._write(event(step, time.time(), scalars=good))
