"""PyTorch `.pth` files read and written without torch and without running pickled code.

A `.pth` from `torch.save` (PyTorch >= 1.6) is a zip archive of stored (uncompressed) entries:
`<name>/data.pkl` is a pickle (protocol 2) of the saved object, in which every tensor is a call
to `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` whose `storage` is a
persistent id `("storage", torch.FloatStorage, key, device, numel)`; the raw little-endian bytes
of storage `key` are the zip entry `<name>/data/<key>`.

Unpickling is code execution, and a pickle is also a small program that can ask for any amount
of memory. `load` therefore runs the pickle in `unpickler.Interpreter` (bounded in values,
bytes, nesting and time) with an allow-list: only the names a checkpoint of tensors, (ordered)
dicts, lists and plain metadata values needs resolve, each to a stand-in made for this load
(tensors come back as numpy arrays, torch dtypes and devices as strings); any other name is
refused with one line naming it. Nothing from torch is imported. The archive is not trusted
either: compressed entries are refused (torch.save never writes them, and a few kilobytes can
inflate to gigabytes), every entry must lie inside the file, and every allocation (storages,
tensors) is checked first against the file's size and the memory free.

`save` writes the same format by hand (tensors from numpy arrays, plus dicts, lists, tuples,
strings, numbers, booleans and None), readable by `torch.load(path, weights_only=True)`.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import os
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np

from bonejax.core import errors
from bonejax.convert import unpickler
from bonejax.convert.unpickler import UnsafePickle

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

LIMITS = unpickler.Limits()
MAX_PICKLE_BYTES = 64 << 20  # data.pkl: ~100 bytes per tensor, so room for ~500k tensors
# Tensors are copied out of their storages; views of one storage may overlap (tied weights,
# expand()), but never by much: the copies may take this many times the file's size.
COPY_FACTOR = 4
_MAX_DIMS = 64  # numpy's
# The archive's central directory, read whole by zipfile (one ZipInfo object per entry, ~0.5 KB
# each) before any entry is checked: torch.save writes one entry per storage plus 3-4 others,
# and no model has a quarter of a million separately stored tensors.
MAX_ENTRIES = 1 << 18
MAX_DIRECTORY_BYTES = 64 << 20

__all__ = ["STORAGE_DTYPES", "UnsafePickle", "load", "save"]


def _size_text(n: int) -> str:
  for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.1f} {unit}"
  return f"{n} bytes"


def _free_memory() -> int:
  """Bytes this process may still allocate: the kernel's estimate, less under a cgroup's or
  RLIMIT_AS's limit; very large where none can be read."""
  free = 1 << 62
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
  except (OSError, StopIteration, ValueError, IndexError):
    pass
  try:  # cgroup v2 (containers, job schedulers)
    limit = Path("/sys/fs/cgroup/memory.max").read_text(encoding="ascii").strip()
    if limit != "max":
      current = int(Path("/sys/fs/cgroup/memory.current").read_text(encoding="ascii"))
      free = min(free, int(limit) - current)
  except (OSError, ValueError):
    pass
  try:
    import resource  # pylint: disable=import-outside-toplevel  # not on Windows
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
      with open("/proc/self/statm", encoding="ascii") as f:
        used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
      free = min(free, soft - used)
  except (ImportError, OSError, ValueError, IndexError):
    pass
  return max(free, 0)


class _StorageType(unpickler.Global):
  """Stand-in for `torch.FloatStorage` & co.: only ever a marker in persistent ids."""

  __slots__ = ("dtype",)

  def __init__(self, name: str):
    super().__init__(f"torch.{name}")
    self.dtype = STORAGE_DTYPES[name]


def _int(v: Any, what: str) -> int:
  if isinstance(v, bool) or not isinstance(v, int):
    raise errors.UserError(f"corrupt tensor record: {what} is {type(v).__name__}, not an integer")
  return v


def _ints(v: Any, what: str) -> tuple[int, ...]:
  if v is None:
    return ()
  if not isinstance(v, (tuple, list)) or len(v) > _MAX_DIMS:
    raise errors.UserError(f"corrupt tensor record: {what} is not a tuple of up to {_MAX_DIMS} "
                           "integers")
  out = tuple(_int(s, what) for s in v)
  if any(not 0 <= s < 2**62 for s in out):
    raise errors.UserError(f"corrupt tensor record: {what} {out}")
  return out


