"""`.safetensors` files read and written with numpy alone.

The format (huggingface/safetensors) is an 8-byte little-endian header length N, N bytes of
JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`,
then the raw little-endian tensor bytes. It holds no code, so reading it is safe by design;
what is checked here is that the header is consistent (offsets inside the file, sizes matching
shapes, no bytes shared by two tensors) and fits in memory before anything is allocated, so a
truncated, damaged or crafted file fails with one line rather than a numpy error or a kill.
"""

from __future__ import annotations

import json
import math
import operator
import os
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from bonejax.core import errors, memory_plan

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_CODES = {dt: code for code, dt in DTYPES.items()}
MAX_HEADER = 100 << 20  # the reference implementation's own limit
_MAX_DIMS = 64  # numpy's


def _entries(header: dict, body_bytes: int, bad: str) -> list[tuple[str, np.dtype, tuple, int,
                                                                      int]]:
  """(name, dtype, shape, begin, end) of every tensor, checked: a known dtype, a shape of up to
  64 non-negative sides whose bytes are the entry's, offsets inside the data section, and no two
  tensors sharing bytes (each byte of the file is read into at most one array, so the arrays
  together never exceed the file)."""
  out = []
  for name, info in header.items():
    try:
      dtype = DTYPES[info["dtype"]]
      if not isinstance(info["shape"], list) or len(info["shape"]) > _MAX_DIMS:
        raise TypeError
      shape = tuple(operator.index(s) for s in info["shape"])
      begin, end = (operator.index(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise errors.UserError(f"{bad}: bad entry for tensor {name!r}: {str(info)[:80]}") from None
    size = math.prod(shape) * dtype.itemsize  # Python ints: a crafted shape cannot wrap around
    if min(shape, default=0) < 0 or not 0 <= begin <= end <= body_bytes or end - begin != size:
      raise errors.UserError(f"{bad}: tensor {name!r} {shape} {info['dtype']} has data offsets "
                             f"[{begin}, {end}] in a data section of {body_bytes} bytes "
                             "(truncated?)")
    out.append((name, dtype, shape, begin, end))
  spans = sorted((b, e, n) for n, _, _, b, e in out if e > b)
  for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
    if b1 < e0:
      raise errors.UserError(f"{bad}: tensors {n0!r} and {n1!r} share bytes (overlapping data "
                             "offsets: a crafted file?)")
  return out


def load(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors by name, the `__metadata__` strings) of a .safetensors file.

  Read piece by piece: the header (capped), then each tensor into its own array, after the
  whole plan (header, shapes, offsets) is checked against the file and the memory free."""
  p = Path(path)
  bad = f"{str(p)!r} is not a valid .safetensors file"
  with open(p, "rb") as f:
    file_bytes = os.fstat(f.fileno()).st_size
    if file_bytes < 8:
      raise errors.UserError(f"{bad}: {file_bytes} bytes")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER or 8 + n > file_bytes:
      raise errors.UserError(f"{bad}: header of {n} bytes in a file of {file_bytes} (truncated?)")
    # json's objects take ~10-20 times the text's bytes.
    memory_plan.require_fits(f"{str(p)!r} (its header of {memory_plan.format_bytes(n)})", 20 * n)
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
      raise errors.UserError(f"{bad}: header is not JSON ({errors.short_message(e)})") from None
    if not isinstance(header, dict):
      raise errors.UserError(f"{bad}: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
      raise errors.UserError(f"{bad}: __metadata__ is not an object")
    entries = _entries(header, file_bytes - 8 - n, bad)
    memory_plan.require_fits(f"{str(p)!r} (its {len(entries)} tensor(s))",
                             sum(e - b for *_, b, e in entries))
    tensors: dict[str, np.ndarray] = {}
    for name, dtype, shape, begin, end in entries:
      a = np.empty(shape, dtype)
      f.seek(8 + n + begin)
      if f.readinto(a.reshape(-1).view(np.uint8)) != end - begin:
        raise errors.UserError(f"{bad}: tensor {name!r} is cut short (truncated?)")
      tensors[name] = a
  return tensors, {str(k): str(v) for k, v in meta.items()}


def save(tensors: dict[str, np.ndarray], path: str | os.PathLike,
         metadata: dict[str, str] | None = None) -> None:
  """Writes `tensors` (and string `metadata`) as .safetensors. Not atomic by itself."""
  header: dict[str, Any] = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  arrays, offset = [], 0
  for name, a in tensors.items():
    a = np.asarray(a, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
    if a.dtype.itemsize > 1 and a.dtype.byteorder == ">":
      a = a.astype(a.dtype.newbyteorder("<"))
    if a.dtype not in _CODES:
      raise errors.UserError(f"cannot write a {a.dtype} array to .safetensors")
    header[name] = {"dtype": _CODES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    arrays.append(a)
    offset += a.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, as the reference does
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for a in arrays:
      f.write(a.tobytes())
