"""Runs a launch script's `main`: the command-line contract every bonejax command shares.

On success the LAST line of stdout is one JSON object; on bad input the script exits non-zero
with a single `error: ...` line on stderr (no traceback) and leaves nothing half-written at its
output path.

Signals: SIGTERM (what job schedulers and `kill` send) is handled as Ctrl-C: it raises
`Terminated`, a KeyboardInterrupt, in the main thread, so every clean-up path written for
Ctrl-C runs; the run then exits 143 with `error: terminated`. Further SIGTERMs while it
cleans up are ignored (the scheduler's SIGKILL still ends it).

Logs: libraries (orbax, absl, jax, etils, ...) log through Python's logging; their records and
the tracebacks of failed background threads stay off stderr unless `--verbose` (bonejax's own
warnings are kept): stderr holds progress, `warning:` lines and the one `error:` line.
"""

from __future__ import annotations

import contextlib
import json
import logging as _logging
import os
import signal
import sys
import textwrap
import threading
from typing import Any, Callable, Iterator

from absl import app, flags, logging

from bonejax.core import outputs
from bonejax.core.errors import (EXIT_BAD_INPUT, EXIT_INTERNAL, UserError, io_error, one_line,
                                 short_message)
from bonejax.core.jsonable import to_jsonable

_HELP_ARGS = ("-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml")
EXIT_TERMINATED = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM

_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the logs of the libraries bonejax uses "
                             "(orbax, absl, jax) and tracebacks of background threads on stderr.")

_BONEJAX_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Terminated(KeyboardInterrupt):
  """SIGTERM, raised in the main thread as Ctrl-C would be: the same clean-up runs."""


def _on_sigterm(signum, frame):
  del frame
  # Once: a second SIGTERM must not interrupt the clean-up the first one started.
  signal.signal(signum, signal.SIG_IGN)
  raise Terminated()


def install_sigterm_handler() -> None:
  """Makes SIGTERM raise `Terminated` in the main thread (only there can Python install it)."""
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _on_sigterm)


class _LibraryLogFilter(_logging.Filter):
  """Drops log records that do not come from bonejax's own files, and bonejax's below WARNING."""

  def filter(self, record: _logging.LogRecord) -> bool:
    ours = os.path.abspath(record.pathname or "").startswith(_BONEJAX_DIR + os.sep)
    return ours and record.levelno >= _logging.WARNING


def _quiet_libraries() -> None:
  """Library logs and background-thread tracebacks off stderr (see the module docstring) for
  the rest of the process: `run` is a process's entry point, and libraries also log from
  atexit handlers after `main` has returned."""
  quiet = _LibraryLogFilter()
  handlers = list(_logging.getLogger().handlers)
  # Python's last-resort handler (no handler configured) prints WARNING and above too.
  if _logging.lastResort is not None:
    handlers.append(_logging.lastResort)
  for handler in handlers:
    handler.addFilter(quiet)
  # Orbax saves in background threads; a failed save's traceback would be printed by
  # threading.excepthook before the main thread reports the error in one line.
  threading.excepthook = lambda args: None
  # C extensions report the errors of callbacks they run on their own threads as
  # "unraisable" (tensorstore futures completing on an asyncio loop that orbax closed after a
  # failed save: hundreds of tracebacks before the error line). The main thread's still show.
  main_hook = sys.unraisablehook

  def hook(unraisable):
    if threading.current_thread() is threading.main_thread():
      main_hook(unraisable)

  sys.unraisablehook = hook


