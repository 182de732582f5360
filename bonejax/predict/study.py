"""Many scans with one model: one compile, one output per scan, resumable, shared, summarised.

`launch/predict.py --input` may name a study instead of one volume (`is_study`): a dataset (its
dataset.json lists the scans), a folder of scans or volume files, a glob, or a list file (.txt,
.lst, .list: one path a line, `#` comments). Each scan's outputs go to `--output` (a directory
then) as NAME.zarr (or .ome.zarr / .tif), through the same `Predictor`: the bundle is loaded
and its functions compiled once for all of them.

- Resumable. A scan whose outputs all exist is kept and skipped; a killed run leaves complete
  outputs and, for the scan it was on, only temporaries (removed by the next run), so running
  the same command again resumes at the first incomplete scan. Without --overwrite an existing
  output is never replaced; with it, what this summary records as done with the same settings
  is kept (a resumed --overwrite run does not start again).
- Shared. Several processes (one job: the multi-host flags) each take a first scan of their
  own, then the next untaken one from a counter in the coordination service, each scan whole
  on one process. Independent runs on the same study
  (e.g. a job array) share it too: a scan whose output another live run has claimed is left to
  that run.
- Summarised. `summary.json` and `summary.csv` in the output directory have a row per scan
  (status, seconds, voxels/s, shape, error), rewritten under a file lock after every scan, so
  a killed run's summary holds what it finished. A scan that cannot be read or predicted gets
  its one-line error there and the others go on (`fail_fast`: stop at once); the run then
  exits non-zero.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob as glob_lib
import hashlib
import io
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import bonejax
from bonejax.core import errors, outputs
from bonejax.core.distributed import SINGLE, Group
from bonejax.core.ownership import short_list as _list
from bonejax.io import registry, slices, tiff

LIST_SUFFIXES = (".txt", ".lst", ".list")
FORMATS = {"zarr": ".zarr", "ome.zarr": ".ome.zarr", "tif": ".tif"}
SUMMARY_JSON, SUMMARY_CSV = "summary.json", "summary.csv"
# Files inside a folder that make it a folder of volumes, not one volume of 2D slices.
# (TIFFs are either: a 3D TIFF is a volume, a 2D one a slice.)
_VOLUME_SUFFIXES = (".zarr",) + tuple(s for r in registry.READERS for s in r.suffixes
                                      if s not in tiff.SUFFIXES)
# Test hook: "K" makes a process kill itself (SIGKILL) in the middle of its (K+1)-th scan, once
# that scan's outputs are open (claims and temporaries exist): how tests kill a study half-way.
KILL_AFTER_ENV = "BONEJAX_TEST_STUDY_KILL_AFTER"
_CSV_FIELDS = ("scan", "status", "seconds", "voxels", "voxels_per_second", "shape", "input",
               "output", "process", "error")


@dataclasses.dataclass(frozen=True)
class Item:
  name: str   # the output's stem
  path: Path  # the input


# ---------------------------------------------------------------------------------------------
# What a study is.
# ---------------------------------------------------------------------------------------------


def _has_glob(spec: str) -> bool:
  return any(c in spec for c in "*?[")


def _is_zarr(p: Path) -> bool:
  return any((p / n).exists() for n in ("zarr.json", ".zarray", ".zgroup"))


def _volume_entries(folder: Path) -> list[Path]:
  """The volumes of a folder of scans: scans and zarr arrays, volume files, 3D TIFFs."""
  found = []
  for p in sorted(folder.iterdir(), key=lambda q: slices.natural_key(q.name)):
    if p.name.startswith("."):
      continue
    if p.is_dir():
      if _is_zarr(p):
        found.append(p)
    elif p.suffix.lower() in _VOLUME_SUFFIXES:
      found.append(p)
    elif p.suffix.lower() in tiff.SUFFIXES and _tiff_pages(p) > 1:
      found.append(p)
  return found


def _tiff_pages(p: Path) -> int:
  try:
    import tifffile
    with tifffile.TiffFile(p) as tif:
      series = tif.series[0] if tif.series else None
      return 1 if series is None or len(series.shape) < 3 else int(series.shape[0])
  except Exception:  # pylint: disable=broad-except  # unreadable: not a 3D TIFF (its own error)
    return 0


def is_study(spec: str | os.PathLike) -> bool:
  """Whether `--input` names many scans (see the module docstring) rather than one volume."""
  p = Path(spec)
  if not p.exists():
    return _has_glob(str(spec))
  if p.is_file():
    return p.suffix.lower() in LIST_SUFFIXES
  if (p / "dataset.json").is_file():
    return True
  if _is_zarr(p):
    return False  # a scan, or a zarr array
  # A folder of 2D slices is one volume; a folder holding scans or volume files is a study.
  return bool(_volume_entries(p))


def _stem(p: Path) -> str:
  name = p.name
  for suffix in (".ome.zarr",) + _VOLUME_SUFFIXES + tiff.SUFFIXES:
    if name.lower().endswith(suffix) and len(name) > len(suffix):
      return name[:-len(suffix)]
  return name


def list_scans(spec: str | os.PathLike) -> list[Item]:
  """The scans of a study, in order; one line naming the problem when there are none or two
  would share an output name."""
  p = Path(spec)
  if not p.exists():
    paths = [Path(x) for x in sorted(glob_lib.glob(str(spec)), key=slices.natural_key)]
    what = f"the glob {str(spec)!r}"
  elif p.is_file():
    paths = _read_list(p)
    what = f"the list {str(p)!r}"
  elif (p / "dataset.json").is_file():
    from bonejax.data import store
    ds = store.open_dataset(p)
    items = [Item(name, ds.scan_path(name)) for name in ds.scans]
    return _checked(items, f"the dataset {str(p)!r}")
  else:
    paths, what = _volume_entries(p), f"the folder {str(p)!r}"
  return _checked([Item(_stem(q), q) for q in paths], what)


def _read_list(p: Path) -> list[Path]:
  try:
    lines = p.read_text().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise errors.UserError(f"cannot read the list {str(p)!r}: {errors.short_message(e)}") from None
  out = []
  for line in lines:
    line = line.strip()
    if line and not line.startswith("#"):
      q = Path(line).expanduser()
      out.append(q if q.is_absolute() else p.parent / q)  # relative to the list's folder
  return out


def _checked(items: list[Item], what: str) -> list[Item]:
  if not items:
    raise errors.UserError(f"{what} names no scans")
  seen: dict[str, Path] = {}
  for it in items:
    if it.name in seen:
      raise errors.UserError(f"{what}: {str(seen[it.name])!r} and {str(it.path)!r} would both "
                             f"be written as {it.name!r}")
    seen[it.name] = it.path
  return items


# ---------------------------------------------------------------------------------------------
# The summary table.
# ---------------------------------------------------------------------------------------------


class Summary:
  """summary.json / summary.csv in the output directory, shared by every process of the study
  (each change is a read-modify-write under a file lock)."""

  def __init__(self, out_dir: Path, items: Sequence[Item], settings: dict[str, Any]):
    self.dir, self.items, self.settings = Path(out_dir), list(items), settings
    self.json_path, self.csv_path = self.dir / SUMMARY_JSON, self.dir / SUMMARY_CSV

  def _read(self) -> dict[str, Any]:
    try:
      data = json.loads(self.json_path.read_text())
    except (OSError, ValueError):
      return {}
    return data if isinstance(data, dict) else {}

  def earlier(self) -> tuple[dict[str, dict], dict[str, Any] | None]:
    """(rows by scan, settings) of the summary on disk."""
    data = self._read()
    rows = {r.get("scan"): r for r in data.get("scans", []) if isinstance(r, dict)}
    return rows, data.get("settings")

  @contextlib.contextmanager
  def editing(self) -> Iterator[dict[str, dict]]:
    """The rows by scan, to change in place; written back (JSON and CSV) afterwards."""
    with outputs.locked(self.dir / ".summary.lock"):
      rows, _ = self.earlier()
      yield rows
      table = [rows.get(it.name) or _row(it, "pending") for it in self.items]
      outputs.atomic_write_json(self.json_path, {"bonejax_version": bonejax.__version__,
                                                 "settings": self.settings, "scans": table})
      outputs.atomic_write_text(self.csv_path, _csv(table))

  def set(self, row: dict[str, Any]) -> None:
    with self.editing() as rows:
      rows[row["scan"]] = row


def _row(it: Item, status: str, **kw: Any) -> dict[str, Any]:
  return {"scan": it.name, "status": status, "input": str(it.path), "output": None,
          "seconds": None, "voxels": None, "voxels_per_second": None, "shape": None,
          "process": None, "error": None, "settings_id": None, **kw}


def _csv(rows: Sequence[dict[str, Any]]) -> str:
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(_CSV_FIELDS)
  for r in rows:
    w.writerow(["x".join(map(str, r["shape"])) if f == "shape" and r.get("shape")
                else ("" if r.get(f) is None else r.get(f)) for f in _CSV_FIELDS])
  return buf.getvalue()


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  """The summary as an aligned text table (stderr at the end of a run)."""
  lines = [f"{'scan':<24} {'status':<8} {'seconds':>9} {'voxels/s':>12}  error"]
  for r in rows:
    sec = f"{r['seconds']:.2f}" if r.get("seconds") is not None else "-"
    rate = f"{r['voxels_per_second']:.4g}" if r.get("voxels_per_second") is not None else "-"
    lines.append(f"{r['scan'][:24]:<24} {r['status']:<8} {sec:>9} {rate:>12}  "
                 f"{r.get('error') or ''}".rstrip())
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a study's outputs go: `output` (labels) and optional probability / uncertainty
  directories, one NAME + suffix per scan in each."""
  output: Path
  suffix: str = ".zarr"
  probs: Path | None = None
  uncertainty: Path | None = None
  with_image: bool = False  # .ome.zarr outputs also hold the input image
  postprocess: str | None = None  # clean-up rules for every scan's labels

  def paths(self, it: Item) -> dict[str, Path]:
    out = {"output": self.output / f"{it.name}{self.suffix}"}
    if self.probs is not None:
      out["save_probs"] = self.probs / f"{it.name}.zarr"
    if self.uncertainty is not None:
      out["save_uncertainty"] = self.uncertainty / f"{it.name}.zarr"
    return out

  def check(self, inputs: Sequence[Any]) -> None:
    dirs = [d for d in (self.output, self.probs, self.uncertainty) if d is not None]
    for d in dirs:
      outputs.check_not_input(d, inputs, "output directory")
      if d.exists() and not d.is_dir():
        raise errors.UserError(f"--output {str(d)!r} must be a directory for a study of scans")
      outputs.make_dirs(Path(os.path.abspath(d)))


