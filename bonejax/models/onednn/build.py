"""Compiles the oneDNN convolution extension once per machine, into a per-user cache.

Why at first use and not in `pip install`: the extension is compiled against the XLA FFI headers
of the jaxlib that is *imported* (`jax.ffi.include_dir()`), and that jaxlib can change after
bonejax is installed (an upgrade, Python 3.12's newer jax); an install-time build would also
need jaxlib inside pip's isolated build environment (a second ~80 MB download) and would make a
missing compiler an install failure. Built here, the binary is keyed on everything it depends on
(source, jaxlib version and headers, oneDNN version, compiler), so a changed jaxlib simply builds
a new one; `pip install -e .` on a machine without oneDNN installs and runs unchanged.

    python -m bonejax.models.onednn.build      # build now (prints the path, or why not)

Needs: a C++17 compiler (`c++`/`g++`, or $CXX) and oneDNN 3.x or 2.x headers and library. Looked
for in this order: $BONEJAX_DNNL_ROOT (include/ and lib/), this Python environment's prefix
(where pip puts the `onednn-cpu-gomp` + `onednn-devel-cpu-gomp` wheels, oneDNN 3.2: the way to
get oneDNN without root; its kernels time the same as 2.6's on unet_resnet18's layers,
benchmarks/results/onednn_versions_*.md), then /usr/local and /usr (Debian / Ubuntu:
`apt-get install libdnnl-dev g++`, oneDNN 2.6). $BONEJAX_ONEDNN=system skips this
environment's prefix (the system's oneDNN, e.g. to test the 2.x build). The library is linked by
its soname with an rpath to its folder, so no LD_LIBRARY_PATH is needed.
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
INCLUDED = tuple(Path(__file__).with_name(n) for n in ("onednn_bnorm.inc", "onednn_pool.inc"))
# (#included by SOURCE)
NEEDS = ("the oneDNN fast path needs oneDNN and a C++ compiler (pip install onednn-cpu-gomp "
         "onednn-devel-cpu-gomp, or Debian/Ubuntu: apt-get install libdnnl-dev; and g++)")


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


def _version_header(inc: Path) -> Path | None:
  # include/dnnl_version.h is a compatibility stub that includes the oneapi/dnnl one: read the
  # real header, so that the version (and the cache key below) tells 2.x from 3.x.
  for p in (inc / "oneapi" / "dnnl" / "dnnl_version.h", inc / "dnnl_version.h"):
    if p.exists():
      return p
  return None


def _libdnnl(libdir: Path) -> Path | None:
  """The library to link in `libdir`: libdnnl.so, else the newest libdnnl.so.N (a wheel may
  ship only versioned names); linked by path, so the extension records its soname."""
  if (libdir / "libdnnl.so").exists():
    return libdir / "libdnnl.so"
  versioned = sorted(libdir.glob("libdnnl.so.[0-9]*"), key=lambda p: len(p.name))
  return versioned[0] if versioned else None


def _dnnl_dirs() -> tuple[list[str], list[str]]:
  """(include dirs, [library file]) of the first oneDNN found (see the module docstring)."""
  roots = [os.environ.get("BONEJAX_DNNL_ROOT")]
  if os.environ.get("BONEJAX_ONEDNN", "").lower() != "system":
    roots.append(sys.prefix)
  roots += ["/usr/local", "/usr"]
  for root in filter(None, roots):
    inc = Path(root) / "include"
    if (inc / "dnnl.hpp").exists() or (inc / "oneapi" / "dnnl" / "dnnl.hpp").exists():
      libs = [_libdnnl(p) for p in (Path(root) / "lib", Path(root) / "lib64",
                                    Path(root) / "lib" / "x86_64-linux-gnu",
                                    Path(root) / "lib" / "aarch64-linux-gnu")]
      libs = [p for p in libs if p is not None]
      if libs and _version_header(inc):
        extra = [str(inc / "oneapi" / "dnnl")] if (inc / "oneapi" / "dnnl").exists() else []
        return [str(inc)] + extra, [str(libs[0])]
  raise BuildError(f"oneDNN (dnnl.hpp, libdnnl.so) not found; {NEEDS}")


def _dnnl_version(includes: list[str]) -> str:
  p = _version_header(Path(includes[0]))
  return p.read_text() if p else ""


def dnnl_version_found() -> str:
  """"MAJOR.MINOR.PATCH" of the oneDNN headers the build would use ("" if none)."""
  try:
    text = _dnnl_version(_dnnl_dirs()[0])
  except BuildError:
    return ""
  nums = {ln.split()[1]: ln.split()[2] for ln in text.splitlines()
          if ln.startswith("#define DNNL_VERSION_") and len(ln.split()) >= 3}
  return ".".join(nums.get(f"DNNL_VERSION_{k}", "?") for k in ("MAJOR", "MINOR", "PATCH"))


def _key(cxx: str, includes: list[str], libs: list[str]) -> str:
  import jax
  import jaxlib

  ffi_inc = Path(jax.ffi.include_dir())
  h = hashlib.sha256()
  for part in (SOURCE,) + INCLUDED:
    h.update(part.read_bytes())
  for header in sorted(ffi_inc.rglob("*.h")):
    h.update(header.read_bytes())
  h.update(_dnnl_version(includes).encode())
  h.update(f"{jaxlib.__version__}|{cxx}|{libs}|{sys.platform}".encode())
  try:
    h.update(subprocess.run([cxx, "--version"], capture_output=True, text=True,
                            timeout=60).stdout.encode())
  except (OSError, subprocess.SubprocessError):
    pass
  return h.hexdigest()[:16]


def build(verbose: bool = False) -> Path:
  """The path of the compiled extension (building it if this machine has none yet)."""
  import jax

  for part in (SOURCE,) + INCLUDED:
    if not part.exists():
      raise BuildError(f"{part} is missing from this installation")
  cxx = _compiler()
  includes, libs = _dnnl_dirs()
  out_dir = cache_dir()
  version = dnnl_version_found().replace(".", "_") or "unknown"
  target = out_dir / f"onednn_conv_dnnl{version}_{_key(cxx, includes, libs)}.so"
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
           + libs + [f"-Wl,-rpath,{Path(f).parent}" for f in libs])
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
