"""A .npy file, memory-mapped: (Z, Y, X), or (Z, Y, X, C) for multi-channel models. Pickled
arrays are refused (never execute a pickle from a file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bonejax.core import errors
from bonejax.io import source


class NpySource(source.IndexedSource):
  kind = "npy"
  suffixes = (".npy",)
  magic = (b"\x93NUMPY",)

  @classmethod
  def open(cls, path, *, array, channels, context, key):
    return cls(path, array, channels)

  def __init__(self, path: Path, array: str = "image", channels: int | None = 1):
    try:
      arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # a truncated header, a pickle, not an .npy at all
      raise errors.UserError(f"cannot read .npy {str(path)!r}: {errors.one_line(e)}") from None
    if not isinstance(arr, np.ndarray):
      raise errors.UserError(f"{str(path)!r} is not a single .npy array")
    super().__init__(path, arr, array, f"{str(path)!r}", channels)

  def close(self):
    source.close_memmap(self._arr)