def _abs_paths(layout: Layout, it: Item) -> dict[str, Path]:
  return {k: Path(os.path.abspath(p)) for k, p in layout.paths(it).items()}


def _complete(paths: dict[str, Path]) -> bool:
  return all(p.exists() or p.is_symlink() for p in paths.values())


def _todo(items: Sequence[Item], layout: Layout, summary: Summary, overwrite: bool,
          settings: dict[str, Any]) -> tuple[list[Item], dict[str, dict]]:
  """(scans to predict, rows of the scans kept); records the kept ones in the summary."""
  todo, kept = [], {}
  run_id = settings_id(settings)
  with summary.editing() as rows:
    other = sorted({r.get("settings_id") for r in rows.values()
                    if r.get("status") in ("done", "kept") and r.get("settings_id") != run_id},
                   key=str)
    if other and not overwrite:
      _say(f"note: some complete outputs in {str(layout.output)!r} were predicted with other "
           f"settings; they are kept as they are (--overwrite predicts them again)")
    for it in items:
      paths = _abs_paths(layout, it)
      for p in paths.values():
        with contextlib.suppress(outputs.OutputBusy):  # another run is writing it: its own
          outputs.restore_interrupted(p)
      old = rows.get(it.name) or {}
      same = old.get("status") in ("done", "kept") and old.get("settings_id") == run_id
      if _complete(paths) and (not overwrite or same):
        kept[it.name] = {**_row(it, "kept", output=str(paths["output"])),
                         **{k: old.get(k) for k in ("seconds", "voxels", "voxels_per_second",
                                                    "shape", "process", "settings_id") if old}}
        rows[it.name] = kept[it.name]
      else:
        todo.append(it)
        rows[it.name] = _row(it, "pending")
  return todo, kept


