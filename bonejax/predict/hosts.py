"""One volume predicted by several processes (hosts): who does what, and the files they share.

Every process runs the same passes over the same volume (`runner`), each on its own share of the
planes: a contiguous range along the pass's axis whose ends are chunk boundaries of the arrays
it writes (`share`), so no two processes ever write the same chunk. Accumulators, rotated
volumes and the outputs are zarr arrays on a filesystem all processes share, beside the output;
the processes meet at barriers (`distributed.Group`) between passes, since each pass reads what
the previous one wrote everywhere.

Process 0 owns everything with a name: it claims the outputs (the only holder of their
`outputs.claim_output` locks), creates the scratch directory (`.bonejax-predict-HOST-PID-RAND`,
with its own host and pid, so the stale clean-up of `outputs.scratch_dir` stays right: only
process 0's host can tell whether that pid is gone, and only a run there removes it), creates
every shared array before the others open it, writes the attributes and renames the outputs
into place after the last barrier. The others only write inside what it made. A path that is
not on a shared filesystem shows as a directory process 0 made that another process cannot
find: one line, and no output marked complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

import tensorstore as ts

from bonejax.core import errors, jsonable, outputs
from bonejax.core.distributed import SINGLE, Group
from bonejax.predict import memory, source
from bonejax.predict.volumes import SlabVolume

TOKEN = "shared-token"


def share(n: int, unit: int, group: Group = SINGLE) -> tuple[int, int]:
  """This process's [lo, hi) of n planes: contiguous, ends on multiples of `unit` (or n)."""
  if group.size == 1:
    return 0, n
  units = -(-n // max(1, unit))
  lo = units * group.index // group.size
  hi = units * (group.index + 1) // group.size
  return min(n, lo * unit), min(n, hi * unit)


def chunk_edge(arr: ts.TensorStore, axis: int = 0) -> int:
  """The chunk edge of a tensorstore array along `axis` (its write chunk)."""
  return int(arr.chunk_layout.write_chunk.shape[axis])


def unit_of(arrays: Sequence[Any], axis: int = 0) -> int:
  """The least common multiple of the arrays' chunk edges along `axis` (None entries skipped)."""
  return math.lcm(*[chunk_edge(a, axis) for a in arrays if a is not None] or [1])


def _not_shared(path: Path, what: str) -> errors.UserError:
  return errors.UserError(f"{what} {str(path)!r}, made by process 0, is not visible here: the "
                       f"output directory must be on a filesystem all processes share (the "
                       f"same path on every host)")


def open_array(path: Path, context: ts.Context, what: str = "the shared array") -> ts.TensorStore:
  """An existing zarr array another process created (read and write)."""
  if not (Path(path) / "zarr.json").exists():
    raise _not_shared(Path(path), what)
  spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
  return ts.open(spec, open=True, read=True, write=True, context=context).result()


def shared_array(group: Group, path: Path, create, context: ts.Context,
                 what: str = "the shared array") -> ts.TensorStore:
  """Process 0 calls `create()`; after a barrier the others open what it made."""
  arr = create() if group.is_main else None
  group.barrier(f"create {Path(path).name}")
  return arr if arr is not None else open_array(path, context, what)


@contextlib.contextmanager
def scratch_dir(group: Group, parent: Path) -> Iterator[Path]:
  """One scratch directory for all processes, beside the output; removed by process 0.

  Process 0 makes it (removing stale ones of its host first) and writes a random token in it;
  every other process must find the same token there, else the directory is not shared.
  """
  if group.is_main:
    with outputs.scratch_dir(parent) as path:
      token = uuid.uuid4().hex
      (path / TOKEN).write_text(token)
      group.broadcast_json("scratch", [path.name, token])
      group.barrier("scratch checked")
      yield path
    return
  name, token = group.broadcast_json("scratch")
  path = Path(os.path.abspath(parent)) / name
  try:
    seen = (path / TOKEN).read_text()
  except OSError:
    seen = None
  if seen != token:
    raise _not_shared(path, "the scratch directory")
  group.barrier("scratch checked")
  yield path


@contextlib.contextmanager
def atomic_output(group: Group, path: str | os.PathLike, overwrite: bool,
                  what: str = "output") -> Iterator[Path]:
  """`outputs.atomic_output` for all processes: process 0 holds it (claim, temporary name,
  final rename once the block ends without error everywhere); the others get the same
  temporary path to write their shares into."""
  if group.is_main:
    with outputs.atomic_output(path, overwrite, what=what) as tmp:
      group.broadcast("temporary " + str(what), tmp.name)
      yield tmp
    return
  name = group.broadcast("temporary " + str(what))
  yield Path(os.path.abspath(os.fspath(path))).parent / name


def agree(group: Group, **arguments: Any) -> None:
  """Fails in every process (the same line) unless all were given the same `arguments`:
  shares of different predictions must never meet in one output."""
  mine = json.dumps(jsonable.to_jsonable(arguments), sort_keys=True)
  every = [json.loads(v) for v in group.allgather("arguments", mine)]
  for i, theirs in enumerate(every[1:], 1):
    diff = [k for k in sorted(every[0]) if theirs.get(k) != every[0][k]]
    if diff:
      what = ", ".join(f"{k}={theirs.get(k)!r} (process 0: {every[0][k]!r})" for k in diff)
      raise errors.UserError(f"process {i} was started with other arguments or input than "
                          f"process 0: {what}")


def load_source(group: Group, src: Any, stats: dict[str, Any] | None, *, out_of_core: bool,
                scratch_dir: Path | None, budget_bytes: int, progress: bool):
  """`source.load_source` for all processes: (SlabVolume, statistics), the same everywhere.

  In memory every process reads the input itself; out of core an input that is not a scan is
  copied once, by process 0, into the shared scratch. Everyone normalises with process 0's
  statistics (computed ones could differ in the last bit between hosts with other budgets).
  """
  kw = dict(out_of_core=out_of_core, scratch_dir=scratch_dir, budget_bytes=budget_bytes,
            progress=progress)
  if group.size == 1:
    return source.load_source(src, stats, **kw)
  copied = out_of_core and not (stats is not None and src.kind == "scan"
                                and src.tensorstore is not None)
  vol = None
  if group.is_main or not copied:
    vol, stats = source.load_source(src, stats, **kw)
  if copied:
    group.barrier("input copied")
    if vol is None:
      vol = SlabVolume(open_array(scratch_dir / "input.zarr", memory.cache_context(8 << 20, 1.0),
                                  "the copied input"))
  return vol, group.broadcast_json("statistics", stats if group.is_main else None)
