"""bonejax.core.compile_cache: where the cache goes, how it is turned off, and that a second
process loads what the first compiled (JAX's persistent cache on the CPU backend)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bonejax.core import compile_cache, errors

REPO = Path(__file__).resolve().parents[1]


def test_cache_dir_order(monkeypatch, tmp_path):
  """Every per-user cache follows one rule (core/cache_dirs.py): BONEJAX_CACHE_DIR, then
  XDG_CACHE_HOME (absolute paths only, as the XDG spec says), then ~/.cache."""
  from bonejax.core import cache_dirs
  from bonejax.models.onednn import build
  monkeypatch.delenv("BONEJAX_CACHE_DIR", raising=False)
  monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  home = tmp_path / "home" / ".cache" / "bonejax"
  assert compile_cache.cache_dir() == home / "jax"
  assert build.cache_dir() == home / "onednn"
  monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # invalid: ignored
  assert cache_dirs.user_cache_dir("x") == home / "x"
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compile_cache.cache_dir() == tmp_path / "xdg" / "bonejax" / "jax"
  assert build.cache_dir() == tmp_path / "xdg" / "bonejax" / "onednn"
  monkeypatch.setenv("BONEJAX_CACHE_DIR", str(tmp_path / "bj"))
  assert compile_cache.cache_dir() == tmp_path / "bj" / "jax"
  assert build.cache_dir() == tmp_path / "bj" / "onednn"
  assert cache_dirs.user_cache_dir() == tmp_path / "bj"


@pytest.mark.parametrize("value,expected", [("", True), ("1", True), ("on", True),
                                            ("0", False), ("false", False), ("OFF", False)])
def test_environment_variable(monkeypatch, value, expected):
  monkeypatch.setenv(compile_cache.ENV, value)
  assert compile_cache.wanted() is expected
  assert compile_cache.wanted(True) is True  # the flag, when given, wins
  assert compile_cache.wanted(False) is False


def test_bad_environment_value_is_a_user_error(monkeypatch):
  monkeypatch.setenv(compile_cache.ENV, "maybe")
  with pytest.raises(errors.UserError, match=compile_cache.ENV):
    compile_cache.wanted()


_CHILD = r"""
import json, os, sys, time
os.environ["JAX_PLATFORMS"] = "cpu"
from bonejax.core import compile_cache
path = compile_cache.setup(None if sys.argv[1] == "default" else sys.argv[1] == "on")
import jax, jax.numpy as jnp
from jax import monitoring

events = []
monitoring.register_event_listener(lambda name, **kw: events.append(name))

def f(x):  # enough work that XLA:CPU takes a measurable time to compile it
  for i in range(60):
    x = jnp.tanh(x @ x.T + i) * 0.5
  return x.sum()

