"""Where bonejax keeps what it computes once per user and machine: one rule for every cache.

    $BONEJAX_CACHE_DIR/SUB           when set (one root for all of bonejax's caches)
    $XDG_CACHE_HOME/bonejax/SUB      else, when set (the freedesktop convention)
    ~/.cache/bonejax/SUB             else

Users of it: the persistent compilation cache (`compile_cache`, SUB "jax"), the compiled oneDNN
extension (`models/onednn/build.py`, "onednn") and the measured convolution lowerings
(`models/conv_lowering.py`, the file "conv_lowering.json"). Nothing is created here: each user
makes its directory when it first writes, and decides what a read-only home means for it.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
  """The directory all of bonejax's caches live under (see the module docstring)."""
  root = os.environ.get("BONEJAX_CACHE_DIR")
  if root:
    return Path(root).expanduser()
  xdg = os.environ.get("XDG_CACHE_HOME")
  # The XDG spec says a relative path is invalid and to be ignored.
  base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
  return base / "bonejax"


def user_cache_dir(sub: str = "") -> Path:
  """`cache_root() / sub`: a directory (or file) name under the per-user cache root."""
  return cache_root() / sub if sub else cache_root()
