"""Crafted `.pth` files (issue 26): memory bombs, lying archives and stand-in tampering are refused
with one line naming the file, within a memory limit, and leave later loads intact.

Every file is written here from pickle opcodes and zipfile: no pickle is ever executed. The
memory bombs run `launch/convert_weights.py` in a subprocess under RLIMIT_AS, so a regression
ends in a MemoryError there (exit 3), not in the machine swapping.
"""

import json
import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bonejax.core import errors
from bonejax.convert import checkpoint, safetensors_io, torch_pickle, unpickler
from smp_reference import require

REPO = Path(__file__).resolve().parents[1]
MEMORY_LIMIT = 3 << 29  # 1.5 GiB of address space: the converter needs well under 1 GiB to fail
_LIMITED = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({0}, {0})); "
            "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")


# --- pickle opcodes, written by hand -------------------------------------------------------------

def _str(s: str) -> bytes:
  b = s.encode()
  return pickle.BINUNICODE + struct.pack("<I", len(b)) + b


def _int(v: int) -> bytes:
  return pickle.BININT + struct.pack("<i", v)


def _put(i: int) -> bytes:
  return pickle.LONG_BINPUT + struct.pack("<I", i)


def _get(i: int) -> bytes:
  return pickle.LONG_BINGET + struct.pack("<I", i)


def _global(module: str, name: str) -> bytes:
  return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _tuple(*parts: bytes) -> bytes:
  return pickle.MARK + b"".join(parts) + pickle.TUPLE


def _tensor(key: str, numel: int, size, stride, offset: int = 0,
            storage: str = "FloatStorage") -> bytes:
  """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())."""
  pid = _tuple(_str("storage"), _global("torch", storage), _str(key), _str("cpu"), _int(numel))
  return (_global("torch._utils", "_rebuild_tensor_v2")
          + _tuple(pid + pickle.BINPERSID, _int(offset), _tuple(*map(_int, size)),
                   _tuple(*map(_int, stride)), pickle.NEWFALSE,
                   _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE)
          + pickle.REDUCE)


def _dict(*pairs: tuple[str, bytes]) -> bytes:
  return (pickle.EMPTY_DICT + pickle.MARK + b"".join(_str(k) + v for k, v in pairs)
          + pickle.SETITEMS)


def _program(body: bytes) -> bytes:
  return pickle.PROTO + b"\x02" + body + pickle.STOP


def _archive(path: Path, pkl: bytes, storages: dict[str, bytes] | None = None,
             compression: int = zipfile.ZIP_STORED) -> Path:
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pkl, compress_type=compression)
    for key, raw in (storages or {}).items():
      zf.writestr(f"archive/data/{key}", raw, compress_type=compression)
    zf.writestr("archive/version", "3\n")
  return path


def _state_dict_with_metadata(path: Path, metadata: bytes) -> Path:
  """A valid one-tensor state dict under `model_state`, and `metadata` as given."""
  w = np.arange(4, dtype=np.float32)
  pkl = _program(_dict(("model_state", _dict(("w", _tensor("0", 4, (4,), (1,))))),
                       ("metadata", metadata)))
  return _archive(path, pkl, {"0": w.tobytes()})


def _shared_tower(levels: int, keys: int = 10) -> bytes:
  """A dict of `keys` references to one dict of `keys` references ...: keys**levels values."""
  out = _str("leaf") + _put(0) + pickle.POP
  for i in range(levels):
    out += (pickle.EMPTY_DICT + pickle.MARK + b"".join(_str(f"k{j}") + _get(i)
                                                       for j in range(keys))
            + pickle.SETITEMS + _put(i + 1) + pickle.POP)
  return out + _get(levels)


# --- memory bombs, through the command line under a memory limit --------------------------------

def _bomb_tower(path):
  return _state_dict_with_metadata(path, _shared_tower(40)), "once its shared references"