jax.jit(f)(jnp.ones((8, 8))).block_until_ready()
print(json.dumps({"dir": str(path) if path else None,
                  "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "max_size": jax.config.jax_compilation_cache_max_size}))
"""


def _child(mode: str, tmp_path: Path, **env) -> dict:
  full = {k: v for k, v in os.environ.items()
          if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_MAX_SIZE",
                       compile_cache.ENV)}
  full.update(BONEJAX_CACHE_DIR=str(tmp_path), PYTHONPATH=str(REPO), **env)
  out = subprocess.run([sys.executable, "-c", _CHILD, mode], env=full, cwd=REPO, check=True,
                       capture_output=True, text=True, timeout=300)
  assert "Error writing persistent compilation cache" not in out.stderr, out.stderr
  assert "Error reading persistent compilation cache" not in out.stderr, out.stderr
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_loads_what_the_first_compiled(tmp_path):
  # Every compile is written (the user's threshold 0 is kept), whatever the compile speed.
  env = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  first = _child("default", tmp_path, **env)
  # JAX's own cap stays off (-1): bonejax prunes at start-up instead.
  assert first == {"dir": str(tmp_path / "jax"), "hits": 0, "max_size": -1}
  assert any((tmp_path / "jax").iterdir())
  assert (tmp_path / "jax").stat().st_mode & 0o077 == 0  # private: JAX trusts its contents
  second = _child("default", tmp_path, **env)
  assert second["hits"] >= 1


def test_prune_drops_the_least_recently_used_entries(tmp_path):
  """The cap (MAX_BYTES) is kept by pruning at start-up, oldest use first: an entry's last use
  is the newest of its access / modification times and JAX's own access-time file."""
  now = 2_000_000_000
  for name, size, used, atime_file in (("a", 400, now - 300, None), ("b", 300, now - 400, now),
                                       ("c", 200, now - 200, None), ("d", 100, now - 100, None)):
    entry = tmp_path / f"{name}-cache"
    entry.write_bytes(b"x" * size)
    os.utime(entry, (used, used))
    if atime_file:
      (tmp_path / f"{name}-atime").write_bytes((atime_file * 10**9).to_bytes(8, "little"))
  (tmp_path / "unrelated.txt").write_bytes(b"x" * 5000)
  assert compile_cache.prune(tmp_path, 1000) == 0  # 1,000 bytes: fits
  assert compile_cache.prune(tmp_path, 700) == 400  # a, the oldest use (b's atime file: now)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "b-atime", "b-cache", "c-cache", "d-cache", "unrelated.txt"]
  assert compile_cache.prune(tmp_path, 300) == 300  # then c and d; b's last use is the newest
  assert sorted(p.name for p in tmp_path.iterdir()) == ["b-atime", "b-cache", "unrelated.txt"]


@pytest.fixture
def fresh_setup(monkeypatch):
  """setup() as if in a new process (it answers once per process), restored afterwards."""
  monkeypatch.setattr(compile_cache, "_state", {"done": False, "dir": None})


def test_flag_and_environment_turn_it_off(fresh_setup, monkeypatch, tmp_path):
  monkeypatch.setenv("BONEJAX_CACHE_DIR", str(tmp_path))
  assert compile_cache.setup(False) is None
  assert compile_cache.setup(True) is None  # decided once per process: JAX has decided too
  compile_cache._reset_for_tests()
  monkeypatch.setenv(compile_cache.ENV, "0")
  assert compile_cache.setup() is None
  assert not (tmp_path / "jax").exists()


def test_a_directory_given_to_jax_is_kept(fresh_setup, monkeypatch, tmp_path):
  import jax
  monkeypatch.setenv("BONEJAX_CACHE_DIR", str(tmp_path))
  given = jax.config.jax_compilation_cache_dir  # tests/conftest.py's shared test cache
  assert given
  assert compile_cache.setup() == Path(given)
  assert jax.config.jax_compilation_cache_dir == given
  assert not (tmp_path / "jax").exists()


_ONEDNN_CHILD = r"""
import json, os
os.environ["JAX_PLATFORMS"] = "cpu"
from bonejax.core import compile_cache
compile_cache.setup()
import jax, jax.numpy as jnp, numpy as np
from jax import monitoring
from bonejax.models import onednn
from bonejax.models.conv_lowering import ConvSpec

events = []
monitoring.register_event_listener(lambda name, **kw: events.append(name))
spec = ConvSpec(2, 16, 16, 8, 16, (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 1, "float32")
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((2, 16, 16, 8)), jnp.float32)
k = jnp.asarray(rng.standard_normal((3, 3, 8, 16)) * 0.2, jnp.float32)
b = jnp.zeros((16,), jnp.float32)
y = jax.jit(lambda x, k, b: onednn.conv(x, k, b, spec, relu=True))(x, k, b)
print(json.dumps({"available": onednn.available(), "sum": float(np.asarray(y, np.float64).sum()),
                  "hits": events.count("/jax/compilation_cache/cache_hits")}))
"""


def test_onednn_custom_calls_load_from_the_cache(tmp_path):
  """A cached executable that calls the oneDNN extension (an FFI target) runs in a new process:
  the target is registered while tracing, before the cache lookup."""
  from bonejax.models import onednn
  if not onednn.available():  # CI builds it (.ci/run installs libdnnl-dev and g++)
    pytest.skip(f"oneDNN extension not built here: {onednn.unavailable_reason()}")
  env = {k: v for k, v in os.environ.items() if k != compile_cache.ENV}
  env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax"), PYTHONPATH=str(REPO),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  runs = []
  for _ in range(2):
    out = subprocess.run([sys.executable, "-c", _ONEDNN_CHILD], env=env, cwd=REPO, check=True,
                         capture_output=True, text=True, timeout=300)
    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
  assert runs[0]["available"] and runs[0]["hits"] == 0
  assert runs[1]["hits"] >= 1
  assert runs[1]["sum"] == runs[0]["sum"]
