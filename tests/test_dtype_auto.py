"""bonejax.core.dtype_auto: `auto` from the CPU's flags (fake /proc/cpuinfo files) or the backend."""

import pytest

from bonejax.core import dtype_auto, errors


@pytest.fixture(autouse=True)
def unpinned(monkeypatch):
  """The detection itself: without tests/conftest.py's float32 pin."""
  monkeypatch.delenv(dtype_auto.ENV, raising=False)


@pytest.mark.parametrize("pin", ["float32", "bfloat16", "float16"])
def test_environment_pins_auto(tmp_path, monkeypatch, pin):
  monkeypatch.setenv(dtype_auto.ENV, pin)
  assert dtype_auto.resolve("auto", "cpu", _cpuinfo(tmp_path, CPUINFO["amx"])) == pin
  assert dtype_auto.auto_dtype("gpu") == pin


def test_bad_pin_is_a_user_error(monkeypatch):
  monkeypatch.setenv(dtype_auto.ENV, "int8")
  with pytest.raises(errors.UserError, match=dtype_auto.ENV):
    dtype_auto.auto_dtype("cpu")

_BASE = "fpu vme de pse tsc msr pae mce cx8 sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma"
CPUINFO = {
    # a Sapphire Rapids Xeon: AMX
    "amx": _BASE + " avx512f avx512bw avx512_vnni amx_bf16 amx_tile amx_int8",
    # an AMD EPYC Zen 4: AVX512-BF16, no AMX
    "avx512_bf16": _BASE + " avx512f avx512bw avx512_bf16 avx512_vnni",
    # a Skylake-SP Xeon: AVX-512 without bf16
    "avx512": _BASE + " avx512f avx512bw avx512vl",
    # an AVX2 EPYC (Zen 2)
    "avx2": _BASE,
}


def _cpuinfo(tmp_path, flags: str, processors: int = 2):
  text = "".join(f"processor\t: {i}\nvendor_id\t: X\nmodel name\t: fake\nflags\t\t: {flags}\n"
                 f"bugs\t\t: spectre_v1 avx512_bf16_fake\n\n" for i in range(processors))
  path = tmp_path / "cpuinfo"
  path.write_text(text)
  return path


@pytest.mark.parametrize("kind,expected", [("amx", "bfloat16"), ("avx512_bf16", "bfloat16"),
                                           ("avx512", "float32"), ("avx2", "float32")])
def test_cpu_choice_from_flags(tmp_path, kind, expected):
  path = _cpuinfo(tmp_path, CPUINFO[kind])
  assert dtype_auto.auto_dtype("cpu", path) == expected
  assert dtype_auto.resolve("auto", "cpu", path) == expected
  assert dtype_auto.resolve("AUTO", "cpu", path) == expected


def test_flags_read_from_the_flags_line_only(tmp_path):
  # a flag named only on another line (`bugs` here) does not count
  path = _cpuinfo(tmp_path, CPUINFO["avx2"])
  assert "avx512_bf16_fake" not in dtype_auto.cpu_flags(path)
  assert dtype_auto.cpu_flags(path) == frozenset(CPUINFO["avx2"].split())


def test_no_cpuinfo_means_float32(tmp_path):
  missing = tmp_path / "absent"
  assert dtype_auto.cpu_flags(missing) == frozenset()
  assert dtype_auto.auto_dtype("cpu", missing) == "float32"
  empty = tmp_path / "empty"
  empty.write_text("processor\t: 0\n")
  assert dtype_auto.auto_dtype("cpu", empty) == "float32"


@pytest.mark.parametrize("platform", ["gpu", "cuda", "rocm", "tpu"])
def test_accelerators_get_bf16_whatever_the_host_cpu(tmp_path, platform):
  assert dtype_auto.auto_dtype(platform, _cpuinfo(tmp_path, CPUINFO["avx2"])) == "bfloat16"


def test_explicit_dtypes_pass_through(tmp_path):
  path = _cpuinfo(tmp_path, CPUINFO["amx"])
  for name in ("float32", "bfloat16", "float16", None):
    assert dtype_auto.resolve(name, "cpu", path) == name


def test_default_platform_is_jax_backend():
  import jax
  expected = dtype_auto.auto_dtype(jax.default_backend())
  assert dtype_auto.auto_dtype() == expected
  assert expected in ("float32", "bfloat16")


@pytest.mark.parametrize("device_choice", ["bfloat16", "float32"])
def test_predictor_runs_auto_as_the_device_choice(tmp_path, monkeypatch, device_choice):
  import numpy as np
  from bundle_helpers import make_bundle, phantom
  from bonejax import predict
  monkeypatch.setattr(dtype_auto, "auto_dtype", lambda *a, **k: device_choice)
  path = make_bundle(tmp_path / "model", depth=1, width=4)
  auto = predict.Predictor(path, planes=1, dtype="auto", batch_size=2, progress=False)
  assert auto.settings.dtype == device_choice
  named = predict.Predictor(path, planes=1, dtype=device_choice, batch_size=2, progress=False)
  vol = phantom((2, 32, 32))
  got, _, _ = auto.predict_volume(vol)
  want, _, _ = named.predict_volume(vol)
  np.testing.assert_array_equal(got, want)  # the same dtype: the same labels


def test_predict_command_defaults_to_auto():
  import subprocess
  import sys
  from pathlib import Path
  repo = Path(__file__).resolve().parents[1]
  out = subprocess.run([sys.executable, "launch/predict.py", "--help"], cwd=repo, text=True,
                       capture_output=True, timeout=300, check=True).stdout
  flag = out[out.index("--dtype:"):].split("\n  --")[0]
  assert "(default: 'auto')" in " ".join(flag.split())
