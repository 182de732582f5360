"""Outputs that appear whole, never destroy what bonejax did not write, and leave no debris.

Every command writes its outputs through `atomic_output` (re-exported by `bonejax.cli`):

- Claim. The run holds an exclusive `flock` on `.NAME.lock` beside the output from start to
  finish; a second run writing the same output is refused at once. The kernel drops the lock when
  its process dies, even by kill -9, so a claim is never stale (the next run takes the file over).
- Temporaries. The output is written as `.NAME.tmp-HOST-PID-RAND` beside it (the same
  filesystem, so the final rename is atomic) and renamed into place only when complete. An
  existing output is first moved to `.NAME.old-HOST-PID-RAND`, then removed. A run that finds
  such names of its output left by a process that is gone (same host: pids of other machines or
  containers mean nothing here) removes them, or restores the `.old` one when the crash fell
  between the two renames, and says so in one stderr line. `scratch_dir` does the same for
  working directories (`.bonejax-predict-HOST-PID-RAND/`).
- Ownership. `--overwrite` replaces only what bonejax wrote (bonejax/ownership.py says how it is
  recognised); anything else is refused with a line that says why. An output that is an input,
  lies inside one or holds one is refused too.
- Parents. Directories made for an output are removed again (when still empty) if the run fails.

Durability is against crashes of the process (kill -9, OOM kill, Ctrl-C), not power loss: files
are not fsync'ed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from bonejax.core import errors, jsonable
from bonejax.core.ownership import foreign_reason, short_list as _list

HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
SCRATCH_PREFIX = "bonejax-predict"


def _say(text: str) -> None:
  print(text, file=sys.stderr, flush=True)


def _quote(p: os.PathLike | str) -> str:
  return repr(str(p))


# ---------------------------------------------------------------------------------------------
# Processes and locks.
# ---------------------------------------------------------------------------------------------


_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class OutputBusy(errors.UserError):
  """The output is claimed by another live bonejax run (`claim_output`)."""


def pid_alive(pid: int) -> bool:
  """Whether process `pid` exists on this machine (a zombie counts until it is reaped)."""
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process: alive
    return True
  return True


def owner_tag() -> str:
  """HOST-PID: what temporaries carry in their names so a later run can tell them stale."""
  return f"{HOST}-{os.getpid()}"


def _stale(host: str, pid: str) -> bool:
  return host == HOST and not pid_alive(int(pid))


def _open_locked(lock: Path, blocking: bool) -> int:
  """An fd holding an exclusive flock on `lock` (created if needed).

  The holder unlinks the file when done; a process that opened the old file before that would
  lock an orphan inode, so after locking we check the path still names our inode and retry if not.
  Raises BlockingIOError when `blocking` is False and another process holds it.
  """
  while True:
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
      try:
        same = os.stat(lock).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
    except BaseException:
      os.close(fd)
      raise
    if same:
      return fd
    os.close(fd)


def _release(lock: Path, fd: int) -> None:
  with contextlib.suppress(FileNotFoundError):
    os.unlink(lock)  # while still holding it: see _open_locked
  os.close(fd)


@contextlib.contextmanager
def locked(lock: str | os.PathLike) -> Iterator[None]:
  """Blocks until this process holds an exclusive lock on the file `lock` (removed after).

  For short read-modify-write sections shared by processes, e.g. dataset.json.
  """
  lock = Path(lock)
  try:
    fd = _open_locked(lock, blocking=True)
  except OSError as e:
    if e.errno not in _NO_LOCKS:
      raise errors.UserError(f"cannot lock {_quote(lock)}: {_os_reason(e)}") from None
    _say(f"note: no file locks on this filesystem: {_quote(lock.parent)} is not protected "
         f"against concurrent changes")
    yield
    return
  try:
    yield
  finally:
    _release(lock, fd)


_CLAIMS: dict[str, list] = {}  # absolute output path -> [lock path, fd, depth]
_CLAIMS_GUARD = threading.Lock()


def _lock_path(path: Path) -> Path:
  return path.with_name(f".{path.name}.lock")


def _abs(path: str | os.PathLike) -> Path:
  return Path(os.path.abspath(os.fspath(path)))


@contextlib.contextmanager
def claim_output(path: str | os.PathLike, what: str = "output") -> Iterator[Path]:
  """Holds `path` for this process: a second writer (another run) is refused with one line.

  Re-entrant within a process, so a command can claim its outputs at start and the library's
  `atomic_output` inside reuses the claim. Yields the absolute path.
  """
  final = _abs(path)
  if not final.name or final.name in (".", ".."):
    raise errors.UserError(f"{what} {_quote(path)} is not a file or directory name")
  key = str(final)
  with _CLAIMS_GUARD:
    held = _CLAIMS.get(key)
    if held is not None:
      held[2] += 1
  if held is not None:
    try:
      yield final
    finally:
      with _CLAIMS_GUARD:
        held[2] -= 1
    return
  make_parents(final)
  lock = _lock_path(final)
  fd = _claim_lock(lock, path, what)
  if fd is None:
    yield final
    return
  with _CLAIMS_GUARD:
    _CLAIMS[key] = [lock, fd, 1]
  try:
    yield final
  finally:
    with _CLAIMS_GUARD:
      _CLAIMS[key][2] -= 1
      last = _CLAIMS[key][2] == 0
      if last:
        del _CLAIMS[key]
    if last:
      _release(lock, fd)


def _claim_lock(lock: Path, path: Any, what: str) -> int | None:
  """The locked fd of a claim (None on a filesystem without locks), owner pid written in it."""
  try:
    fd = _open_locked(lock, blocking=False)
  except BlockingIOError:
    owner = ""
    with contextlib.suppress(OSError):
      owner = lock.read_text().strip()
    by = f" (process {owner.split()[0]})" if owner else ""
    raise OutputBusy(f"{what} {_quote(path)} is being written by another bonejax run{by}; "
                        f"wait for it to finish or choose another path") from None
  except OSError as e:
    if e.errno in _NO_LOCKS:
      _say(f"note: no file locks on this filesystem: nothing stops a second run from writing "
           f"{_quote(path)} at the same time")
      return None
    raise errors.UserError(f"cannot write {what} {_quote(path)}: {_os_reason(e)} "
                        f"({_quote(lock.parent)})") from None
  try:
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
  except OSError as e:  # a full disk: give the lock back rather than leave it behind
    _release(lock, fd)
    raise errors.UserError(f"cannot write {what} {_quote(path)}: {_os_reason(e)} "
                           f"({_quote(lock.parent)})") from None
  return fd


def is_claimed(path: str | os.PathLike) -> bool:
  """Whether some live run (this one included) is writing `path` right now."""
  final = _abs(path)
  if str(final) in _CLAIMS:
    return True
  lock = _lock_path(final)
  try:
    fd = os.open(lock, os.O_RDONLY)
  except OSError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    return False
  except BlockingIOError:
    return True
  finally:
    os.close(fd)


def _os_reason(e: OSError) -> str:
  if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    return "permission denied" + (" (read-only filesystem)" if e.errno == errno.EROFS else "")
  return os.strerror(e.errno) if e.errno else str(e)


# ---------------------------------------------------------------------------------------------
# Parents made for outputs, removed again when the run fails.
# ---------------------------------------------------------------------------------------------


_MADE_DIRS: list[Path] = []


def make_dirs(d: Path) -> list[Path]:
  """Creates directory `d` and its missing ancestors; returns (and remembers) the ones made."""
  missing = []
  while not d.exists():
    missing.append(d)
    if d.parent == d:
      break
    d = d.parent
  if d.exists() and not d.is_dir():
    raise errors.UserError(f"cannot write there: {_quote(d)} is not a directory")
  made: list[Path] = []
  for m in reversed(missing):
    try:
      m.mkdir()
    except FileExistsError:  # another run made it meanwhile: theirs
      continue
    except OSError as e:
      remove_made_dirs(made)
      raise errors.UserError(f"cannot create {_quote(m)}: {_os_reason(e)}") from None
    made.append(m)
  _MADE_DIRS.extend(made)
  return made


def make_parents(path: Path) -> list[Path]:
  return make_dirs(_abs(path).parent)


def remove_made_dirs(dirs: Sequence[Path] | None = None) -> None:
  """Removes directories made by `make_parents` (all this process made, by default), deepest
  first, if they are still empty: content put there since is never touched."""
  dirs = list(_MADE_DIRS if dirs is None else dirs)
  for d in reversed(dirs):
    with contextlib.suppress(OSError):
      d.rmdir()
    with contextlib.suppress(ValueError):
      _MADE_DIRS.remove(d)


def _contains(outer: str, inner: str) -> bool:
  return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def check_not_input(path: str | os.PathLike, inputs: Iterable[Any], what: str = "output") -> None:
  """Refuses an output that is an input, lies inside one or holds one (links resolved)."""
  out = os.path.realpath(os.fspath(path))
  for given in inputs:
    if given is None or given == "":
      continue
    src = os.path.realpath(os.fspath(given))
    same = _contains(src, out) and _contains(out, src)
    if not same and os.path.exists(out) and os.path.exists(src):
      with contextlib.suppress(OSError):
        same = os.path.samefile(out, src)  # e.g. a hard link
    if same:
      raise errors.UserError(f"{what} {_quote(path)} is the input {_quote(given)}; writing it "
                          f"would destroy the input")
    if _contains(src, out):
      raise errors.UserError(f"{what} {_quote(path)} lies inside the input {_quote(given)}")
    if _contains(out, src):
      raise errors.UserError(f"{what} {_quote(path)} holds the input {_quote(given)}; replacing "
                          f"it would destroy the input")


def check_output(path: str | os.PathLike, overwrite: bool, inputs: Iterable[Any] = (),
                 what: str = "output") -> Path:
  """Fails early (before any work) on an output that cannot or must not be written.

  Refused: no path; an output that is, holds or lies inside one of `inputs`; an existing path
  without `overwrite`, or with it but not written by bonejax; a directory that cannot be
  written. Makes the missing parent directories (removed again if the run fails).
  """
  if not path:
    raise errors.UserError(f"no {what} path given")
  p = Path(path)
  if not _abs(p).name:
    raise errors.UserError(f"{what} {_quote(path)} is not a file or directory name")
  check_not_input(p, inputs, what)
  restore_interrupted(p, what)  # a restored output exists like any other
  if p.exists() or p.is_symlink():
    if not overwrite:
      raise errors.UserError(f"{what} {_quote(p)} exists; pass --overwrite to replace it")
    reason = foreign_reason(p)
    if reason is not None:
      raise errors.UserError(f"{what} {_quote(p)} {reason}; --overwrite replaces only bonejax "
                          f"outputs: move it away or choose another path")
    if p.is_dir() and not p.is_symlink() and not os.access(p, os.W_OK | os.X_OK):
      raise errors.UserError(f"cannot replace {what} {_quote(p)}: permission denied")
  made = make_parents(p)
  parent = _abs(p).parent
  if not os.access(parent, os.W_OK | os.X_OK):
    remove_made_dirs(made)
    raise errors.UserError(f"cannot write {what} {_quote(p)}: permission denied on "
                        f"{_quote(parent)}")
  return p


# ---------------------------------------------------------------------------------------------
# Temporaries and their clean-up.
# ---------------------------------------------------------------------------------------------


def remove_path(p: Path) -> None:
  if p.is_dir() and not p.is_symlink():
    shutil.rmtree(p, ignore_errors=True)
  elif p.exists() or p.is_symlink():
    p.unlink()


def temporary_name(final: Path, kind: str = "tmp") -> Path:
  return final.with_name(f".{final.name}.{kind}-{owner_tag()}-{uuid.uuid4().hex[:8]}")


def _stale_names(final: Path) -> list[re.Match]:
  """Temporaries and old copies of `final` (nested ones too) whose process is gone."""
  pattern = re.compile(r"^(\.+)" + re.escape(final.name) +
                       r"\.(tmp|old)-([0-9a-f]{6})-(\d+)-[0-9a-f]+(.*)$")
  try:
    names = sorted(os.listdir(final.parent))
  except OSError:
    return []
  return [m for n in names if (m := pattern.match(n)) and _stale(m.group(3), m.group(4))]


def _is_top_old(m: re.Match) -> bool:
  return m.group(1) == "." and m.group(2) == "old" and not m.group(5)


def clean_stale(final: str | os.PathLike) -> list[str]:
  """Removes what crashed runs left of `final`: temporaries, old copies, nested ones, locks.

  Only names whose process is gone (on this host) are touched. An `.old` copy is put back when
  `final` is missing: the crash came between moving the old output aside and renaming the new one
  in, and the old one is complete (it is then an existing output like any other: a run without
  --overwrite stops). Says what it did in one stderr line; returns the names.
  """
  final = _abs(final)
  found = _stale_names(final)
  restored = None
  for m in found:
    p = final.parent / m.group(0)
    if _is_top_old(m) and restored is None and not (final.exists() or final.is_symlink()):
      os.replace(p, final)
      restored = m.group(0)
    else:
      remove_path(p)
  if found:
    pids = ", ".join(sorted({m.group(4) for m in found}))
    gone = [m.group(0) for m in found if m.group(0) != restored]
    parts = []
    if gone:
      parts.append(f"removed {len(gone)} leftover(s) beside {_quote(final)}: {_list(gone)}")
    if restored:
      parts.append(f"restored the previous output {_quote(final)} from {restored!r}")
    _say(f"note: {'; '.join(parts)} (interrupted bonejax run{'s' if ',' in pids else ''}, "
         f"process {pids} gone)")
  return [m.group(0) for m in found]


def restore_interrupted(path: str | os.PathLike, what: str = "output") -> bool:
  """Puts back an output that a crash between the two renames of `atomic_output` left only as
  `.NAME.old-HOST-PID-RAND` (its process gone); True when it did. Done under the output's
  claim, so two runs never both move it."""
  final = _abs(path)
  if final.exists() or final.is_symlink() or not any(map(_is_top_old, _stale_names(final))):
    return False
  with claim_output(final, what):
    if final.exists() or final.is_symlink():
      return False
    clean_stale(final)
  return final.exists() or final.is_symlink()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False,
                  inputs: Iterable[Any] = (), what: str = "output") -> Iterator[Path]:
  """Yields a temporary sibling path; renames it onto `path` only if the block succeeds.

  Works for files and directories. Claims `path` for the whole block (a concurrent writer is
  refused), removes what crashed runs left of it, and on failure (or Ctrl-C) removes the
  temporary and the parent directories this call made, so the output appears complete or not
  at all.
  """
  made_before = len(_MADE_DIRS)
  check_output(path, overwrite, inputs, what)
  made = _MADE_DIRS[made_before:]
  try:
    with claim_output(path, what) as final:
      # Leftovers first: an output restored from its `.old` copy is an existing output.
      clean_stale(final)
      # Checked again under the claim: another run may have finished it meanwhile.
      if not overwrite and (final.exists() or final.is_symlink()):
        raise errors.UserError(f"{what} {_quote(path)} exists; pass --overwrite to replace it")
      tmp = temporary_name(final)
      try:
        yield tmp
        if not (tmp.exists() or tmp.is_symlink()):
          raise RuntimeError(f"nothing was written for {final}")
        if final.exists() or final.is_symlink():
          # Move the old output aside first so a crash never leaves neither.
          old = temporary_name(final, "old")
          os.replace(final, old)
          os.replace(tmp, final)
          remove_path(old)
        else:
          os.replace(tmp, final)
      except BaseException:
        remove_path(tmp)
        raise
  except BaseException:
    remove_made_dirs(made)
    raise


def remove_stale_scratch(parent: str | os.PathLike, prefix: str = SCRATCH_PREFIX) -> list[str]:
  """Removes the scratch directories of crashed runs in `parent` (`.PREFIX-HOST-PID-RAND/`, the
  process gone), saying so in one stderr line; a run that needs no scratch of its own calls it
  too, so a killed out-of-core run's scratch goes with the next run on the same output."""
  pattern = re.compile(r"^\." + re.escape(prefix) + r"-([0-9a-f]{6})-(\d+)-[0-9a-f]+$")
  stale = []
  with contextlib.suppress(OSError):
    for name in sorted(os.listdir(parent)):
      m = pattern.match(name)
      if m and _stale(m.group(1), m.group(2)):
        remove_path(Path(parent) / name)
        stale.append((name, m.group(2)))
  if stale:
    _say(f"note: removed {len(stale)} scratch director{'y' if len(stale) == 1 else 'ies'} of "
         f"interrupted bonejax runs (process {', '.join(sorted({p for _, p in stale}))} gone) "
         f"in {_quote(parent)}: {_list([n for n, _ in stale])}")
  return [n for n, _ in stale]