def _codecs_encode(text, encoding="latin1"):
  # Protocol-2 pickles spell `bytes` objects as _codecs.encode(str, "latin1").
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise UnsafePickle("the pickle calls _codecs.encode with unexpected arguments")
  return text.encode("latin1")


def _numpy_scalar(dtype, data=None):
  # numpy scalars (e.g. a float64 mean in the metadata): numpy.core.multiarray.scalar(dtype, bytes)
  if not isinstance(dtype, np.dtype) or not isinstance(data, bytes):
    raise UnsafePickle("the pickle calls numpy's scalar() with unexpected arguments")
  return np.frombuffer(data, dtype, count=1)[0].item()


def _numpy_dtype(spec, align=False, copy=False):
  del align, copy
  if not isinstance(spec, str) or len(spec) > 8:
    raise UnsafePickle("the pickle builds a numpy dtype from something that is not a short name")
  dt = np.dtype(spec)
  if dt.kind not in "biufc" or dt.fields is not None or dt.subdtype is not None:
    raise UnsafePickle(f"the pickle builds a numpy {dt} dtype; checkpoints hold numbers")
  return dt


def _build_dtype(inst, state) -> bool:
  """BUILD on a numpy dtype (its pickled state): only the byte order matters to a number."""
  if not isinstance(inst, np.dtype):
    return False
  if not (isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", "|", "=")):
    raise UnsafePickle(f"the pickle sets a numpy {inst} dtype's state to something other than "
                       "little-endian")
  return True


def _torch_device(kind="cpu", index=None):
  if not isinstance(kind, str) or len(kind) > 32 or not (index is None or type(index) is int):
    raise UnsafePickle("the pickle calls torch.device with unexpected arguments")
  return f"{kind}:{index}" if index is not None else kind


# What a pickle may name: (module, name) -> the method of `_Load` that stands in for it, or a
# constant. Anything else is refused.
_CALLS: dict[tuple[str, str], str] = {
    ("collections", "OrderedDict"): "_ordered_dict",
    ("builtins", "set"): "_set",
    ("builtins", "frozenset"): "_frozenset",
    ("_codecs", "encode"): "_codecs_encode",
    ("torch._utils", "_rebuild_tensor_v2"): "_rebuild_tensor_v2",
    ("torch._utils", "_rebuild_tensor"): "_rebuild_tensor",
    ("torch._utils", "_rebuild_parameter"): "_rebuild_parameter",
    ("torch._utils", "_rebuild_parameter_with_state"): "_rebuild_parameter",
    ("torch", "Size"): "_tuple",
    ("torch", "device"): "_torch_device",
    ("numpy", "dtype"): "_numpy_dtype",
    ("numpy.core.multiarray", "scalar"): "_numpy_scalar",
    ("numpy._core.multiarray", "scalar"): "_numpy_scalar",
}
_CONSTANTS: dict[tuple[str, str], str] = {("torch", n): f"torch.{n}" for n in _TORCH_DTYPES}


def _entry_problem(info: zipfile.ZipInfo, archive_bytes: int) -> str | None:
  """Why an archive entry must not be read, or None."""
  name = info.filename[:100]
  if info.compress_type != zipfile.ZIP_STORED:
    return (f"its entry {name!r} is compressed (zip method {info.compress_type}); torch.save "
            "stores entries uncompressed, so the file was re-zipped or crafted: re-save it with "
            "torch.save")
  if info.compress_size != info.file_size or info.header_offset + info.file_size > archive_bytes:
    return (f"its entry {name!r} claims {info.file_size:,} bytes ({_size_text(info.file_size)}), "
            f"more than the archive's {archive_bytes:,}: a damaged or crafted file")
  return None


class _Load:
  """One `load`: the archive, its storages, the memory spent, and this load's stand-ins."""

  def __init__(self, zf: zipfile.ZipFile, prefix: str, archive_bytes: int):
    self.zf, self.prefix, self.archive_bytes = zf, prefix, archive_bytes
    self.storages: dict[str, np.ndarray] = {}
    self.globals: dict[tuple[str, str], Any] = {}
    self.free = _free_memory()
    self.used = 0    # bytes of storages and tensors decoded so far
    self.copied = 0  # bytes of tensors copied out of storages
    self.vm: unpickler.Interpreter | None = None

  def run(self, pkl: zipfile.ZipInfo) -> Any:
    problem = _entry_problem(pkl, self.archive_bytes)
    if problem:
      raise errors.UserError(problem)
    if pkl.file_size > MAX_PICKLE_BYTES:
      raise errors.UserError(f"its pickle {pkl.filename[:100]!r} has {pkl.file_size:,} bytes, more "
                             f"than the {MAX_PICKLE_BYTES:,} of any checkpoint (a crafted file?)")
    with self.zf.open(pkl) as f:
      data = f.read(MAX_PICKLE_BYTES + 1)
    if len(data) != pkl.file_size:
      raise errors.UserError(f"its pickle {pkl.filename[:100]!r} is damaged (truncated?)")
    self.vm = unpickler.Interpreter(data, self.find_class, self.persistent_load, LIMITS,
                                    _build_dtype)
    return self.vm.load()

  def _use(self, nbytes: int, what: Callable[[], str]) -> None:
    if self.used + nbytes > self.free:
      raise errors.UserError(f"{what()} needs {_size_text(nbytes)}, but only "
                             f"{_size_text(max(self.free - self.used, 0))} of memory is free")
    self.used += nbytes

  # -- what the pickle may name -------------------------------------------------------------------

  def find_class(self, module: str, name: str) -> Any:
    # Protocol-2 pickles spell builtins the Python 2 way (__builtin__.set): map as pickle does.
    if (module, name) in _compat_pickle.NAME_MAPPING:
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    key = (module, name)
    if key not in self.globals:
      if key in _CALLS:
        self.globals[key] = unpickler.Call(f"{module}.{name}", getattr(self, _CALLS[key]))
      elif key in _CONSTANTS:
        self.globals[key] = _CONSTANTS[key]
      elif module == "torch" and name in STORAGE_DTYPES:
        self.globals[key] = _StorageType(name)
      else:
        raise UnsafePickle(f"refusing to unpickle {module[:100]}.{name[:100]}: bonejax reads "
                           "checkpoints of tensors, dicts, lists and plain values only (a whole "
                           "pickled model? save model.state_dict() instead; or the file may be "
                           "malicious)")
    return self.globals[key]

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
            and len(pid[2]) <= 100):
      raise errors.UserError(f"corrupt checkpoint: unexpected persistent id (a "
                             f"{type(pid).__name__})")
    key, dtype, numel = pid[2], pid[1].dtype, _int(pid[4], "storage size")
    if numel < 0:
      raise errors.UserError(f"corrupt checkpoint: storage {key!r} has {numel} elements")
    if key not in self.storages:
      try:
        info = self.zf.getinfo(f"{self.prefix}data/{key}")
      except KeyError:
        raise errors.UserError(f"corrupt checkpoint: storage {key!r} is missing") from None
      problem = _entry_problem(info, self.archive_bytes)
      if problem:
        raise errors.UserError(problem)
      need = numel * dtype.itemsize
      if info.file_size < need:  # checked before reading: the size in the pickle is untrusted
        raise errors.UserError(f"corrupt checkpoint: storage {key!r} has {info.file_size:,} bytes, "
                               f"{numel:,} x {dtype.itemsize} expected")
      self._use(need, lambda: f"storage {key!r} ({numel:,} {dtype} values)")
      with self.vm.untimed(), self.zf.open(info) as f:
        raw = f.read(need)
      if len(raw) != need:
        raise errors.UserError(f"storage {key!r} is damaged (truncated?)")
      self.storages[key] = np.frombuffer(raw, dtype, count=numel)
    stored = self.storages[key]
    if stored.dtype != dtype:
      raise errors.UserError(f"corrupt checkpoint: storage {key!r} is read as two dtypes")
    return stored

  # -- the stand-ins ------------------------------------------------------------------------------

  def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False,
                         backward_hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2 on a numpy storage: a strided view, copied contiguous."""
    del requires_grad, backward_hooks, metadata
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
      raise errors.UserError("corrupt tensor record: its storage is not a storage")
    offset = _int(storage_offset, "storage offset")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride) or offset < 0:
      raise errors.UserError(f"corrupt tensor record: size {size}, stride {stride}, offset "
                             f"{offset}")
    if 0 in size:
      return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
      raise errors.UserError(f"corrupt tensor record: size {size} with stride {stride} at offset "
                             f"{offset} reaches past its storage of {storage.size} elements")
    # Strides of 0 (or overlapping ones) repeat storage elements: the copy can be far larger
    # than the storage, so its size is checked against the file and the memory first.
    nbytes = math.prod(size) * storage.dtype.itemsize
    if self.copied + nbytes > COPY_FACTOR * self.archive_bytes + (1 << 20):
      raise errors.UserError(f"a tensor of size {list(size)} ({storage.dtype}) would take "
                             f"{_size_text(nbytes)} ({nbytes:,} bytes) from a file of "
                             f"{_size_text(self.archive_bytes)}: its strides {list(stride)} repeat "
                             "storage elements (a crafted file?)")
    self._use(nbytes, lambda: f"a tensor of size {list(size)} ({storage.dtype})")
    self.copied += nbytes
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], size, tuple(s * item for s in stride),
                                           writeable=False)
    with self.vm.untimed():
      return np.array(view)  # contiguous, owns its memory

  def _rebuild_tensor(self, storage, storage_offset, size, stride):
    return self._rebuild_tensor_v2(storage, storage_offset, size, stride)

  def _rebuild_parameter(self, data, requires_grad=False, backward_hooks=None, *state):
    del requires_grad, backward_hooks, state
    return data

  def _items(self, items: Any, what: str) -> list[Any] | tuple[Any, ...]:
    if not isinstance(items, (list, tuple)):
      raise UnsafePickle(f"the pickle calls {what} on a {type(items).__name__}")
    self.vm.charge(nodes=len(items))  # a new container as long as one the pickle made once
    return items

  def _tuple(self, items=()):
    return tuple(self._items(items, "torch.Size"))

  def _set(self, items=()):
    items = self._items(items, "set")
    for item in items:
      unpickler.check_key(item)
    return set(items)

  def _frozenset(self, items=()):
    return frozenset(self._set(items))

  def _ordered_dict(self, items=()):
    out: collections.OrderedDict = collections.OrderedDict()
    for pair in self._items(items, "OrderedDict"):
      if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise UnsafePickle("the pickle calls OrderedDict on something other than pairs")
      unpickler.check_key(pair[0])
      out[pair[0]] = pair[1]
    return out

  def _codecs_encode(self, text, encoding="latin1"):
    self.vm.charge(made_bytes=len(text) if isinstance(text, str) else 0)
    return _codecs_encode(text, encoding)

  _numpy_scalar = staticmethod(_numpy_scalar)
  _numpy_dtype = staticmethod(_numpy_dtype)
  _torch_device = staticmethod(_torch_device)


def _directory_size(path: Path) -> tuple[int, int] | None:
  """(entries, bytes) of a zip archive's central directory as its end record declares them
  (zip64 too), or None when no end record is found (zipfile then says why)."""
  with open(path, "rb") as f:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    tail_at = max(0, size - (22 + 0xFFFF + 20))  # end record + the longest comment + locator
    f.seek(tail_at)
    tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
      return None
    entries, cd_bytes = struct.unpack("<HI", tail[at + 10:at + 16])
    locator = tail[at - 20:at] if at >= 20 else b""
    if locator[:4] == b"PK\x06\x07":  # zip64: the counts live in the zip64 end record
      (record_at,) = struct.unpack("<Q", locator[8:16])
      f.seek(min(record_at, size))
      record = f.read(56)
      if record[:4] == b"PK\x06\x06" and len(record) == 56:
        entries, cd_bytes = struct.unpack("<QQ", record[32:48])
  return int(entries), int(cd_bytes)


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
  directory = _directory_size(p)
  if directory is not None and (directory[0] > MAX_ENTRIES or
                                directory[1] > MAX_DIRECTORY_BYTES):
    raise errors.UserError(
        f"{str(p)!r} is a zip archive of {directory[0]:,} entries ({_size_text(directory[1])} of "
        f"directory), more than the {MAX_ENTRIES:,} entries / {_size_text(MAX_DIRECTORY_BYTES)} "
        "of any torch.save checkpoint (a crafted file?)")
  try:
    zf = zipfile.ZipFile(p)
    archive_bytes = p.stat().st_size
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
    try:
      return _Load(zf, prefix, archive_bytes).run(zf.getinfo(pkls[0]))
    except errors.UserError as e:  # UnsafePickle stays UnsafePickle
      raise type(e)(f"{str(p)!r}: {e}") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as e:
      raise errors.UserError(f"{str(p)!r} is damaged (truncated?): {e}") from None
    except MemoryError:
      raise errors.UserError(f"{str(p)!r}: not enough memory to read it") from None
    except Exception as e:  # pylint: disable=broad-except  # malformed pickle: any error type
      raise errors.UserError(f"{str(p)!r} holds a malformed pickle: {type(e).__name__}: "
                             f"{str(e)[:200]}") from None


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
