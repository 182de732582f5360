"""Tests for bonejax/convert/torch_pickle.py and safetensors_io.py: files torch writes are read,
files bonejax writes load in torch (weights_only), and no pickled code ever runs."""

import collections
import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from bonejax.core import errors
from bonejax.convert import safetensors_io, torch_pickle
from smp_reference import require

REPO = Path(__file__).resolve().parents[1]

ARRAYS = {
    "f32": np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 7.5,
    "f64": np.linspace(-1, 1, 5),
    "f16": np.array([0.5, -2.0], np.float16),
    "bf16": np.array([1.5, -3.0, 0.0], ml_dtypes.bfloat16),
    "i64_scalar": np.array(0, np.int64),
    "i32": np.array([[1, -2]], np.int32),
    "u8": np.array([255, 0], np.uint8),
    "bool": np.array([True, False]),
    "empty": np.zeros((0, 3), np.float32),
}


def _zip_with_pickle(path, payload: bytes, name="archive"):
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr(f"{name}/data.pkl", payload)
    zf.writestr(f"{name}/version", "3\n")
  return path


def test_round_trip_of_arrays_and_plain_values(tmp_path):
  obj = {"model_state": collections.OrderedDict(ARRAYS),
         "metadata": {"name": "Unet", "n": 3, "big": 2**40, "neg": -5, "x": 0.25, "ok": True,
                      "none": None, "list": [1, "a", [2.5]], "tuple": (1, 2), "empty": {}}}
  torch_pickle.save(obj, tmp_path / "m.pth")
  back = torch_pickle.load(tmp_path / "m.pth")
  assert isinstance(back["model_state"], collections.OrderedDict)
  assert list(back["model_state"]) == list(ARRAYS)
  for k, a in ARRAYS.items():
    b = back["model_state"][k]
    assert b.dtype == a.dtype and b.shape == a.shape, k
    np.testing.assert_array_equal(b, a)
  assert back["metadata"] == obj["metadata"]


def test_safetensors_round_trip_and_truncation(tmp_path):
  arrays = {k: v for k, v in ARRAYS.items() if k != "empty"}
  safetensors_io.save(arrays, tmp_path / "m.safetensors", {"classes": '["a", "b"]'})
  back, meta = safetensors_io.load(tmp_path / "m.safetensors")
  assert meta == {"classes": '["a", "b"]'}
  for k, a in arrays.items():
    assert back[k].dtype == a.dtype and back[k].shape == a.shape
    np.testing.assert_array_equal(back[k], a)
  data = (tmp_path / "m.safetensors").read_bytes()
  (tmp_path / "cut.safetensors").write_bytes(data[:-3])
  with pytest.raises(errors.UserError, match="not a valid .safetensors.*truncated"):
    safetensors_io.load(tmp_path / "cut.safetensors")
  (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 16)
  with pytest.raises(errors.UserError, match="not a valid .safetensors"):
    safetensors_io.load(tmp_path / "junk.safetensors")


