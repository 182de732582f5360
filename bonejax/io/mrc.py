"""MRC / CCP4 maps and tomograms (mrcfile, memory-mapped): real-valued modes 0, 1, 2, 6, 12;
the voxel size from the header (Angstrom, (x, y, z))."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from bonejax.core import errors
from bonejax.io import source, voxel

MRC_SUFFIXES = (".mrc", ".mrcs", ".rec", ".st", ".ali", ".map")

MRC_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}


def _check_dimensions(mrc, path: Path, mode: int) -> None:
  """Refuses a header whose dimensions are not positive or need more data than the file holds
  (mrcfile, permissive, then gives no data at all, which would read as a wrong mode)."""
  h = mrc.header
  dims = (int(h.nz), int(h.ny), int(h.nx))
  if min(dims) <= 0:
    raise errors.UserError(f"MRC {str(path)!r}: its header gives dimensions (Z, Y, X) = {dims}; "
                           f"they must be positive (a damaged file or not an MRC file)")
  if mode not in MRC_MODES:
    return
  need = math.prod(dims) * np.dtype(MRC_MODES[mode]).itemsize
  have = os.path.getsize(path) - 1024 - max(0, int(h.nsymbt))
  if need > have:
    raise errors.UserError(f"MRC {str(path)!r}: its header gives dimensions (Z, Y, X) = {dims}, "
                           f"{need:,} bytes of {MRC_MODES[mode]} data, but the file holds "
                           f"{max(0, have):,} after its header: a damaged or truncated file")


class MrcSource(source.IndexedSource):
  """An MRC / CCP4 map or tomogram, memory-mapped by mrcfile."""

  kind = "mrc"
  described = "an MRC file"
  suffixes = MRC_SUFFIXES

  def __init__(self, path: Path, array: str = "image"):
    import mrcfile
    import warnings
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mrcfile warns (rather than raises) on odd headers
        self._mrc = mrcfile.mmap(path, mode="r", permissive=True)
    except Exception as e:
      raise errors.UserError(f"cannot read MRC {str(path)!r}: {errors.one_line(e)}") from None
    try:
      mode = int(self._mrc.header.mode)
      _check_dimensions(self._mrc, path, mode)
      if mode not in MRC_MODES or self._mrc.data is None:
        raise errors.UserError(
            f"MRC {str(path)!r} has data mode {mode}, not a real-valued volume (need one of "
            + ", ".join(f"{m} ({t})" for m, t in MRC_MODES.items()) + ")")
      super().__init__(path, self._mrc.data, array, f"MRC {str(path)!r}", 1)
      vs = self._mrc.voxel_size
      # Angstrom, (x, y, z) -> um, (z, y, x); all zero when the header leaves it unset.
      self.voxel_size_um = voxel.positive([float(vs.z) * 1e-4, float(vs.y) * 1e-4,
                                          float(vs.x) * 1e-4])
    except BaseException:
      self._mrc.close()
      raise

  def close(self):
    self._arr = None
    self._mrc.close()
