"""What every launch script shares: one-line errors, a JSON result line, atomic outputs, progress.

The contract for `launch/*.py`: on success the LAST line of stdout is one JSON object; on bad
input the script exits non-zero with a single `error: ...` line on stderr (no traceback) and
leaves nothing half-written at its output path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import uuid
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
  """Runs an absl `main` that returns a JSON-able dict, printed as the last stdout line."""

  def _wrapped(argv: list[str]) -> None:
    # JAX logs backend probing (e.g. "Unable to initialize backend 'tpu'") at INFO; keep stderr
    # for progress and the one-line error unless the user asks for more with --verbosity.
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    try:
      result = main(argv)
    except UserError as e:
      print(f"error: {_one_line(e)}", file=sys.stderr)
      sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
      print("error: interrupted", file=sys.stderr)
      sys.exit(130)
    except Exception as e:  # pylint: disable=broad-except
      if os.environ.get("BONEJAX_DEBUG"):
        raise
      print(f"error: {type(e).__name__}: {_one_line(e)} (set BONEJAX_DEBUG=1 for the traceback)",
            file=sys.stderr)
      sys.exit(EXIT_INTERNAL)
    sys.stdout.flush()
    print(json.dumps(to_jsonable(result)), flush=True)

  app.run(_wrapped, flags_parser=_parse_flags_or_fail)


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


def require_exists(path: str | os.PathLike, what: str = "input") -> Path:
  if not path:
    raise UserError(f"no {what} path given")
  p = Path(path)
  if not p.exists():
    raise UserError(f"{what} {str(p)!r} does not exist")
  return p


def check_output(path: str | os.PathLike, overwrite: bool) -> Path:
  """Fails early (before any work) when an output exists and --overwrite is not set."""
  if not path:
    raise UserError("no output path given")
  p = Path(path)
  if p.exists() and not overwrite:
    raise UserError(f"output {str(p)!r} exists; pass --overwrite to replace it")
  if not p.parent.exists():
    p.parent.mkdir(parents=True, exist_ok=True)
  return p


def remove_path(p: Path) -> None:
  if p.is_dir() and not p.is_symlink():
    shutil.rmtree(p, ignore_errors=True)
  elif p.exists() or p.is_symlink():
    p.unlink()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
  """Yields a temporary sibling path; renames it onto `path` only if the block succeeds.

  Works for files and directories. A failure (or Ctrl-C) removes the temporary path, so the
  output either appears complete or not at all.
  """
  final = check_output(path, overwrite)
  tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
  try:
    yield tmp
    if not tmp.exists():
      raise RuntimeError(f"nothing was written for {final}")
    if final.exists():
      # Move the old output aside first so a crash never leaves neither.
      old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
      os.replace(final, old)
      os.replace(tmp, final)
      remove_path(old)
    else:
      os.replace(tmp, final)
  except BaseException:
    remove_path(tmp)
    raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Writes a small file (JSON, CSV, Markdown) via a temporary name and a rename."""
  p = Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex[:8]}")
  try:
    tmp.write_text(text)
    os.replace(tmp, p)
  except BaseException:
    remove_path(tmp)
    raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
  atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2) + "\n")


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