class _Gadget:
  """What an attacker pickles: unpickling it would run a shell command."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["top", "metadata", "tensor_list"])
def test_pickle_gadget_is_refused_and_never_runs(tmp_path, where):
  marker = tmp_path / "pwned"
  gadget = _Gadget(marker)
  obj = {"top": gadget,
         "metadata": {"model_state": {"w": 1.0}, "metadata": {"note": gadget}},
         "tensor_list": [1, 2, {"x": gadget}]}[where]
  path = _zip_with_pickle(tmp_path / "evil.pth", pickle.dumps(obj, protocol=2))
  with pytest.raises(torch_pickle.UnsafePickle, match=r"refusing to unpickle (posix|os)\.system"):
    torch_pickle.load(path)
  assert not marker.exists()


@pytest.mark.parametrize("payload", [
    b"cbuiltins\neval\n(S'1+1'\ntR.",  # protocol 0
    b"\x80\x02cbuiltins\ngetattr\n.",
    b"\x80\x02ccopyreg\n_reconstructor\n.",
    b"\x80\x02ctorch.nn.modules.conv\nConv2d\n)\x81.",  # a pickled module object (NEWOBJ)
    b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x8c\x05popen\x93.",  # STACK_GLOBAL
])
def test_names_outside_the_allow_list_are_refused(tmp_path, payload):
  path = _zip_with_pickle(tmp_path / "x.pth", payload)
  with pytest.raises(torch_pickle.UnsafePickle, match="refusing to unpickle"):
    torch_pickle.load(path)


def test_damaged_and_foreign_files_are_one_line_errors(tmp_path):
  torch_pickle.save({"w": np.ones((64, 64), np.float32)}, tmp_path / "ok.pth")
  data = (tmp_path / "ok.pth").read_bytes()
  (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
  cases = {
      "cut.pth": "damaged zip archive",
      "bare.pth": "bare pickle",
      "text.pth": "not a PyTorch checkpoint",
      "legacy.pth": "legacy \\(pre-1.6\\) format",
      "ts.pth": "TorchScript",
      "other.zip": "not a torch.save checkpoint",
      "badstorage.pth": "storage '0' is missing",
      "persid.pth": "unexpected persistent id",
  }
  (tmp_path / "bare.pth").write_bytes(pickle.dumps({"w": 1}, protocol=2))
  (tmp_path / "text.pth").write_text("hello")
  # What torch.save(..., _use_new_zipfile_serialization=False) starts with.
  (tmp_path / "legacy.pth").write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"\x80")
  with zipfile.ZipFile(tmp_path / "ts.pth", "w") as zf:
    zf.writestr("m/data.pkl", b"\x80\x02}.")
    zf.writestr("m/code/__torch__.py", "")
  with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
    zf.writestr("readme.txt", "hi")
  with zipfile.ZipFile(tmp_path / "ok.pth") as src, \
      zipfile.ZipFile(tmp_path / "badstorage.pth", "w") as dst:
    for n in src.namelist():
      if not n.endswith("data/0"):
        dst.writestr(n, src.read(n))
  _zip_with_pickle(tmp_path / "persid.pth", b"\x80\x02X\x03\x00\x00\x00abcQ.")
  for name, pattern in cases.items():
    with pytest.raises(errors.UserError, match=pattern) as e:
      torch_pickle.load(tmp_path / name)
    assert "\n" not in str(e.value), name


def test_tensor_records_reaching_past_their_storage_are_refused(tmp_path):
  w = torch_pickle._Writer()
  w.op(b"\x80\x02")
  w.value({"w": np.zeros(4, np.float32)})
  w.op(b".")
  payload = w.out.getvalue().replace(b"J\x04\x00\x00\x00t", b"J\x40\x00\x00\x00t", 1)  # size 64
  with zipfile.ZipFile(tmp_path / "x.pth", "w") as zf:
    zf.writestr("archive/data.pkl", payload)
    zf.writestr("archive/data/0", np.zeros(4, np.float32).tobytes())
  with pytest.raises(errors.UserError, match="corrupt"):
    torch_pickle.load(tmp_path / "x.pth")


def test_importing_the_converter_does_not_import_torch():
  code = ("import sys, bonejax.convert, bonejax.convert.weights, bonejax.convert.checkpoint; "
          "import bonejax.convert.metadata; "
          "assert 'torch' not in sys.modules and 'safetensors' not in sys.modules, "
          "sorted(m for m in sys.modules if m.startswith(('torch', 'safetensors')))")
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                     env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)},
                     timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]


# --- against real torch ------------------------------------------------------------------------

def test_files_written_by_torch_are_read(tmp_path):
  torch = require("torch")
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
  sd = net.state_dict()  # an OrderedDict with a `_metadata` attribute (BUILD opcode)
  obj = {"model_state": sd,
         "views": {"t": base.t(), "slice": base[1:3, ::2], "shared": base[2]},  # one storage
         "half": torch.tensor([1.5, -2], dtype=torch.float16),
         "bf16": torch.tensor([1.5, -2], dtype=torch.bfloat16),
         "param": torch.nn.Parameter(torch.ones(2)),
         "metadata": {"size": torch.Size([1, 2]), "dtype": torch.float32, "dev": torch.device("cpu"),
                      "np": np.float64(0.5), "bytes": b"\x00\x01", "set": {1}}}
  torch.save(obj, tmp_path / "t.pth")
  back = torch_pickle.load(tmp_path / "t.pth")
  for k, v in sd.items():
    np.testing.assert_array_equal(back["model_state"][k], v.numpy())
  assert back["model_state"]["1.num_batches_tracked"].dtype == np.int64
  for k, v in obj["views"].items():
    np.testing.assert_array_equal(back["views"][k], v.numpy())
  np.testing.assert_array_equal(back["half"], obj["half"].numpy())
  np.testing.assert_array_equal(back["bf16"].astype(np.float32), [1.5, -2])
  np.testing.assert_array_equal(back["param"], [1, 1])
  assert back["metadata"] == {"size": (1, 2), "dtype": "torch.float32", "dev": "cpu", "np": 0.5,
                              "bytes": b"\x00\x01", "set": {1}}


def test_files_written_here_load_in_torch_weights_only(tmp_path):
  torch = require("torch")
  obj = collections.OrderedDict((k, v) for k, v in ARRAYS.items() if k != "bf16")
  obj["bf16"] = ARRAYS["bf16"]
  torch_pickle.save({"state": obj, "meta": {"a": [1, 2.5, None, True]}}, tmp_path / "m.pth")
  for mmap in (False, True):
    back = torch.load(tmp_path / "m.pth", weights_only=True, mmap=mmap)
    assert back["meta"] == {"a": [1, 2.5, None, True]}
    for k, a in obj.items():
      t = back["state"][k]
      assert tuple(t.shape) == a.shape, k
      np.testing.assert_array_equal(t.float().numpy() if k == "bf16" else t.numpy(),
                                    a.astype(np.float32) if k == "bf16" else a)
  assert back["state"]["i64_scalar"].dtype == torch.int64 and back["state"]["i64_scalar"].dim() == 0


def test_safetensors_written_here_load_in_the_reference_library(tmp_path):
  st = require("safetensors.numpy")
  arrays = {k: v for k, v in ARRAYS.items() if k not in ("bf16", "empty")}
  safetensors_io.save(arrays, tmp_path / "m.safetensors", {"k": "v"})
  back = st.load_file(str(tmp_path / "m.safetensors"))
  for k, a in arrays.items():
    np.testing.assert_array_equal(back[k], a)
  st.save_file(arrays, str(tmp_path / "ref.safetensors"), metadata={"x": "1"})
  mine, meta = safetensors_io.load(tmp_path / "ref.safetensors")
  assert meta == {"x": "1"} and set(mine) == set(arrays)