def settings_id(settings: dict[str, Any]) -> str:
  """A short fingerprint of the settings a row's outputs were predicted with."""
  text = json.dumps(settings, sort_keys=True, default=str)
  return hashlib.sha1(text.encode()).hexdigest()[:12]


def _queue(group: Group, todo: Sequence[Item], fail_fast: bool) -> Iterator[Item]:
  """This process's scans: the next untaken one each time (one counter for all processes).
  With `fail_fast`, another process's failure stops this one before its next scan; without,
  the survivors of a dead process finish the study (its scan is left to a rerun)."""
  if group.size == 1:
    yield from todo
    return
  if group.index < len(todo):  # each its own first scan, then the next one nobody took
    yield todo[group.index]
  key = f"{group.ns}/study/next"
  while True:
    if fail_fast:
      group.check("the study")
    i = group.size + int(group.client.key_value_increment(key, 1)) - 1
    if i >= len(todo):
      return
    yield todo[i]


def _say(text: str) -> None:
  print(text, file=sys.stderr, flush=True)


def predict_one(predictor: Any, it: Item, paths: dict[str, Path], overwrite: bool,
                index: int, run_id: str | None = None, progress: Any = None,
                with_image: bool = False, postprocess: str | None = None
                ) -> dict[str, Any] | None:
  """One scan, its outputs claimed first; its row, or None when another live run has it."""
  with contextlib.ExitStack() as claims:
    for p in paths.values():
      try:
        claims.enter_context(outputs.claim_output(p))
      except outputs.OutputBusy:
        return None  # another run is writing it: its summary row is that run's
    missing = {k: p for k, p in paths.items() if not (p.exists() or p.is_symlink())}
    if not missing and not overwrite:
      return _row(it, "kept", output=str(paths["output"]))  # finished meanwhile by another run
    todo = paths if overwrite else missing
    for p in todo.values():
      outputs.check_not_input(p, [it.path])
    t0 = time.perf_counter()
    res = predictor.predict(it.path, todo.get("output"), save_probs=todo.get("save_probs"),
                            save_uncertainty=todo.get("save_uncertainty"),
                            overwrite=overwrite, keep_labels=False, progress=progress,
                            with_image=with_image, postprocess=postprocess)
  seconds = time.perf_counter() - t0
  voxels = 1
  for s in res["shape"]:
    voxels *= int(s)
  return _row(it, "done", output=str(paths["output"]), seconds=round(seconds, 3),
              voxels=voxels, voxels_per_second=round(voxels / max(seconds, 1e-9), 1),
              shape=res["shape"], process=index, settings_id=run_id)


