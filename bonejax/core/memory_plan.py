"""Memory bounds checked before allocation: what this process may still allocate, and a refusal
naming the value and the bytes it would need when a plan does not fit.

A flag or a file header can ask for any size (`--resample_um=0.0001`, a zarr.json claiming
100000^3, an ImageJ TIFF claiming 2e9 images). Allocating first and failing later is no option:
the kernel kills the process (or the machine swaps) before Python sees a MemoryError. So every
command sizes its work first and calls `require_fits`, which raises a `UserError` (exit 2, one
line) when the bytes exceed what is available.

What is available is the smallest of: the machine's free memory (`MemAvailable` in
/proc/meminfo, else `os.sysconf`), the room left under the process's cgroup limit (v2 or v1:
containers and job schedulers set these; /proc/meminfo does not show them), the room left under
`RLIMIT_AS` (address space; what tests use to fence memory bombs), and a caller's budget
(`--memory_budget_gb`). `require_disk` does the same for what a command writes and the free
space where it goes. This module imports nothing from bonejax but `errors`.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
from pathlib import Path

from bonejax.core import errors

GIB = 1 << 30


def format_bytes(n: float) -> str:
  """1536 -> '1.5 KiB'; the unit grows with the number (B, KiB, MiB, GiB, TiB, PiB, EiB)."""
  n = float(n)
  for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
    if abs(n) < 1024:
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:,.1f} EiB"


def _meminfo() -> dict[str, int]:
  info = {}
  with contextlib.suppress(OSError, ValueError, IndexError):
    for line in Path("/proc/meminfo").read_text().splitlines():
      key, _, value = line.partition(":")
      parts = value.split()
      info[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
  return info


def physical_bytes() -> int | None:
  """The machine's RAM."""
  with contextlib.suppress(ValueError, OSError, AttributeError):
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  return _meminfo().get("MemTotal")


def machine_available_bytes() -> int | None:
  """Free RAM (and swap) as the kernel counts it: MemAvailable includes reclaimable cache."""
  info = _meminfo()
  if "MemAvailable" in info:
    return info["MemAvailable"] + info.get("SwapFree", 0)
  with contextlib.suppress(ValueError, OSError, AttributeError):
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  return None


def _read_int(p: Path) -> int | None:
  try:
    text = p.read_text().strip()
  except OSError:
    return None
  if text == "max":
    return None
  try:
    return int(text)
  except ValueError:
    return None


def _stat_value(p: Path, key: str) -> int:
  with contextlib.suppress(OSError, ValueError):
    for line in p.read_text().splitlines():
      k, _, v = line.partition(" ")
      if k == key:
        return int(v)
  return 0


def _cgroup_dirs() -> list[tuple[int, Path]]:
  """(version, directory) of this process's memory cgroup(s), innermost first."""
  found = []
  root = Path("/sys/fs/cgroup")
  with contextlib.suppress(OSError):
    for line in Path("/proc/self/cgroup").read_text().splitlines():
      parts = line.split(":", 2)
      if len(parts) != 3:
        continue
      _, controllers, rel = parts
      rel = rel.lstrip("/")
      if controllers == "":  # cgroup v2 (unified)
        for base in (root / rel, root / "unified" / rel, root):
          if (base / "memory.max").exists():
            found.append((2, base))
            break
      elif "memory" in controllers.split(","):
        for base in (root / "memory" / rel, root / "memory"):
          if (base / "memory.limit_in_bytes").exists():
            found.append((1, base))
            break
  return found


def cgroup_room_bytes() -> int | None:
  """Bytes left under this process's cgroup memory limit (its reclaimable page cache counted as
  free), or None when no limit is set."""
  room = None
  for version, d in _cgroup_dirs():
    if version == 2:
      limit, used = _read_int(d / "memory.max"), _read_int(d / "memory.current")
      cache = _stat_value(d / "memory.stat", "inactive_file")
    else:
      limit, used = _read_int(d / "memory.limit_in_bytes"), _read_int(d / "memory.usage_in_bytes")
      cache = _stat_value(d / "memory.stat", "total_inactive_file")
      if limit is not None and limit >= 1 << 60:  # v1's "no limit" is a huge number
        limit = None
    if limit is None or used is None:
      continue
    r = max(0, limit - used + cache)
    room = r if room is None else min(room, r)
  return room


def address_space_room_bytes() -> int | None:
  """Bytes left under RLIMIT_AS (the soft limit less what is mapped now), or None without one."""
  soft, _ = resource.getrlimit(resource.RLIMIT_AS)
  if soft == resource.RLIM_INFINITY:
    return None
  info = {}
  with contextlib.suppress(OSError, ValueError, IndexError):
    for line in Path("/proc/self/status").read_text().splitlines():
      key, _, value = line.partition(":")
      if key == "VmSize":
        info[key] = int(value.split()[0]) * 1024
  return max(0, soft - info.get("VmSize", 0))


def available_bytes() -> tuple[int | None, str]:
  """(bytes this process may still allocate, what limits it: words for an error line)."""
  candidates = [(machine_available_bytes(), "available on this machine"),
                (cgroup_room_bytes(), "left under this process's cgroup memory limit"),
                (address_space_room_bytes(), "left under this process's address-space limit "
                                             "(ulimit -v)")]
  known = [(n, why) for n, why in candidates if n is not None]
  if not known:
    return None, "unknown"
  return min(known, key=lambda c: c[0])


