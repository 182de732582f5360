"""Scanco `.isq` volumes, read by the documented header layout (512-byte blocks; int16 voxels
after `(data offset + 1) * 512` bytes), memory-mapped so they stream. itk-ioscanco, the kept
reader, is used by the tests to write and cross-check files, not here: it reads whole volumes
only and crashes the process (SIGSEGV) on a damaged header instead of raising."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bonejax.core import errors
from bonejax.io import source, voxel

ISQ_MAGIC = b"CTDATA-HEADER_V1"
ISQ_INT16 = 3  # the header's data type code of signed 16-bit voxels, the only one ISQ uses


class IsqSource(source.IndexedSource):
  """A Scanco ISQ volume: int16 voxels, x fastest, after a header of 512-byte blocks.

  Header fields (little-endian int32 at byte offsets): 16 data type, 44/48/52 dimensions in
  voxels (x, y, z), 56/60/64 dimensions in um, 508 data offset in blocks (data begins at
  (offset + 1) * 512).
  """

  kind = "isq"
  described = "a Scanco ISQ file"
  suffixes = (".isq",)
  magic = (ISQ_MAGIC,)

  def __init__(self, path: Path, array: str = "image"):
    try:
      size = path.stat().st_size
      with open(path, "rb") as f:
        head = f.read(512)
    except OSError as e:
      raise errors.UserError(f"cannot read ISQ {str(path)!r}: {errors.one_line(e)}") from None
    bad = f"ISQ {str(path)!r} is damaged or not a Scanco ISQ file"
    if len(head) < 512 or head[:16] != ISQ_MAGIC:
      raise errors.UserError(f"{bad} (no {ISQ_MAGIC.decode()} header)")
    ints = np.frombuffer(head, "<i4")
    dtype_code, dims, dims_um, offset = int(ints[4]), ints[11:14], ints[14:17], int(ints[127])
    if dtype_code != ISQ_INT16:
      raise errors.UserError(f"{bad} (data type {dtype_code}; ISQ volumes are int16, type 3)")
    if (dims <= 0).any() or offset < 0:
      raise errors.UserError(f"{bad} (dimensions {dims.tolist()}, data offset {offset})")
    nx, ny, nz = (int(d) for d in dims)
    start, nbytes = (offset + 1) * 512, nx * ny * nz * 2
    if start + nbytes > size:
      raise errors.UserError(f"{bad}: truncated ({size} bytes; the header promises "
                          f"{nx} x {ny} x {nz} int16 voxels from byte {start})")
    mm = np.memmap(path, np.dtype("<i2"), "r", offset=start, shape=(nz, ny, nx))
    super().__init__(path, mm, array, f"ISQ {str(path)!r}", 1)
    self.voxel_size_um = (voxel.positive([dims_um[2] / nz, dims_um[1] / ny, dims_um[0] / nx])
                          if (dims_um > 0).all() else None)

  def close(self):
    source.close_memmap(self._arr)