def run_study(predictor: Any, items: Sequence[Item], layout: Layout, *, overwrite: bool = False,
              fail_fast: bool = False, group: Group = SINGLE,
              settings: dict[str, Any] | None = None) -> dict[str, Any]:
  """Predicts every scan of `items` not already complete; returns the result dict (process 0's
  holds the whole table). Raises `errors.UserError` at the end when a scan failed."""
  start = time.perf_counter()
  settings = settings or {}
  layout.check(())  # the directories (the command checked them against its inputs)
  summary = Summary(layout.output, items, settings)
  todo: list[Item] = []
  if group.is_main:
    todo, kept = _todo(items, layout, summary, overwrite, settings)
    if kept:
      _say(f"note: {len(kept)} of {len(items)} scans already complete, kept: "
           f"{_list(sorted(kept))}")
  names = group.broadcast_json("study scans", [it.name for it in todo])
  by_name = {it.name: it for it in items}
  todo = [by_name[n] for n in names]
  group.barrier("study start")  # every process is ready: they start taking scans together
  failed = _run_queue(predictor, todo, layout, summary, overwrite, fail_fast, group, len(items))
  devices = group.allgather("study done", str(predictor.engine.num_devices))
  # The others leave only once process 0 has the gathered values: a wait that finds a process
  # gone before it looks again would take its leaving for a death (process 0 never waits here).
  group.broadcast("study summary read", "1")
  rows, _ = summary.earlier()
  table = [rows.get(it.name) or _row(it, "pending") for it in items]
  if group.is_main:
    _say(format_table(table))
  counts = {s: sum(r["status"] == s for r in table) for s in ("done", "kept", "failed",
                                                               "pending")}
  mine = [r for r in table if r["status"] == "done"]
  seconds = time.perf_counter() - start
  voxels = sum(int(r["voxels"]) for r in mine)
  result = {"output": str(layout.output), "scans": len(items), **counts,
            "summary": str(summary.json_path), "summary_csv": str(summary.csv_path),
            "seconds": round(seconds, 3),
            "voxels_per_second": round(voxels / max(seconds, 1e-9), 1),
            "processes": group.size, "devices": sum(int(d) for d in devices),
            "planes": predictor.settings.planes, "vote": predictor.settings.vote,
            "classes": predictor.classes}
  bad = [r for r in table if r["status"] == "failed"]
  if bad or failed:
    first = bad[0] if bad else failed[0]
    raise errors.UserError(f"{len(bad) or len(failed)} of {len(items)} scans failed (the others "
                           f"are complete; see {str(summary.json_path)!r}): {first['scan']}: "
                           f"{first['error']}")
  return result