def budget_bytes(budget_gb: float | None = None,
                 flag: str = "--memory_budget_gb") -> tuple[int | None, str]:
  """(the bytes a plan may use, words naming the limit): the machine's available memory, or
  the caller's budget in GiB when that is smaller."""
  avail, why = available_bytes()
  limit = (avail, f"{format_bytes(avail)} {why}") if avail is not None else (None, why)
  if budget_gb is not None:
    budget = float(budget_gb)
    if not budget > 0:
      raise errors.UserError(f"{flag}={budget_gb} must be positive")
    b = int(budget * GIB)
    if limit[0] is None or b < limit[0]:
      limit = (b, f"{flag}={budget_gb:g} allows {format_bytes(b)}")
  return limit


def require_fits(what: str, nbytes: int, budget_gb: float | None = None,
                 flag: str = "--memory_budget_gb", hint: str = "") -> int:
  """Raises a UserError naming `what` and the bytes when `nbytes` exceed the limit of
  `budget_bytes`; returns the limit (or `nbytes` when the limit is unknown).

  `what` names the value that asks for the memory, e.g. "--resample_um=0.0001: the resampled
  scan (800000, 1600000, 1600000)"; `hint` is added after the numbers (what to do instead).
  """
  limit, why = budget_bytes(budget_gb, flag)
  if limit is not None and int(nbytes) > limit:
    raise errors.UserError(f"{what} needs {format_bytes(nbytes)} of memory, but {why}"
                           + (f"; {hint}" if hint else ""))
  return limit if limit is not None else int(nbytes)


def largest_fitting(per_unit_bytes: int, fixed_bytes: int, wanted: int,
                    limit: int | None) -> int:
  """The largest count n <= `wanted` with fixed + n * per_unit <= limit (0 when not even one
  fits); `wanted` when the limit is unknown. Sizes slabs to memory."""
  if limit is None:
    return wanted
  room = limit - fixed_bytes
  if room < per_unit_bytes:
    return 0
  return int(min(wanted, room // max(1, per_unit_bytes)))


def plan_slab(what: str, slice_bytes: int, fixed_bytes: int, slab: int,
              budget_gb: float | None = None, flag: str = "--memory_budget_gb",
              hint: str = "") -> int:
  """The number of slices (at most `slab`) a streamed pass may hold at once: `fixed_bytes` plus
  that many times `slice_bytes` within the budget. Refuses (one line naming `what` and the
  bytes) when not even one slice fits."""
  limit, _ = budget_bytes(budget_gb, flag)
  fits = largest_fitting(int(slice_bytes), int(fixed_bytes), int(slab), limit)
  if fits < 1:
    require_fits(f"{what}: one slice", int(slice_bytes) + int(fixed_bytes), budget_gb, flag, hint)
  return max(1, fits)


def require_planes_fit(what: str, shape, bytes_per_voxel: int, budget_gb: float | None = None,
                       extra_bytes: int = 0, flag: str = "--memory_budget_gb") -> None:
  """Refuses a volume whose largest 2D plane (of the three axes) does not fit: what a
  slab-by-slab or out-of-core run still holds at once, whatever its slab size. `what` names
  the input (and its resampling); `bytes_per_voxel`: all the run keeps per plane voxel (input
  channels, probabilities, sums); `extra_bytes`: fixed costs (e.g. a resampler's input
  slices)."""
  z, y, x = (int(s) for s in tuple(shape)[:3])
  plane = max(y * x, z * x, z * y)
  require_fits(f"{what}: one plane of its {(z, y, x)} voxels", plane * int(bytes_per_voxel)
               + int(extra_bytes), budget_gb, flag,
               hint="crop or downsample the volume, or raise the budget")


# ---------------------------------------------------------------------------------------------
# Disk: what a command writes, checked against the free space of where it goes.
# ---------------------------------------------------------------------------------------------


def _existing_ancestor(path: Path) -> Path:
  p = Path(os.path.abspath(os.fspath(path)))
  while not p.exists() and p.parent != p:
    p = p.parent
  return p


def require_disk(parts, hint: str = "") -> None:
  """Refuses (one `UserError` line) when the files `parts` (what, bytes, destination path) will
  write exceed the free space of the filesystem each goes to (parts on one filesystem add up):
  a full disk found half-way leaves a long run lost and, worse, other programs starved.

  The sizes are what the command knows it will write (raw arrays; for compressed ones a
  lower bound), so the check refuses only what cannot fit."""
  by_fs: dict[int, list] = {}
  for what, nbytes, dest in parts:
    if int(nbytes) <= 0:
      continue
    where = _existing_ancestor(dest)
    try:
      dev = os.stat(where).st_dev
    except OSError:
      continue
    by_fs.setdefault(dev, []).append((what, int(nbytes), where))
  for items in by_fs.values():
    where = items[0][2]
    try:
      free = shutil.disk_usage(where).free
    except OSError:
      continue
    total = sum(n for _, n, _ in items)
    if total > free:
      whats = " and ".join(w for w, _, _ in items)
      raise errors.UserError(f"{whats} need(s) {format_bytes(total)} of disk, "
                             f"{format_bytes(free)} free on {where}"
                             + (f"; {hint}" if hint else ""))
