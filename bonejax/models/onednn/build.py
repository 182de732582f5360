"""Compiles the oneDNN convolution extension once per machine, into a per-user cache.

Why at first use and not in `pip install`: the extension is compiled against the XLA FFI headers
of the jaxlib that is *imported* (`jax.ffi.include_dir()`), and that jaxlib can change after
bonejax is installed (an upgrade, Python 3.12's newer jax); an install-time build would also
need jaxlib inside pip's isolated build environment (a second ~80 MB download) and would make a
missing compiler an install failure. Built here, the binary is keyed on everything it depends on
(source, jaxlib version and headers, oneDNN version, compiler), so a changed jaxlib simply builds
a new one; `pip install -e .` on a machine without oneDNN installs and runs unchanged.

    python -m bonejax.models.onednn.build      # build now (prints the path, or why not)

Needs: a C++17 compiler (`c++`/`g++`, or $CXX) and oneDNN 2.x headers and library (Debian /
Ubuntu: `apt-get install libdnnl-dev g++`; elsewhere $BONEJAX_DNNL_ROOT with include/ and lib/).
The binary goes to the per-user cache (`bonejax.core.cache_dirs`: $BONEJAX_CACHE_DIR/onednn/,
else $XDG_CACHE_HOME/bonejax/onednn/, else ~/.cache/bonejax/onednn/): compiled
under a temporary name, then renamed, under a file lock, so concurrent processes neither see a
half-written library nor compile twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bonejax.core import cache_dirs

SOURCE = Path(__file__).with_name("onednn_conv.cc")
NEEDS = ("the oneDNN fast path needs oneDNN 2.x and a C++ compiler "
         "(Debian/Ubuntu: apt-get install libdnnl-dev g++)")


class BuildError(RuntimeError):
  """Why the extension could not be built (one line)."""


def cache_dir() -> Path:
  """`cache_dirs.user_cache_dir("onednn")` (see the module docstring)."""
  return cache_dirs.user_cache_dir("onednn")


def _compiler() -> str:
  for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if cand and shutil.which(cand):
      return shutil.which(cand)
  raise BuildError(f"no C++ compiler found; {NEEDS}")


def _dnnl_dirs() -> tuple[list[str], list[str]]:
  """(include dirs, library dirs) holding dnnl.hpp and libdnnl.so."""
  roots = [os.environ.get("BONEJAX_DNNL_ROOT"), sys.prefix, "/usr/local", "/usr"]
  for root in filter(None, roots):
    inc = Path(root) / "include"
    if (inc / "dnnl.hpp").exists() or (inc / "oneapi" / "dnnl" / "dnnl.hpp").exists():
      libs = [p for p in (Path(root) / "lib", Path(root) / "lib64",
                          Path(root) / "lib" / "x86_64-linux-gnu",
                          Path(root) / "lib" / "aarch64-linux-gnu")
              if any(p.glob("libdnnl.so*"))]
      if libs:
        extra = [str(inc / "oneapi" / "dnnl")] if (inc / "oneapi" / "dnnl").exists() else []
        return [str(inc)] + extra, [str(p) for p in libs]
  raise BuildError(f"oneDNN (dnnl.hpp, libdnnl.so) not found; {NEEDS}")


def _dnnl_version(includes: list[str]) -> str:
  for inc in includes:
    for p in (Path(inc) / "dnnl_version.h", Path(inc) / "oneapi" / "dnnl" / "dnnl_version.h"):
      if p.exists():
        return p.read_text()
  return ""


def _key(cxx: str, includes: list[str], libdirs: list[str]) -> str:
  import jax
  import jaxlib

  ffi_inc = Path(jax.ffi.include_dir())
  h = hashlib.sha256()
  h.update(SOURCE.read_bytes())
  for header in sorted(ffi_inc.rglob("*.h")):
    h.update(header.read_bytes())
  h.update(_dnnl_version(includes).encode())
  h.update(f"{jaxlib.__version__}|{cxx}|{libdirs}|{sys.platform}".encode())
  try:
    h.update(subprocess.run([cxx, "--version"], capture_output=True, text=True,
                            timeout=60).stdout.encode())
  except (OSError, subprocess.SubprocessError):
    pass
  return h.hexdigest()[:16]


def build(verbose: bool = False) -> Path:
  """The path of the compiled extension (building it if this machine has none yet)."""
  import jax

  if not SOURCE.exists():
    raise BuildError(f"{SOURCE} is missing from this installation")
  cxx = _compiler()
  includes, libdirs = _dnnl_dirs()
  out_dir = cache_dir()
  target = out_dir / f"onednn_conv_{_key(cxx, includes, libdirs)}.so"
  if target.exists():
    return target
  try:
    out_dir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise BuildError(f"cannot create {out_dir}: {e.strerror}") from None
  with open(out_dir / ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # one compile per machine, others wait and reuse it
    if target.exists():
      return target
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = ([cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", "-I", jax.ffi.include_dir()]
           + [f"-I{d}" for d in includes] + [str(SOURCE), "-o", tmp]
           + [f"-L{d}" for d in libdirs] + [f"-Wl,-rpath,{d}" for d in libdirs] + ["-ldnnl"])
    print(f"note: compiling bonejax's oneDNN convolutions for this machine, once "
          f"(into {out_dir})", file=sys.stderr, flush=True)
    if verbose:
      print(" ".join(cmd), file=sys.stderr)
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
      os.unlink(tmp)
      raise BuildError(f"compiling the oneDNN extension failed: {e}") from None
    if proc.returncode != 0:
      os.unlink(tmp)
      first = next((ln for ln in proc.stderr.splitlines() if "error" in ln),
                   proc.stderr.strip().splitlines()[-1:] or ["?"])
      raise BuildError(f"compiling the oneDNN extension failed: {str(first)[:300]}")
    os.replace(tmp, target)
  return target


if __name__ == "__main__":
  try:
    print(build(verbose=True))
  except BuildError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(1)