def _run_queue(predictor: Any, todo: Sequence[Item], layout: Layout, summary: Summary,
               overwrite: bool, fail_fast: bool, group: Group, total: int) -> list[dict]:
  """This process's share of `todo`; the rows of the scans that failed here."""
  failed = []
  for n, it in enumerate(_queue(group, todo, fail_fast), 1):
    paths = _abs_paths(layout, it)
    _say(f"scan {it.name} ({str(it.path)!r})" + (f", process {group.index}"
                                                 if group.size > 1 else ""))
    try:
      row = predict_one(predictor, it, paths, overwrite, group.index,
                        settings_id(summary.settings), _test_kill(n - 1), layout.with_image,
                        layout.postprocess)
    except KeyboardInterrupt:
      raise
    except Exception as e:  # pylint: disable=broad-except  # recorded; the others go on
      line = _one_line(e)
      row = _row(it, "failed", output=str(paths["output"]), error=line, process=group.index)
      _say(f"error: scan {it.name}: {line}")
      summary.set(row)
      failed.append(row)
      if fail_fast:
        raise errors.UserError(f"scan {it.name} ({str(it.path)!r}): {line}") from None
      continue
    if row is None:
      _say(f"note: scan {it.name} is being predicted by another run: left to it")
      continue
    summary.set(row)
    if row["status"] == "done":
      _say(f"scan {it.name}: {row['seconds']:.2f} s, {row['voxels_per_second']:.4g} voxels/s "
           f"({n} here, {total} in the study)")
  return failed


def _test_kill(done_here: int) -> Any:
  """A progress that SIGKILLs this process at its first update (`KILL_AFTER_ENV`), or None."""
  spec = os.environ.get(KILL_AFTER_ENV)
  if not spec or int(spec) != done_here:
    return None
  from bonejax.core.progress import Progress

  class _Kill(Progress):
    def update(self, n: int = 1, extra: str = "") -> None:
      os.kill(os.getpid(), signal.SIGKILL)

  return _Kill(desc="predict", unit="planes")


def _one_line(e: BaseException) -> str:
  if isinstance(e, errors.UserError):
    return errors.one_line(e)
  return errors.io_error(e) or f"{type(e).__name__}: {errors.short_message(e)}"
