"""JAX's persistent compilation cache, on by default: a second run on a same-shaped scan skips XLA.

A user runs `predict.py` once per scan, and every fresh process compiles the same plane
functions again (minutes on a CPU for a ResNet U-Net). JAX can keep compiled executables on
disk, keyed by the lowered program, the compile options, the backend and the jax/jaxlib
versions; a later process with the same key loads the executable instead of compiling.

`setup()` turns it on, once per process, before the first compilation (JAX decides whether to
use the cache at its first compile and does not look again):

  directory  $BONEJAX_CACHE_DIR/jax, else $XDG_CACHE_HOME/bonejax/jax, else ~/.cache/bonejax/jax
             (made private to the user: JAX treats the cache as trusted code). A directory the
             user already gave JAX (JAX_COMPILATION_CACHE_DIR, jax.config) is kept.
  off        `--compilation_cache=false` on the commands that compile, or the environment
             variable BONEJAX_COMPILATION_CACHE=0 (also for the napari widgets).

Entries below `MIN_COMPILE_SECONDS` of compile time are not written: loading one costs about
what compiling it does, and the cache would fill with the many tiny helper functions.

Every new shape, model and jax version adds entries and JAX removes none by default, so
`setup()` prunes the directory to `MAX_BYTES` (2 GiB), least recently used entries first, each
time a process starts: the cache exceeds the cap by at most what one run adds. Not JAX's own cap
(jax_compilation_cache_max_size): its eviction needs an access-time file beside every entry and
fails on each write (a warning each) once a process without the cap - an older bonejax, plain
JAX - shares the directory. The user's own JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS and
JAX_COMPILATION_CACHE_MAX_SIZE (JAX's cap instead of the pruning) win.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bonejax.core import cache_dirs, errors

ENV = "BONEJAX_COMPILATION_CACHE"
MIN_COMPILE_SECONDS = 0.5
MAX_BYTES = 2 << 30
_OFF = ("0", "false", "no", "off")
_ON = ("", "1", "true", "yes", "on")

_state: dict = {"done": False, "dir": None}
_flag = None


def cache_dir() -> Path:
  """Where the cache lives for this user (see the module docstring)."""
  return cache_dirs.user_cache_dir("jax")


def wanted(flag: bool | None = None) -> bool:
  """The flag when given, else the environment variable, else on."""
  if flag is not None:
    return bool(flag)
  value = os.environ.get(ENV, "").strip().lower()
  if value in _OFF:
    return False
  if value in _ON:
    return True
  raise errors.UserError(f"{ENV}={os.environ[ENV]!r}: use 0 (off) or 1 (on)")


def define_flag():
  """`--compilation_cache` for a command that compiles (once per process; returns the holder)."""
  global _flag
  if _flag is None:
    from absl import flags
    # Listed under the calling command in its --help (absl names a script run as __main__ by
    # its path), not under this module in --helpfull only.
    caller = sys._getframe(1).f_globals.get("__name__", __name__)
    _flag = flags.DEFINE_bool(
        "compilation_cache", None,
        "Keep compiled XLA programs on disk (JAX's persistent compilation cache, in "
        f"$XDG_CACHE_HOME/bonejax/jax or ~/.cache/bonejax/jax, pruned to "
        f"{MAX_BYTES >> 30} GiB) so that the next run on a same-shaped input starts at once. "
        f"Default: on, unless {ENV}=0.",
        module_name=sys.argv[0] if caller == "__main__" else caller)
  return _flag


def setup(enabled: bool | None = None) -> Path | None:
  """Turns the persistent cache on (or leaves it off); returns its directory, None when off.

  Call it before anything compiles. Later calls return the first call's answer: JAX has
  decided by then.
  """
  if _state["done"]:
    return _state["dir"]
  _state["done"] = True
  if not wanted(enabled):
    return None
  import jax
  given = jax.config.jax_compilation_cache_dir
  if given:  # the user's own choice (JAX_COMPILATION_CACHE_DIR, a test suite): keep it
    _state["dir"] = Path(given)
    return _state["dir"]
  path = cache_dir()
  try:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
  except OSError as e:  # a read-only home: run without the cache rather than fail the job
    errors.warn(f"no compilation cache ({errors.one_line(e)}); every run compiles afresh")
    return None
  jax.config.update("jax_compilation_cache_dir", str(path))
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # else the user's value
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:  # else JAX's own cap, as asked
    prune(path, MAX_BYTES)
  _state["dir"] = path
  return path


def prune(path: Path, max_bytes: int) -> int:
  """Deletes the least recently used entries of the cache in `path` until the rest fit in
  `max_bytes`; returns the bytes deleted. Last use: the newest of the entry's access and
  modification times and JAX's access-time file (KEY-atime, where JAX's own cap wrote one).

  Another process may delete or read the same entries meanwhile: a file already gone is
  skipped, and a read that loses its entry only compiles again.
  """
  entries = []
  for entry in path.glob("*-cache"):
    atime = entry.with_name(entry.name[:-len("-cache")] + "-atime")
    try:
      st = entry.stat()
      used = max(st.st_atime_ns, st.st_mtime_ns)
      if atime.exists():
        used = max(used, int.from_bytes(atime.read_bytes()[:8], "little"))
    except OSError:
      continue
    entries.append((used, st.st_size, entry, atime))
  total = sum(e[1] for e in entries)
  freed = 0
  for _, size, entry, atime in sorted(entries, key=lambda e: e[0]):
    if total - freed <= max_bytes:
      break
    try:
      entry.unlink()
      atime.unlink(missing_ok=True)
      freed += size
    except FileNotFoundError:
      freed += size  # another process pruned it
    except OSError:
      continue
  return freed


def setup_from_flag() -> Path | None:
  """`setup()` with the value of `--compilation_cache` (defined by `define_flag()`)."""
  return setup(_flag.value if _flag is not None else None)


def _reset_for_tests() -> None:
  _state.update(done=False, dir=None)
