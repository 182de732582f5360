"""PyTorch `.pth` files read and written without torch and without running pickled code.

A `.pth` from `torch.save` (PyTorch >= 1.6) is a zip archive: `<name>/data.pkl` is a pickle
(protocol 2) of the saved object, in which every tensor is a call to
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` whose `storage` is a
persistent id `("storage", torch.FloatStorage, key, device, numel)`; the raw little-endian bytes
of storage `key` are the zip entry `<name>/data/<key>`.

Unpickling is code execution: a pickle may name any importable callable (`os.system`) and call
it. `load` therefore unpickles with an allow-list: `find_class` resolves only the names a
checkpoint of tensors, (ordered) dicts, lists and plain metadata values needs, each to a local
stand-in (tensors come back as numpy arrays, torch dtypes and devices as strings); any other name
is refused with one line naming it. Nothing from torch is imported.

`save` writes the same format by hand (tensors from numpy arrays, plus dicts, lists, tuples,
strings, numbers, booleans and None), readable by `torch.load(path, weights_only=True)`.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from bonejax.core import errors, outputs

# torch's legacy storage classes <-> numpy dtypes (what `torch.save` names in its pickles).
STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"),
}
_STORAGE_NAMES = {dt: name for name, dt in STORAGE_DTYPES.items()}
_TORCH_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                 "uint8", "bool", "float", "double", "half", "long", "int", "short")
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of torch's pre-1.6 format


class UnsafePickle(errors.UserError):
  """The pickle names something outside the allow-list."""


class _StorageType:
  """Stand-in for `torch.FloatStorage` & co.: only ever used as a marker in persistent ids."""

  def __init__(self, name: str):
    self.name, self.dtype = name, STORAGE_DTYPES[name]

  def __call__(self, *args, **kwargs):
    raise UnsafePickle(f"the pickle calls torch.{self.name}, which a checkpoint never does")


def _int(v: Any, what: str) -> int:
  if isinstance(v, bool) or not isinstance(v, int):
    raise errors.UserError(f"corrupt tensor record: {what} is {type(v).__name__}, not an integer")
  return v


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  """torch._utils._rebuild_tensor_v2 on a numpy storage: a strided view, copied contiguous."""
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, np.ndarray) or storage.ndim != 1:
    raise errors.UserError("corrupt tensor record: its storage is not a storage")
  offset = _int(storage_offset, "storage offset")
  size = tuple(_int(s, "size") for s in (size or ()))
  stride = tuple(_int(s, "stride") for s in (stride or ()))
  if len(size) != len(stride) or min(size + stride + (offset,), default=0) < 0:
    raise errors.UserError(f"corrupt tensor record: size {size}, stride {stride}, offset {offset}")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise errors.UserError(f"corrupt tensor record: size {size} with stride {stride} at offset "
                        f"{offset} reaches past its storage of {storage.size} elements")
  item = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], size, tuple(s * item for s in stride),
                                         writeable=False)
  return np.array(view)  # contiguous, owns its memory


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
  del requires_grad, backward_hooks, state
  return data


def _codecs_encode(text, encoding="latin1"):
  # Protocol-2 pickles spell `bytes` objects as _codecs.encode(str, "latin1").
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise UnsafePickle("the pickle calls _codecs.encode with unexpected arguments")
  return text.encode("latin1")


def _numpy_scalar(dtype, data=None):
  # numpy scalars (e.g. a float64 mean in the metadata): numpy.core.multiarray.scalar(dtype, bytes)
  if not isinstance(dtype, np.dtype) or not isinstance(data, bytes) or dtype.hasobject:
    raise UnsafePickle("the pickle calls numpy's scalar() with unexpected arguments")
  return np.frombuffer(data, dtype, count=1)[0].item()


def _numpy_dtype(spec, align=False, copy=False):
  if not isinstance(spec, str):
    raise UnsafePickle("the pickle builds a numpy dtype from something that is not a name")
  dt = np.dtype(spec, align=bool(align), copy=bool(copy))
  if dt.hasobject:
    raise UnsafePickle("the pickle builds a numpy object dtype")
  return dt


def _torch_device(kind="cpu", index=None):
  return f"{kind}:{index}" if index is not None else str(kind)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): _codecs_encode,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("torch", "device"): _torch_device,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
    **{("torch", name): f"torch.{name}" for name in _TORCH_DTYPES},
}


class _Unpickler(pickle.Unpickler):

  def __init__(self, data: bytes, read_storage):
    super().__init__(io.BytesIO(data))
    self._read_storage = read_storage

  def find_class(self, module: str, name: str):
    # Protocol-2 pickles spell builtins the Python 2 way (__builtin__.set): map as pickle does.
    if (module, name) in _compat_pickle.NAME_MAPPING:
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise UnsafePickle(f"refusing to unpickle {module}.{name}: bonejax reads checkpoints of "
                         "tensors, dicts, lists and plain values only (a whole pickled model? save "
                         "model.state_dict() instead; or the file may be malicious)") from None

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
      raise errors.UserError(f"corrupt checkpoint: unexpected persistent id {str(pid)[:80]}")
    return self._read_storage(pid[2], pid[1].dtype, _int(pid[4], "storage size"))


def _describe_non_zip(path: Path) -> str:
  """Why `path` is not a torch.save zip archive, or "" when it is one."""
  with open(path, "rb") as f:
    head = f.read(16)
  if zipfile.is_zipfile(path):
    return ""
  # The legacy format opens with the pickled magic number: PROTO 2, LONG1 of 10 bytes.
  if head[:4] == b"\x80\x02\x8a\x0a" and int.from_bytes(head[4:14], "little") == _LEGACY_MAGIC:
    return ("is in PyTorch's legacy (pre-1.6) format, which bonejax does not read; re-save it "
            "with PyTorch >= 1.6: torch.save(torch.load(old), new)")
  if head[:1] == b"\x80":
    return "is a bare pickle, not a torch.save zip archive"
  if head[:2] == b"PK":
    return "is a damaged zip archive (truncated?)"
  return "is not a PyTorch checkpoint (not a zip archive)"


def load(path: str | os.PathLike) -> Any:
  """The object saved in a `.pth`, tensors as numpy arrays; `errors.UserError` for anything else."""
  p = Path(path)
  problem = _describe_non_zip(p)
  if problem:
    raise errors.UserError(f"{str(p)!r} {problem}")
  try:
    zf = zipfile.ZipFile(p)
  except (zipfile.BadZipFile, OSError) as e:
    raise errors.UserError(f"{str(p)!r} is not a readable zip archive: {e}") from None
  with zf:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
      raise errors.UserError(f"{str(p)!r} is a TorchScript archive (torch.jit.save); save the "
                          "weights with torch.save(model.state_dict(), path)")
    if len(pkls) != 1:
      raise errors.UserError(f"{str(p)!r} is a zip archive but not a torch.save checkpoint "
                          "(no <name>/data.pkl)")
    prefix = pkls[0][: -len("data.pkl")]
    storages: dict[str, np.ndarray] = {}

    def read_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
      if key not in storages:
        try:
          info = zf.getinfo(f"{prefix}data/{key}")
        except KeyError:
          raise errors.UserError(f"corrupt checkpoint {str(p)!r}: storage {key!r} is missing") \
              from None
        need = numel * dtype.itemsize
        if info.file_size < need:  # checked before reading: the size in the pickle is untrusted
          raise errors.UserError(f"corrupt checkpoint {str(p)!r}: storage {key!r} has "
                              f"{info.file_size} bytes, {numel} x {dtype.itemsize} expected")
        with zf.open(info) as f:
          raw = f.read(need)
        storages[key] = np.frombuffer(raw, dtype, count=numel)
      stored = storages[key]
      if stored.dtype != dtype:
        raise errors.UserError(f"corrupt checkpoint {str(p)!r}: storage {key!r} is read as two dtypes")
      return stored

    try:
      return _Unpickler(zf.read(pkls[0]), read_storage).load()
    except errors.UserError:
      raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as e:
      raise errors.UserError(f"{str(p)!r} is damaged (truncated?): {e}") from None
    except Exception as e:  # pylint: disable=broad-except  # malformed pickle: any error type
      raise errors.UserError(f"{str(p)!r} holds a malformed pickle: {type(e).__name__}: {e}") \
          from None


# ---------------------------------------------------------------------------------------------
# Writing: the pickle opcodes emitted by hand, so no torch class needs to exist here.
# ---------------------------------------------------------------------------------------------

class _Writer:
  """Protocol-2 pickle of plain values and numpy arrays in torch.save's layout."""

  def __init__(self):
    self.out = io.BytesIO()
    self.storages: list[np.ndarray] = []

  def op(self, b: bytes) -> None:
    self.out.write(b)

  def global_(self, module: str, name: str) -> None:
    self.op(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

  def str_(self, s: str) -> None:
    b = s.encode("utf-8")
    self.op(b"X" + struct.pack("<I", len(b)) + b)

  def int_(self, v: int) -> None:
    if -(2**31) <= v < 2**31:
      self.op(b"J" + struct.pack("<i", v))
    else:
      b = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
      self.op(b"\x8a" + bytes([len(b)]) + b)

  def tuple_(self, items) -> None:
    self.op(b"(")
    for v in items:
      self.value(v)
    self.op(b"t")

  def ordered_dict(self) -> None:
    self.global_("collections", "OrderedDict")
    self.op(b")R")

  def tensor(self, a: np.ndarray) -> None:
    a = np.asarray(a, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
    if a.dtype.byteorder == ">":
      a = a.astype(a.dtype.newbyteorder("<"))
    name = _STORAGE_NAMES.get(a.dtype)
    if name is None:
      raise errors.UserError(f"cannot write a {a.dtype} array to a .pth")
    key = str(len(self.storages))
    self.storages.append(a)
    strides = tuple(int(np.prod(a.shape[i + 1:], dtype=np.int64)) for i in range(a.ndim))
    self.global_("torch._utils", "_rebuild_tensor_v2")
    self.op(b"(")
    self.op(b"(")
    self.str_("storage")
    self.global_("torch", name)
    self.str_(key)
    self.str_("cpu")
    self.int_(int(a.size))
    self.op(b"tQ")  # TUPLE, BINPERSID
    self.int_(0)
    self.tuple_(int(s) for s in a.shape)
    self.tuple_(strides)
    self.op(b"\x89")  # requires_grad=False
    self.ordered_dict()  # backward hooks
    self.op(b"tR")

  def value(self, v: Any) -> None:
    if isinstance(v, np.ndarray):
      self.tensor(v)
    elif v is None:
      self.op(b"N")
    elif isinstance(v, (bool, np.bool_)):
      self.op(b"\x88" if v else b"\x89")
    elif isinstance(v, (int, np.integer)):
      self.int_(int(v))
    elif isinstance(v, (float, np.floating)):
      self.op(b"G" + struct.pack(">d", float(v)))
    elif isinstance(v, str):
      self.str_(v)
    elif isinstance(v, (list, tuple)):
      if isinstance(v, tuple):
        self.tuple_(v)
      else:
        self.op(b"](")
        for item in v:
          self.value(item)
        self.op(b"e")
    elif isinstance(v, dict):
      if isinstance(v, collections.OrderedDict):
        self.ordered_dict()
      else:
        self.op(b"}")
      if v:
        self.op(b"(")
        for k, item in v.items():
          if not isinstance(k, str):
            raise errors.UserError(f"cannot write a dict key of type {type(k).__name__} to a .pth")
          self.str_(k)
          self.value(item)
        self.op(b"u")
    else:
      raise errors.UserError(f"cannot write a {type(v).__name__} to a .pth")


def save(obj: Any, path: str | os.PathLike, archive_name: str = "archive") -> None:
  """Writes `obj` (dicts/lists/tuples of numpy arrays and plain values) as torch.save would.

  Not atomic by itself: callers write to a temporary name (outputs.atomic_output) and rename.
  """
  w = _Writer()
  w.op(b"\x80\x02")
  w.value(obj)
  w.op(b".")
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
    zf.writestr(f"{archive_name}/data.pkl", w.out.getvalue())
    zf.writestr(f"{archive_name}/byteorder", "little")
    for key, a in enumerate(w.storages):
      zf.writestr(f"{archive_name}/data/{key}", a.tobytes())
    zf.writestr(f"{archive_name}/version", "3\n")
