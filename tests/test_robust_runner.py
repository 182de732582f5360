"""The command runner under hostile conditions (issue 26 items 6, 7, 9): SIGTERM is handled
as Ctrl-C (clean-up runs, exit 143, one `error: terminated` line), library logs and
background-thread tracebacks stay off stderr unless --verbose, and failed allocations are
bad input (exit 2), not bugs."""

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from bonejax.cli import runner

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""\
    import logging as pylogging, sys, threading, time
    sys.path.insert(0, {repo!r})
    from absl import flags, logging
    from bonejax.cli import runner
    WHAT = {what!r}
    MARK = {mark!r}

    class Closed:
      def __del__(self):
        raise RuntimeError("Event loop is closed")

    def main(argv):
      if WHAT == "sleep":
        open(MARK + ".started", "w").close()
        try:
          while True:
            time.sleep(0.01)
        finally:
          open(MARK + ".cleaned", "w").close()
      if WHAT == "logs":
        logging.warning("absl says hello")
        pylogging.getLogger("orbax").error("orbax says hello")
        t = threading.Thread(target=lambda: 1 / 0)
        t.start()
        t.join()
        # What a C extension's callback thread reports as "unraisable" (tensorstore futures
        # completing on an asyncio loop orbax closed after a failed save: hundreds of them).
        t = threading.Thread(target=lambda: Closed())
        t.start()
        t.join()
        return {{"ok": 1}}
      if WHAT == "memory":
        raise MemoryError("Unable to allocate 5.96 TiB for an array with shape (64, 160000, "
                          "160000)")
      return {{}}

    if __name__ == "__main__":
      runner.run(main)
    """)


def _script(tmp_path, what):
  path = tmp_path / f"{what}.py"
  path.write_text(SCRIPT.format(repo=str(REPO), what=what, mark=str(tmp_path / "mark")))
  return path


def _run(path, *args):
  return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                        cwd=REPO, timeout=60)


def test_sigterm_runs_cleanup_and_exits_143(tmp_path):
  proc = subprocess.Popen([sys.executable, str(_script(tmp_path, "sleep"))], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  started = tmp_path / "mark.started"
  deadline = time.monotonic() + 60
  while not started.exists():
    assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=60)
  assert proc.returncode == 143
  assert stderr.strip().splitlines() == ["error: terminated"]
  assert stdout == ""
  assert (tmp_path / "mark.cleaned").exists()  # the finally: ran, as for Ctrl-C


def test_library_logs_only_with_verbose(tmp_path):
  path = _script(tmp_path, "logs")
  quiet = _run(path)
  assert quiet.returncode == 0, quiet.stderr
  assert quiet.stdout.strip().splitlines()[-1] == '{"ok": 1}'
  for noise in ("absl says hello", "orbax says hello", "ZeroDivisionError", "Traceback",
                "Event loop is closed"):
    assert noise not in quiet.stderr
  loud = _run(path, "--verbose")
  assert loud.returncode == 0, loud.stderr
  for noise in ("absl says hello", "orbax says hello", "ZeroDivisionError",
                "Event loop is closed"):
    assert noise in loud.stderr


def test_bonejax_warnings_kept():
  keep = runner._LibraryLogFilter()
  ours = logging.LogRecord("absl", logging.WARNING, str(REPO / "bonejax" / "data" / "x.py"), 1,
                           "m", (), None)
  theirs = logging.LogRecord("absl", logging.ERROR, "/site-packages/orbax/x.py", 1, "m", (),
                             None)
  info = logging.LogRecord("absl", logging.INFO, str(REPO / "bonejax" / "x.py"), 1, "m", (), None)
  assert keep.filter(ours) and not keep.filter(theirs) and not keep.filter(info)


def test_memory_error_is_bad_input(tmp_path):
  r = _run(_script(tmp_path, "memory"))
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1
  assert lines[0].startswith("error: out of memory: Unable to allocate 5.96 TiB")


def test_memory_error_lines():
  assert runner.memory_error(ValueError("array is too big; `arr.size * arr.dtype.itemsize` is "
                                        "larger than the maximum possible size.")).startswith(
                                            "out of memory: array is too big")
  assert runner.memory_error(ValueError("bad value")) is None
  assert runner.memory_error(OverflowError("Python int too large to convert to C long")) == (
      "a size is too large: Python int too large to convert to C long")
  assert runner.memory_error(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                                          "allocate 141 GB")) is not None
