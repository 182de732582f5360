"""Keep freed memory in the process for reuse (glibc), so XLA's per-call buffers stop page-faulting.

XLA's CPU runtime allocates each execution's temporary buffers afresh (one block for a whole
training step: 366 MB for unet_resnet18 at 8 x 256^2 in bf16) and frees them at its end. glibc
serves a block that large with mmap and returns it with munmap, so every step touches 366 MB of
new pages: 89,344 page faults, each zero-filled by the kernel, 0.2 CPU-seconds of system time
per ~0.87 s step on 2 cores (measured with getrusage; PyTorch's smaller blocks come from the
heap). `setup()` asks glibc (mallopt) to serve every allocation from one heap (M_ARENA_MAX 1:
a worker thread's own arena cannot hold such a block and would fall back to mmap), never to
use mmap (M_MMAP_MAX 0) and to return freed memory to the system only beyond 2 GiB
(M_TRIM_THRESHOLD): from the third step on a step faults no page and runs ~11 % faster
(benchmarks/README.md, issue 25). The cost: memory freed inside the process stays mapped to
it, and allocations share one arena's lock. How much is kept: XLA frees a call's block just
after the call's result is ready, so a call that starts before that free lands takes a new
block; the heap grows by a few blocks, then calls reuse them (unet_resnet18's step: +310 MB
resident on an idle machine, +935 MB with another process busy on the cores, stable after the
first ~20 steps). Freed memory at the heap's top beyond 2 GiB still goes back to the system.

The commands that compute (`train`, `predict`, `demo`, `crossval`) call `setup()` first,
before JAX starts its threads; off with BONEJAX_RETAIN_HEAP=0. Not glibc (macOS, musl): nothing
is changed. Process-wide, so never done on import, and not in napari's own process (its Train
widget runs `train` in a process of its own).
"""

from __future__ import annotations

import ctypes
import os
import sys

from bonejax.core import errors

ENV = "BONEJAX_RETAIN_HEAP"
# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
TRIM_THRESHOLD = (2 << 30) - 1  # an int; freed memory beyond 2 GiB at the heap's top goes back

_state: dict = {"done": False, "why": None}


def wanted() -> bool:
  value = os.environ.get(ENV, "").strip().lower()
  if value in ("", "1", "true", "yes", "on"):
    return True
  if value in ("0", "false", "no", "off"):
    return False
  raise errors.UserError(f"{ENV}={os.environ[ENV]!r}: use 0 (off) or 1 (on)")


def setup() -> str:
  """Apply the settings above, once per process; returns what was done ("retained", or why not:
  "off", "not glibc: <platform>", "mallopt refused")."""
  if _state["done"]:
    return _state["why"]
  _state["done"] = True
  if not wanted():
    why = "off"
  elif not sys.platform.startswith("linux"):
    why = f"not glibc: {sys.platform}"
  else:
    try:
      libc = ctypes.CDLL(None)
      version = libc.gnu_get_libc_version  # glibc only (musl has no such symbol)
      version.restype = ctypes.c_char_p
      ok = all(libc.mallopt(p, v) == 1 for p, v in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0),
                                                    (M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
      why = "retained" if ok else "mallopt refused"
    except (OSError, AttributeError):
      why = "not glibc"
  _state["why"] = why
  return why