def _bomb_stride0(path):
  # 1 float stored, a (60000, 60000) view of it: 13.4 GiB asked for by a file of ~600 bytes.
  pkl = _program(_dict(("w", _tensor("0", 1, (60000, 60000), (0, 0)))))
  return _archive(path, pkl, {"0": b"\0" * 4}), r"size \[60000, 60000\].*13\.4 GiB"


def _bomb_encode(path):
  # One 1 MiB string, memoised, encoded to bytes 100,000 times: 100 GB from a 1.6 MB file.
  call = _get(0) + _get(1) + pickle.REDUCE
  body = (_global("_codecs", "encode") + _put(0)
          + _tuple(_str("x" * (1 << 20)), _str("latin1")) + _put(1)
          + pickle.EMPTY_LIST + pickle.MARK + call * 100_000 + pickle.APPENDS)
  return _archive(path, _program(body)), "bytes of text from references"


def _bomb_size(path):
  # torch.Size(one list of 100,000 items) 100,000 times: 80 GB of tuples from a 1.3 MB file.
  body = (_global("torch", "Size") + _put(0)
          + pickle.EMPTY_LIST + pickle.MARK + pickle.NONE * 100_000 + pickle.APPENDS
          + pickle.TUPLE1 + _put(1)
          + pickle.EMPTY_LIST + pickle.MARK + (_get(0) + _get(1) + pickle.REDUCE) * 100_000
          + pickle.APPENDS)
  return _archive(path, _program(body)), "more than 2,000,000 pickled values"


def _bomb_safetensors(path):
  # A sparse file: 64 GiB of declared tensor bytes that take no disk, read before this fix.
  path = path.with_suffix(".safetensors")
  _safetensors(path, {"w": {"dtype": "F32", "shape": [1 << 34], "data_offsets": [0, 1 << 36]}},
               data_bytes=1 << 36)
  return path, r"\(its 1 tensor\(s\)\) needs 64\.0 GiB of memory"


@pytest.mark.parametrize("make", [_bomb_tower, _bomb_stride0, _bomb_encode, _bomb_size,
                                  _bomb_safetensors])
def test_memory_bombs_are_refused_within_a_memory_limit(tmp_path, make):
  path, pattern = make(tmp_path / "bomb.pth")
  out = tmp_path / "bundle"
  r = subprocess.run([sys.executable, "-c", _LIMITED.format(MEMORY_LIMIT),
                      str(REPO / "launch" / "convert_weights.py"), f"--pth={path}", f"--out={out}"],
                     capture_output=True, text=True, cwd=REPO, timeout=300,
                     env={**os.environ, "JAX_PLATFORMS": "cpu", "OPENBLAS_NUM_THREADS": "1"})
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2, r.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith(f"error: {str(path)!r}"), r.stderr[-2000:]
  assert re.search(pattern, lines[0]), lines[0]
  assert not out.exists()


# --- lying archives -----------------------------------------------------------------------------

def _safetensors(path: Path, header: dict, data: bytes = b"", data_bytes: int = 0,
                 header_bytes: int | None = None) -> Path:
  """A .safetensors file with this header; its data section `data`, or `data_bytes` of holes."""
  blob = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob) if header_bytes is None else header_bytes) + blob + data)
    if data_bytes:
      f.truncate(8 + len(blob) + data_bytes)  # sparse: no disk used
  return path


