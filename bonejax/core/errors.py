"""The library's error type and the one-line messages every command, the GUI and library callers share.

Bad input is a `UserError`: reported as one `error:` line (exit 2), never with a traceback. This
module imports nothing from bonejax, so every stage can use it.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


class UserError(Exception):
  """Bad input: reported as one `error:` line, never with a traceback."""


def one_line(text: str) -> str:
  return " ".join(str(text).split())


_TS_DETAILS = re.compile(r"\s*\[[a-z_ ]+='(?:[^'\\]|\\.)*'\]")
_TS_STATUS = re.compile(r"^([A-Z_]+): ")
# tensorstore statuses of files that cannot be read or written as they are: bad input, not bugs.
_TS_IO = ("DATA_LOSS", "FAILED_PRECONDITION", "PERMISSION_DENIED", "NOT_FOUND",
          "RESOURCE_EXHAUSTED", "OUT_OF_RANGE")
_OS_IO = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
          errno.EROFS: "read-only filesystem", errno.ENOSPC: "no space left on device",
          errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large (a file size limit)"}


def short_message(e: BaseException) -> str:
  """One line, without the ~1 KB tensorstore spec and source locations tensorstore appends."""
  return one_line(_TS_DETAILS.sub("", str(e)))


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
  print(f"warning: {one_line(text)}", file=sys.stderr, flush=True)


def require_exists(path: str | os.PathLike, what: str = "input") -> Path:
  if not path:
    raise UserError(f"no {what} path given")
  p = Path(path)
  if not p.exists():
    raise UserError(f"{what} {str(p)!r} does not exist")
  return p
