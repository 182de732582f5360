"""What every launch script shares: one-line errors, a JSON result line, atomic outputs, progress.

The contract for `launch/*.py`: on success the LAST line of stdout is one JSON object; on bad
input the script exits non-zero with a single `error: ...` line on stderr (no traceback) and
leaves nothing half-written at its output path.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging as _logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from absl import app, flags, logging

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


class UserError(Exception):
  """Bad input: reported as one `error:` line, never with a traceback."""


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


_HELP_ARGS = ("-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml")


def _parse_flags_or_fail(argv: list[str]) -> list[str]:
  """absl's own parser prints usage on error; the contract wants one line.

  absl also exits 1 after printing --help; asking for help is a success, so it exits 0 here.
  """
  wants_help = any(a in _HELP_ARGS for a in argv[1:])
  try:
    return flags.FLAGS(argv)
  except SystemExit:
    if wants_help:
      sys.stdout.flush()
      sys.exit(0)
    raise
  except Exception as e:  # pylint: disable=broad-except
    # flags.Error, and what config_flags raises for a missing file or an unknown --config.KEY.
    print(f"error: {_one_line(e)}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def run(main: Callable[[list[str]], dict[str, Any]]) -> None:
  """Runs an absl `main` that returns a JSON-able dict, printed as the last stdout line.

  Whatever goes wrong ends in one `error:` line on stderr: bad input (UserError, unreadable or
  unwritable files) exits 2, a bug exits 3. A failed run removes the directories it made for its
  outputs (when still empty).
  """

  def _wrapped(argv: list[str]) -> None:
    # JAX logs backend probing (e.g. "Unable to initialize backend 'tpu'") at INFO; keep stderr
    # for progress and the one-line error unless the user asks for more with --verbosity.
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    try:
      with _quiet_tifffile() as tiff_log:
        result = main(argv)
    except UserError as e:
      _fail(_one_line(e) + tiff_log.note_for(str(e)), EXIT_BAD_INPUT)
    except KeyboardInterrupt:
      _fail("interrupted", 130)
    except SystemExit as e:
      if e.code not in (0, None):
        _forget_outputs()
      raise
    except Exception as e:  # pylint: disable=broad-except
      line = io_error(e)
      if line is not None:
        _fail(line + tiff_log.note_for(line), EXIT_BAD_INPUT)
      if os.environ.get("BONEJAX_DEBUG"):
        raise
      _fail(f"{type(e).__name__}: {short_message(e)} (set BONEJAX_DEBUG=1 for the traceback)",
            EXIT_INTERNAL)
    tiff_log.warn()
    sys.stdout.flush()
    print(json.dumps(to_jsonable(result)), flush=True)

  app.run(_wrapped, flags_parser=_parse_flags_or_fail)


def _forget_outputs() -> None:
  from bonejax import outputs
  outputs.remove_made_dirs()


def _fail(line: str, code: int) -> None:
  _forget_outputs()
  print(f"error: {line}", file=sys.stderr, flush=True)
  sys.exit(code)


_TS_DETAILS = re.compile(r"\s*\[[a-z_ ]+='(?:[^'\\]|\\.)*'\]")
_TS_STATUS = re.compile(r"^([A-Z_]+): ")
# tensorstore statuses of files that cannot be read or written as they are: bad input, not bugs.
_TS_IO = ("DATA_LOSS", "FAILED_PRECONDITION", "PERMISSION_DENIED", "NOT_FOUND",
          "RESOURCE_EXHAUSTED", "OUT_OF_RANGE")
_OS_IO = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
          errno.EROFS: "read-only filesystem", errno.ENOSPC: "no space left on device",
          errno.EDQUOT: "disk quota exceeded"}


def short_message(e: BaseException) -> str:
  """One line, without the ~1 KB tensorstore spec and source locations tensorstore appends."""
  return _one_line(_TS_DETAILS.sub("", str(e)))


def io_error(e: BaseException) -> str | None:
  """A one-line message when `e` says a file cannot be read or written (else None).

  Covers tensorstore's errors on damaged chunks, bad zarr.json, permissions, full disks, and
  the same OSErrors from Python: the user's files or disk, not a bug in bonejax.
  """
  if isinstance(e, OSError) and e.errno in _OS_IO:
    where = f" {e.filename!r}" if e.filename else ""
    return f"cannot write or read{where}: {_OS_IO[e.errno]}"
  text = str(e)
  m = _TS_STATUS.match(text)
  if isinstance(e, ValueError) and m and m.group(1) in _TS_IO and "local file" in text:
    return short_message(text[m.end():])
  return None


class _TiffLog(_logging.Handler):
  """Collects what tifffile logs: it logs (rather than raises) on damaged files, and its line
  on stderr would break the one-line error contract."""

  def __init__(self):
    super().__init__(_logging.WARNING)
    self.messages: list[str] = []

  def emit(self, record):
    msg = _one_line(record.getMessage())
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


def to_jsonable(obj: Any) -> Any:
  """numpy/jax scalars and arrays, Paths and tuples to plain JSON types."""
  if isinstance(obj, dict):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if isinstance(obj, Path):
    return str(obj)
  if hasattr(obj, "tolist"):  # numpy / jax arrays and scalars
    return to_jsonable(obj.tolist())
  if isinstance(obj, float) and obj != obj:  # NaN is not JSON
    return None
  return obj


def parse_ints(text: str, n: int | None = None, name: str = "value") -> tuple[int, ...]:
  """'96,128,128' -> (96, 128, 128), with a clear error for anything else."""
  try:
    values = tuple(int(v) for v in str(text).replace("x", ",").split(",") if v.strip())
  except ValueError:
    raise UserError(f"--{name}={text!r} is not a comma-separated list of integers") from None
  if n is not None and len(values) != n:
    raise UserError(f"--{name}={text!r} needs {n} integers, got {len(values)}")
  if any(v <= 0 for v in values):
    raise UserError(f"--{name}={text!r} must be positive")
  return values


def warn(text: str) -> None:
  """One `warning:` line on stderr: something is wrong but the run goes on."""
  print(f"warning: {_one_line(text)}", file=sys.stderr, flush=True)


def require_exists(path: str | os.PathLike, what: str = "input") -> Path:
  if not path:
    raise UserError(f"no {what} path given")
  p = Path(path)
  if not p.exists():
    raise UserError(f"{what} {str(p)!r} does not exist")
  return p


# Writing outputs safely (claims, temporaries, ownership, clean-up) is bonejax/outputs.py, which
# imports this module; its names stay reachable as cli.NAME, the form every caller uses.
_OUTPUT_NAMES = ("atomic_output", "atomic_write_json", "atomic_write_text", "check_output",
                 "claim_output", "remove_path", "scratch_dir")


def __getattr__(name: str) -> Any:
  if name in _OUTPUT_NAMES:
    from bonejax import outputs
    return getattr(outputs, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Progress:
  """A periodic stderr line with count, rate and ETA; quiet enough for logs and CI.

  Use as `for x in Progress(items, total=n, desc="predict", unit="planes")` or call `update`.
  """

  def __init__(self, iterable: Iterable | None = None, total: int | None = None,
               desc: str = "", unit: str = "it", every_s: float = 5.0,
               stream=None):
    self.iterable = iterable
    self.total = total if total is not None else (
        len(iterable) if hasattr(iterable, "__len__") else None)
    self.desc, self.unit, self.every_s = desc, unit, every_s
    self.stream = stream if stream is not None else sys.stderr
    self.n = 0
    self.start = time.perf_counter()
    self._last = self.start

  def __iter__(self):
    for item in self.iterable:
      yield item
      self.update(1)
    self.close()

  def rate(self) -> float:
    dt = time.perf_counter() - self.start
    return self.n / dt if dt > 0 else 0.0

  def line(self) -> str:
    rate = self.rate()
    done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
    eta = ""
    if self.total and rate > 0:
      eta = f" eta {format_seconds((self.total - self.n) / rate)}"
    elapsed = format_seconds(time.perf_counter() - self.start)
    return f"[{self.desc}] {done} {self.unit} {rate:.3g} {self.unit}/s elapsed {elapsed}{eta}"

  def update(self, n: int = 1, extra: str = "") -> None:
    self.n += n
    now = time.perf_counter()
    if now - self._last >= self.every_s:
      self._last = now
      print(self.line() + (f" {extra}" if extra else ""), file=self.stream, flush=True)

  def close(self) -> None:
    print(self.line() + " done", file=self.stream, flush=True)


def format_seconds(s: float) -> str:
  s = int(round(s))
  h, rem = divmod(s, 3600)
  m, sec = divmod(rem, 60)
  return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"
