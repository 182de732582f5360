"""Test-suite set-up: 4 fake CPU devices so the sharded paths run on any machine, and the
`tiny_dataset` fixture the trainer's test modules share (tests/train_helpers.py)."""

import os
import sys
import tempfile
from pathlib import Path

import pytest

# Must happen before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
# Many tests compile the same tiny models; a persistent cache shares them across tests (and
# the subprocesses the CLI tests start), which on 2 CPU cores saves minutes.
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                               os.path.join(tempfile.gettempdir(), "bonejax-test-jax-cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
  """3 phantom scans of 32 x 48 x 48, made once per test module that trains on them."""
  import train_helpers  # tests/ is on sys.path (pytest puts it there for this conftest)
  return train_helpers.phantom_dataset(tmp_path_factory)