@contextlib.contextmanager
def scratch_dir(parent: str | os.PathLike, prefix: str = SCRATCH_PREFIX) -> Iterator[Path]:
  """A fresh working directory `.PREFIX-HOST-PID-RAND/` in `parent`, removed afterwards.

  First removes the ones of crashed runs (same prefix, process gone), saying so: after kill -9
  the next run in the same place cleans up. Put it beside the output so it is found again.
  """
  parent = _abs(parent)
  make_dirs(parent)
  remove_stale_scratch(parent, prefix)
  path = parent / f".{prefix}-{owner_tag()}-{uuid.uuid4().hex[:8]}"
  # mkdir inside the try: a signal taken right after it (SIGTERM arrives as an exception at the
  # next bytecode) must still remove the directory. The name is this process's own.
  try:
    try:
      path.mkdir()
    except OSError as e:
      raise errors.UserError(f"cannot create a scratch directory in {_quote(parent)}: "
                             f"{_os_reason(e)}") from None
    yield path
  finally:
    try:
      shutil.rmtree(path, ignore_errors=True)
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM (taken once) landed inside it: finish, re-raise
      shutil.rmtree(path, ignore_errors=True)
      raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Writes a small file (JSON, CSV, Markdown) via a temporary name and a rename."""
  p = Path(path)
  make_parents(p)
  clean_stale(p)
  tmp = temporary_name(p)
  try:
    tmp.write_text(text)
    os.replace(tmp, p)
  except BaseException:
    with contextlib.suppress(OSError):
      remove_path(tmp)
    raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
  atomic_write_text(path, json.dumps(jsonable.to_jsonable(obj), indent=2) + "\n")