def _f32(shape, begin, end) -> dict:
  return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize("header,data,pattern", [
    # a shape whose element count wraps around in int64 (2**62 * 4 * 4 bytes == 0 mod 2**64)
    ({"w": _f32([1 << 62, 4], 0, 0)}, b"", r"tensor 'w' \(4611686018427387904, 4\) F32 has data "
                                          r"offsets \[0, 0\]"),
    # two tensors reading the same bytes: N names for one block would make N copies
    ({"a": _f32([4], 0, 16), "b": _f32([4], 0, 16)}, bytes(16), "tensors 'a' and 'b' share bytes"),
    ({"a": _f32([4], 0, 16), "b": _f32([4], 8, 24)}, bytes(24), "tensors 'a' and 'b' share bytes"),
    ({"w": _f32([4], 16, 32)}, bytes(16), r"offsets \[16, 32\] in a data section of 16 bytes"),
    ({"w": _f32([4], -16, 0)}, bytes(16), r"offsets \[-16, 0\]"),
    ({"w": _f32([-4], 0, 0)}, bytes(16), r"\(-4,\) F32"),
    ({"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16), "bad entry"),
    ({"w": _f32("1234", 0, 96)}, bytes(96), "bad entry"),
    ({"w": _f32([1.5], 0, 4)}, bytes(4), "bad entry"),
    ({"w": _f32([1] * 65, 0, 4)}, bytes(4), "bad entry"),
    ({"w": [1, 2]}, b"", "bad entry"),
    ([1, 2], b"", "header is not a JSON object"),
])
def test_hostile_safetensors_are_refused(tmp_path, header, data, pattern):
  path = _safetensors(tmp_path / "w.safetensors", header, data)
  with pytest.raises(errors.UserError, match=r"w.safetensors' is not a valid .safetensors file: "
                                             r".*" + pattern):
    safetensors_io.load(path)


def test_safetensors_header_length_and_memory_are_checked(tmp_path, monkeypatch):
  from bonejax.core import memory_plan
  huge = _safetensors(tmp_path / "h.safetensors", {}, header_bytes=1 << 63)
  with pytest.raises(errors.UserError, match=r"header of 9223372036854775808 bytes in a file of"):
    safetensors_io.load(huge)
  ok = _safetensors(tmp_path / "ok.safetensors", {"w": _f32([2, 2], 0, 16), "e": _f32([0], 16, 16)},
                    np.arange(4, dtype="<f4").tobytes())
  back, _ = safetensors_io.load(ok)
  np.testing.assert_array_equal(back["w"], [[0, 1], [2, 3]])
  assert back["e"].shape == (0,)
  monkeypatch.setattr(memory_plan, "available_bytes", lambda: (200, "available"))
  with pytest.raises(errors.UserError, match=r"ok.safetensors' \(its header of .*\) needs"):
    safetensors_io.load(ok)


def _zip64_claim(path: Path, entries: int) -> Path:
  """Rewrites the end of a zip archive (no comment) to a zip64 end record claiming `entries`."""
  data = path.read_bytes()
  end = len(data) - 22
  assert data[end:end + 4] == b"PK\x05\x06"
  cd_bytes, cd_at = struct.unpack("<II", data[end + 12:end + 20])
  record = (b"PK\x06\x06" + struct.pack("<QHHII", 44, 45, 45, 0, 0)
            + struct.pack("<QQQQ", entries, entries, cd_bytes, cd_at))
  locator = b"PK\x06\x07" + struct.pack("<IQI", 0, end, 1)
  last = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 0xFFFF, 0xFFFF, cd_bytes, cd_at, 0)
  path.write_bytes(data[:end] + record + locator + last)
  return path


def test_zip_entry_count_is_capped(tmp_path, monkeypatch):
  claim = _zip64_claim(_one_tensor(tmp_path / "claim.pth"), 10**6)
  with pytest.raises(errors.UserError, match=r"claim.pth' is a zip archive of 1,000,000 entries"):
    torch_pickle.load(claim)
  many = _archive(tmp_path / "many.pth", _program(_dict(("w", _tensor("0", 4, (4,), (1,))))),
                  {str(i): bytes(16) for i in range(40)})
  assert torch_pickle.load(many)["w"].shape == (4,)
  monkeypatch.setattr(torch_pickle, "MAX_ENTRIES", 32)
  with pytest.raises(errors.UserError, match=r"many.pth' is a zip archive of 42 entries .* more "
                                             r"than the 32 entries"):
    torch_pickle.load(many)

def _one_tensor(path: Path, compression: int = zipfile.ZIP_STORED) -> Path:
  return _archive(path, _program(_dict(("w", _tensor("0", 4, (4,), (1,))))),
                  {"0": np.arange(4, dtype=np.float32).tobytes()}, compression)


def test_compressed_entries_are_refused(tmp_path):
  path = _one_tensor(tmp_path / "deflated.pth", zipfile.ZIP_DEFLATED)
  with pytest.raises(errors.UserError, match=r"deflated.pth'.*'archive/data.pkl' is compressed"):
    torch_pickle.load(path)
  # Only the storage deflated: 64 MiB of zeros in 64 KiB would inflate to a 64 MiB array.
  with zipfile.ZipFile(tmp_path / "bomb.pth", "w") as zf:
    zf.writestr("archive/data.pkl",
                _program(_dict(("w", _tensor("0", 16 << 20, (16 << 20,), (1,))))))
    zf.writestr("archive/data/0", b"\0" * (64 << 20), compress_type=zipfile.ZIP_DEFLATED)
  assert (tmp_path / "bomb.pth").stat().st_size < 1 << 20
  with pytest.raises(errors.UserError, match=r"'archive/data/0' is compressed \(zip method 8\)"):
    torch_pickle.load(tmp_path / "bomb.pth")


def _patch_sizes(path: Path, name: str, size: int) -> None:
  """Rewrites the sizes the central directory declares for entry `name`."""
  data = bytearray(path.read_bytes())
  start = data.index(b"PK\x01\x02")
  while data[start + 46:start + 46 + len(name)] != name.encode():
    start = data.index(b"PK\x01\x02", start + 4)
  data[start + 20:start + 28] = struct.pack("<II", size, size)  # compressed, plain size
  path.write_bytes(bytes(data))


def test_declared_sizes_are_checked_against_the_archive(tmp_path):
  path = _one_tensor(tmp_path / "liar.pth")
  _patch_sizes(path, "archive/data/0", 2**31)
  with zipfile.ZipFile(path) as zf:
    assert zf.getinfo("archive/data/0").file_size == 2**31  # the lie is what zipfile reports
  with pytest.raises(errors.UserError, match=r"'archive/data/0' claims 2,147,483,648 bytes.*more "
                                          r"than the archive's"):
    torch_pickle.load(path)


def test_negative_storage_sizes_are_refused(tmp_path):
  pkl = _program(_dict(("w", _tensor("0", -1, (4,), (1,)))))
  path = _archive(tmp_path / "neg.pth", pkl, {"0": np.zeros(1000, np.float32).tobytes()})
  with pytest.raises(errors.UserError, match="neg.pth'.*storage '0' has -1 elements"):
    torch_pickle.load(path)


def test_the_pickle_is_read_with_a_cap(tmp_path, monkeypatch):
  path = _one_tensor(tmp_path / "m.pth")
  size = zipfile.ZipFile(path).getinfo("archive/data.pkl").file_size
  monkeypatch.setattr(torch_pickle, "MAX_PICKLE_BYTES", size - 1)
  with pytest.raises(errors.UserError, match=f"has {size:,} bytes, more than the {size - 1:,}"):
    torch_pickle.load(path)
  monkeypatch.setattr(torch_pickle, "MAX_PICKLE_BYTES", size)
  np.testing.assert_array_equal(torch_pickle.load(path)["w"], np.arange(4, dtype=np.float32))


# --- the stand-ins: fresh for each load, never rewritten ---------------------------------------

@pytest.mark.parametrize("target,state", [
    # What made every later FloatStorage read as float16.
    (_global("torch", "FloatStorage"),
     _dict(("dtype", _global("numpy", "dtype") + _tuple(_str("f2")) + pickle.REDUCE))),
    # (state, slotstate): setattr on the allow-listed function itself.
    (_global("torch._utils", "_rebuild_tensor_v2"),
     _tuple(pickle.NONE, _dict(("__defaults__", _tuple(_int(7)))))),
    (_global("collections", "OrderedDict"), _dict(("x", _int(1)))),
])
def test_build_cannot_rewrite_the_stand_ins(tmp_path, target, state):
  evil = _archive(tmp_path / "evil.pth", _program(target + state + pickle.BUILD))
  with pytest.raises(unpickler.UnsafePickle, match="evil.pth'.*sets attributes of a"):
    torch_pickle.load(evil)
  good = torch_pickle.load(_one_tensor(tmp_path / "good.pth"))["w"]
  assert good.dtype == np.float32
  np.testing.assert_array_equal(good, [0, 1, 2, 3])


def test_shared_storage_type_in_one_file_is_still_one_type(tmp_path):
  # Two tensors naming torch.FloatStorage, the second through the memo, as torch.save writes.
  first = _tensor("0", 4, (4,), (1,)).replace(_global("torch", "FloatStorage"),
                                              _global("torch", "FloatStorage") + _put(9))
  second = _tensor("1", 2, (2,), (1,)).replace(_global("torch", "FloatStorage"), _get(9))
  path = _archive(tmp_path / "two.pth", _program(_dict(("a", first), ("b", second))),
                  {"0": np.ones(4, np.float32).tobytes(), "1": np.ones(2, np.float32).tobytes()})
  back = torch_pickle.load(path)
  assert back["a"].dtype == back["b"].dtype == np.float32


# --- bounds on what the pickle builds -----------------------------------------------------------

def _load_body(tmp_path, body: bytes):
  return torch_pickle.load(_archive(tmp_path / "x.pth", _program(body)))


def test_shared_references_are_bounded_when_expanded(tmp_path):
  # 10**8 values once expanded, a few kilobytes on disk; refused without expanding them.
  with pytest.raises(errors.UserError, match="x.pth'.*more than 2,000,000 values once its shared"):
    _load_body(tmp_path, _shared_tower(8))
  back = _load_body(tmp_path, _shared_tower(3))  # 10**3: fine, and shared as in the file
  assert back["k0"] is back["k9"] and back["k0"]["k0"]["k0"] == "leaf"


@pytest.mark.parametrize("body,pattern", [
    (pickle.EMPTY_LIST + _put(0) + _get(0) + pickle.APPEND, "a list that contains itself"),
    (pickle.EMPTY_LIST * 1000 + pickle.APPEND * 999, "more than 100 levels deep"),
    (_dict(("k", pickle.NONE)).replace(_str("k"), _tuple(_int(1), _int(2))),
     "a tuple as a dict key"),
    (pickle.EMPTY_DICT + pickle.LONG1 + b"\x09" + (2**64).to_bytes(9, "little") + pickle.NONE
     + pickle.SETITEM, "a 65-bit integer as a dict key"),
    (_global("builtins", "set") + _tuple(pickle.EMPTY_LIST + pickle.MARK + _tuple(_int(1))
                                         + pickle.APPENDS) + pickle.REDUCE,
     "a tuple as a dict key or set member"),
    (pickle.LONG4 + struct.pack("<I", 1000) + b"\x01" * 1000, "holds a 7993-bit integer"),
    (_str("a") + pickle.EMPTY_TUPLE + pickle.REDUCE, "the pickle calls a str"),
    (_global("torch", "FloatStorage") + pickle.EMPTY_TUPLE + pickle.REDUCE,
     "calls torch.FloatStorage"),
    (pickle.MARK + pickle.NONE + pickle.DICT, "odd number of items for a dict"),
    (_global("builtins", "dict") + pickle.EMPTY_TUPLE + pickle.NEWOBJ,
     "refusing to unpickle builtins.dict"),
    (pickle.EMPTY_TUPLE + pickle.NEWOBJ, "refusing to unpickle opcode NEWOBJ"),
])
def test_structures_no_checkpoint_has_are_refused(tmp_path, body, pattern):
  with pytest.raises(errors.UserError, match=pattern) as e:
    _load_body(tmp_path, body)
  assert str(e.value).startswith(repr(str(tmp_path / "x.pth"))) and "\n" not in str(e.value)


def test_value_count_and_time_are_bounded(tmp_path, monkeypatch):
  flat = pickle.EMPTY_LIST + pickle.MARK + pickle.NONE * 2000 + pickle.APPENDS
  assert len(_load_body(tmp_path, flat)) == 2000
  monkeypatch.setattr(torch_pickle, "LIMITS", unpickler.Limits(nodes=1000))
  with pytest.raises(errors.UserError, match="more than 1,000 pickled values"):
    _load_body(tmp_path, flat)
  monkeypatch.setattr(torch_pickle, "LIMITS", unpickler.Limits(seconds=0))
  with pytest.raises(errors.UserError, match="took more than 0 s to unpickle"):
    _load_body(tmp_path, flat)


def test_tensor_views_are_checked_against_file_and_memory(tmp_path, monkeypatch):
  # A view that repeats its one stored element within reason (torch's expand()) still loads.
  pkl = _program(_dict(("w", _tensor("0", 3, (4, 3), (0, 1)))))
  small = _archive(tmp_path / "expand.pth", pkl, {"0": np.array([1, 2, 3], np.float32).tobytes()})
  np.testing.assert_array_equal(torch_pickle.load(small)["w"], np.tile([1, 2, 3], (4, 1)))
  # Within the file's budget but not the memory free: refused before allocating.
  monkeypatch.setattr(torch_pickle, "_free_memory", lambda: 40)
  with pytest.raises(errors.UserError, match=r"expand.pth'.*size \[4, 3\] \(float32\) needs 48 "
                                          r"bytes, but only 28 bytes of memory is free"):
    torch_pickle.load(small)
  monkeypatch.setattr(torch_pickle, "_free_memory", lambda: 8)
  with pytest.raises(errors.UserError, match=r"expand.pth'.*storage '0' \(3 float32 values\) "
                                          r"needs 12 bytes, but only 8 bytes"):
    torch_pickle.load(small)


def test_free_memory_sees_the_address_space_limit():
  code = "from bonejax.convert import torch_pickle; print(torch_pickle._free_memory())"
  r = subprocess.run([sys.executable, "-c", _LIMITED.format(MEMORY_LIMIT), "-c", code],
                     capture_output=True, text=True, cwd=REPO, timeout=120,
                     env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
  assert r.returncode == 0, r.stderr[-2000:]
  assert 0 < int(r.stdout) < MEMORY_LIMIT


def test_real_torch_expand_views_load(tmp_path):
  torch = require("torch")
  base = torch.arange(3, dtype=torch.float32)
  torch.save({"e": base.expand(5, 3), "t": base}, tmp_path / "e.pth")
  back = torch_pickle.load(tmp_path / "e.pth")
  np.testing.assert_array_equal(back["e"], base.expand(5, 3).numpy())


# --- metadata made plain: bounded whatever the object graph ------------------------------------

def test_plain_metadata_is_bounded_for_shared_towers():
  leaf: dict = {"x": 1}
  tower = leaf
  for _ in range(40):
    tower = {f"k{j}": tower for j in range(10)}
  cyclic: list = []
  cyclic.append(cyclic)
  out = checkpoint._plain({"big": 2**100, "text": "t" * 10**6, "cyclic": cyclic, "tower": tower,
                           "list": list(range(50))})
  text = json.dumps(out)
  assert len(text) < 40 * checkpoint.PLAIN_NODES
  assert out["big"] == "<101-bit integer>" and out["text"] == "<text of 1,000,000 characters>"
  assert out["cyclic"] == [[[[[[[["..."]]]]]]]]  # the list inside 8 levels of itself
  assert "list" not in out and out["..."] == "..."  # the budget went to the tower
  small = {"a": [1, 2.5, None, True], "n": {"m": (1, 2)}, "s": leaf, "t": leaf}
  assert checkpoint._plain(small) == {"a": [1, 2.5, None, True], "n": {"m": [1, 2]},
                                      "s": {"x": 1}, "t": {"x": 1}}
