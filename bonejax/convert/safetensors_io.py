"""`.safetensors` files read and written with numpy alone.

The format (huggingface/safetensors) is an 8-byte little-endian header length N, N bytes of
JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`,
then the raw little-endian tensor bytes. It holds no code, so reading it is safe by design;
what is checked here is that the header is consistent (offsets inside the file, sizes matching
shapes), so a truncated or damaged file fails with one line rather than a numpy error.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from bonejax.core import errors

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_CODES = {dt: code for code, dt in DTYPES.items()}
MAX_HEADER = 100 << 20  # the reference implementation's own limit


def load(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors by name, the `__metadata__` strings) of a .safetensors file."""
  p = Path(path)
  data = p.read_bytes()
  bad = f"{str(p)!r} is not a valid .safetensors file"
  if len(data) < 8:
    raise errors.UserError(f"{bad}: {len(data)} bytes")
  (n,) = struct.unpack("<Q", data[:8])
  if n > MAX_HEADER or 8 + n > len(data):
    raise errors.UserError(f"{bad}: header of {n} bytes in a file of {len(data)} (truncated?)")
  try:
    header = json.loads(data[8:8 + n])
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.UserError(f"{bad}: header is not JSON ({e})") from None
  if not isinstance(header, dict):
    raise errors.UserError(f"{bad}: header is not a JSON object")
  meta = header.pop("__metadata__", None) or {}
  if not isinstance(meta, dict):
    raise errors.UserError(f"{bad}: __metadata__ is not an object")
  body = memoryview(data)[8 + n:]
  tensors: dict[str, np.ndarray] = {}
  for name, info in header.items():
    try:
      dtype = DTYPES[info["dtype"]]
      shape = tuple(int(s) for s in info["shape"])
      begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise errors.UserError(f"{bad}: bad entry for tensor {name!r}: {str(info)[:80]}") from None
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if min(shape, default=0) < 0 or not 0 <= begin <= end <= len(body) or end - begin != size:
      raise errors.UserError(f"{bad}: tensor {name!r} {shape} {info['dtype']} has data offsets "
                          f"[{begin}, {end}] in a data section of {len(body)} bytes (truncated?)")
    tensors[name] = np.frombuffer(body[begin:end], dtype).reshape(shape).copy()
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