def _parse_flags_or_fail(argv: list[str]) -> list[str]:
  """absl's own parser prints usage on error; the contract wants one line.

  absl also exits 1 after printing --help; asking for help is a success, so it exits 0 here.
  """
  wants_help = any(a in _HELP_ARGS for a in argv[1:])
  if _COMMAND["module"] and any(a in ("-h", "-?", "--help") for a in argv[1:]):
    print(command_help(_COMMAND["module"]), flush=True)
    sys.exit(0)
  try:
    return flags.FLAGS(argv)
  except SystemExit:
    if wants_help:
      sys.stdout.flush()
      sys.exit(0)
    raise
  except Exception as e:  # pylint: disable=broad-except
    # flags.Error, and what config_flags raises for a missing file or an unknown --config.KEY.
    print(f"error: {one_line(e)}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


_COMMAND: dict[str, Any] = {"module": None}
# Flags of several processes as one job (core/distributed.py and predict's waits).
MULTIHOST_FLAGS = ("coordinator_address", "num_processes", "process_id", "multihost",
                   "barrier_timeout_s", "heartbeat_timeout_s")


def command_help(module_name: str) -> str:
  """--help of a command: its docstring, then its everyday flags, then the multi-host ones,
  then those its module lists in EXPERT_FLAGS (tuning and debugging)."""
  module = sys.modules[module_name]
  expert = set(getattr(module, "EXPERT_FLAGS", ()))
  own = sorted(flags.FLAGS.get_flags_for_module(module_name), key=lambda f: f.name)
  own = list({f.name: f for f in own}.values())
  groups = [("flags", [f for f in own if f.name not in expert and f.name not in MULTIHOST_FLAGS]),
            ("several processes (multi-host) flags", [f for f in own if f.name in MULTIHOST_FLAGS]),
            ("expert flags", [f for f in own if f.name in expert]),
            ("output flags", [flags.FLAGS["verbose"]])]
  lines = [(module.__doc__ or "").rstrip(), ""]
  for title, members in groups:
    if not members:
      continue
    lines.append(f"{title}:")
    for f in members:
      default = f.default_as_str if f.default is not None else "None"
      name = f"[no]{f.name}" if getattr(f, "boolean", False) else f.name  # as absl shows them
      lines.append(textwrap.fill(f"--{name}: {one_line(f.help)}", 98, initial_indent="  ",
                                 subsequent_indent="    "))
      lines.append(f"    (default: {default})")
    lines.append("")
  lines.append("--helpfull lists every flag, absl's and jax's included.")
  return "\n".join(lines)


def _show_command_flags(main: Callable) -> None:
  """absl's --help lists the flags of the main module (sys.argv[0]); a command's flags live in
  its module in bonejax/cli/, run from launch/NAME.py or the `bonejax` console script: make
  them the main module's key flags so --help shows them."""
  module = getattr(main, "__module__", None)
  if not module or module == "__main__":
    return
  _COMMAND["module"] = module
  for flag in flags.FLAGS.get_flags_for_module(module):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def run(main: Callable[[list[str]], dict[str, Any]]) -> None:
  """Runs an absl `main` that returns a JSON-able dict, printed as the last stdout line.

  Whatever goes wrong ends in one `error:` line on stderr: bad input (UserError, unreadable or
  unwritable files) exits 2, a bug exits 3. A failed run removes the directories it made for its
  outputs (when still empty).
  """
  _show_command_flags(main)

  def _wrapped(argv: list[str]) -> None:
    # JAX logs backend probing (e.g. "Unable to initialize backend 'tpu'") at INFO; keep stderr
    # for progress and the one-line error unless the user asks for more with --verbosity.
    if not flags.FLAGS["verbosity"].present and not _VERBOSE.value:
      logging.set_verbosity(logging.WARNING)
    if _VERBOSE.value and not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.INFO)
    if not _VERBOSE.value:
      _quiet_libraries()
    install_sigterm_handler()
    tiff_log = None
    try:
      with _quiet_tifffile() as tiff_log:
        result = main(argv)
    except UserError as e:
      _fail(one_line(e) + tiff_log.note_for(str(e)), EXIT_BAD_INPUT)
    except Terminated:
      _fail("terminated", EXIT_TERMINATED)
    except KeyboardInterrupt:
      _fail("interrupted", 130)
    except SystemExit as e:
      if e.code not in (0, None):
        _forget_outputs()
      raise
    except Exception as e:  # pylint: disable=broad-except
      line = io_error(e) or memory_error(e)
      if line is not None:
        _fail(line + (tiff_log.note_for(line) if tiff_log else ""), EXIT_BAD_INPUT)
      if os.environ.get("BONEJAX_DEBUG"):
        raise
      _fail(f"{type(e).__name__}: {short_message(e)} (set BONEJAX_DEBUG=1 for the traceback)",
            EXIT_INTERNAL)
    tiff_log.warn()
    sys.stdout.flush()
    print(json.dumps(to_jsonable(result)), flush=True)

  app.run(_wrapped, flags_parser=_parse_flags_or_fail)


_TOO_BIG = ("array is too big", "Maximum allowed dimension exceeded", "RESOURCE_EXHAUSTED",
            "Out of memory", "out of memory")


def memory_error(e: BaseException) -> str | None:
  """One line when `e` says an allocation failed (else None): sizes come from the input and
  the flags, so this is bad input (exit 2), not a bug. Commands check their plans first
  (bonejax.core.memory_plan); this is the net under what a plan missed."""
  text = short_message(e)
  if isinstance(e, MemoryError):
    return f"out of memory: {text or 'an allocation failed'} (the input or the flags ask for " \
           f"more memory than this machine has)"
  if isinstance(e, (ValueError, RuntimeError)) and any(t in text for t in _TOO_BIG):
    return f"out of memory: {text}"
  if isinstance(e, OverflowError):  # a size from a flag or a header past what C types hold
    return f"a size is too large: {text}"
  return None


def _forget_outputs() -> None:
  outputs.remove_made_dirs()


def _fail(line: str, code: int) -> None:
  _forget_outputs()
  print(f"error: {line}", file=sys.stderr, flush=True)
  sys.exit(code)


class _TiffLog(_logging.Handler):
  """Collects what tifffile logs: it logs (rather than raises) on damaged files, and its line
  on stderr would break the one-line error contract."""

  def __init__(self):
    super().__init__(_logging.WARNING)
    self.messages: list[str] = []

  def emit(self, record):
    msg = one_line(record.getMessage())
    if msg not in self.messages:
      self.messages.append(msg)

  def note_for(self, error: str) -> str:
    """What to add to an error line: tifffile's first complaint, unless it says it already."""
    if not self.messages or self.messages[0] in error:
      return ""
    return f" (tifffile: {self.messages[0]})"

  def warn(self) -> None:
    for msg in self.messages:
      print(f"warning: tifffile: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _quiet_tifffile() -> Iterator[_TiffLog]:
  logger = _logging.getLogger("tifffile")
  handler, propagate = _TiffLog(), logger.propagate
  logger.addHandler(handler)
  logger.propagate = False
  try:
    yield handler
  finally:
    logger.removeHandler(handler)
    logger.propagate = propagate
