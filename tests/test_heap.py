"""bonejax.core.heap: XLA's per-call buffers come back from the heap instead of fresh pages."""

import os
import subprocess
import sys
import textwrap

import pytest

from bonejax.core import errors, heap

# A jitted function whose 64 MB temporary (sin(x) reversed, the dot's operand) XLA allocates
# and frees at every call; the child prints its minor page faults and resident pages per call.
_CHILD = textwrap.dedent("""
    import resource, time
    from bonejax.core import heap
    print(heap.setup())
    import jax, jax.numpy as jnp
    x = jnp.ones((8192, 2048), jnp.float32)
    w = jnp.ones((2048, 8), jnp.float32)
    f = jax.jit(lambda x, w: (jnp.sin(x)[::-1] @ w).sum())
    for _ in range(16):
      r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      jax.block_until_ready(f(x, w))
      faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
      print(f"{faults},{open('/proc/self/statm').read().split()[1]}")
      time.sleep(0.1)  # XLA frees a call's buffers just after its result is ready
""")


def _faults(retain: str) -> tuple[str, list[int], list[int]]:
  """(what heap.setup() said, faults per call, resident pages after each call)."""
  env = dict(os.environ, BONEJAX_RETAIN_HEAP=retain, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True,
                       timeout=300, check=True).stdout.split()
  calls = [tuple(int(v) for v in line.split(",")) for line in out[1:]]
  return out[0], [c[0] for c in calls], [c[1] for c in calls]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_retained_heap_stops_the_page_faults_of_repeated_calls():
  what, on, resident = _faults("1")
  assert what == "retained"
  # 64 MB of fresh pages are ~16,400 faults. The heap grows while a call overlaps the previous
  # call's late free (the first calls; back to back on a loaded machine, now and then later:
  # the pause between calls here lets that free land), then serves the calls from freed
  # blocks: they fault no page, and the resident size stays bounded.
  later = on[4:]
  assert sum(f < 500 for f in later) >= len(later) - 3, on
  assert resident[-1] - resident[0] < 8 * 16_384, resident
  what, off, _ = _faults("0")
  assert what == "off"
  assert sorted(off[4:])[len(off[4:]) // 2] > 10_000, off


def test_switch(monkeypatch):
  monkeypatch.setattr(heap, "_state", {"done": False, "why": None})
  monkeypatch.setenv(heap.ENV, "0")
  assert heap.setup() == "off"
  assert heap.setup() == "off"  # once per process
  monkeypatch.setattr(heap, "_state", {"done": False, "why": None})
  monkeypatch.setenv(heap.ENV, "maybe")
  with pytest.raises(errors.UserError, match="BONEJAX_RETAIN_HEAP"):
    heap.setup()
