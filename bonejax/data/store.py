"""Scans and datasets on disk: zarr v3 through tensorstore, in the contract's layout.

    DATA/
      dataset.json        {"classes": [...], "scans": [...]}
      scan_000/           zarr v3 group (zarr.json holds the attributes)
        image/            zarr v3 array (Z, Y, X), uint8 | uint16 | float32
        labels/           zarr v3 array (Z, Y, X), uint8, optional

All arrays opened here share one tensorstore context, so one bounded chunk cache serves every
reader in the process (patch streams, predictor, metrics).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tensorstore as ts

from bonejax.core import errors, jsonable, outputs

IMAGE_DTYPES = ("uint8", "uint16", "float32")
LABEL_DTYPE = "uint8"
DEFAULT_CHUNKS = (64, 64, 64)
DEFAULT_CACHE_BYTES = 512 << 20
DATASET_JSON = "dataset.json"

_CONTEXT: ts.Context | None = None


def context() -> ts.Context:
  """The process-wide tensorstore context (bounded chunk cache, shared by all arrays)."""
  global _CONTEXT
  if _CONTEXT is None:
    limit = int(os.environ.get("BONEJAX_CACHE_BYTES", DEFAULT_CACHE_BYTES))
    _CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": limit}})
  return _CONTEXT


# ---------------------------------------------------------------------------------------------
# Arrays.
# ---------------------------------------------------------------------------------------------


def _chunks_for(shape: Sequence[int], chunks: Sequence[int]) -> list[int]:
  return [max(1, min(int(c), int(s))) for c, s in zip(chunks, shape)]


_shared_context = context  # create_array's `context` argument hides the function


def create_array(path: str | os.PathLike, shape: Sequence[int], dtype: str | np.dtype,
                 chunks: Sequence[int] = DEFAULT_CHUNKS, fill_value: Any = 0,
                 compression_level: int | None = 1,
                 context: ts.Context | None = None) -> ts.TensorStore:
  """Creates (replacing) a chunked zarr v3 array; zstd level 1 keeps writes cheap.

  Axes beyond `chunks` (the channels of a (Z, Y, X, C) array) are one chunk each.
  `compression_level=None` stores raw chunks (scratch arrays that do not compress).
  `context`: the tensorstore context (its chunk cache) to open it in; default the shared one.
  """
  dtype = np.dtype(dtype).name
  shape = [int(s) for s in shape]
  codecs = [{"name": "bytes", "configuration": {"endian": "little"}}]
  if compression_level is not None:
    codecs.append({"name": "zstd", "configuration": {"level": int(compression_level)}})
  spec = {
      "driver": "zarr3",
      "kvstore": {"driver": "file", "path": str(path)},
      "metadata": {
          "shape": shape,
          "data_type": dtype,
          "chunk_grid": {"name": "regular",
                         "configuration": {"chunk_shape": _chunks_for(shape, chunks)
                                           + shape[len(chunks):]}},
          "codecs": codecs,
          "fill_value": fill_value,
      },
      "create": True,
      "delete_existing": True,
  }
  return ts.open(spec, context=context if context is not None else _shared_context()).result()


def open_array(path: str | os.PathLike, write: bool = False) -> ts.TensorStore:
  p = Path(path)
  if not (p / "zarr.json").exists():
    raise errors.UserError(f"{str(p)!r} is not a zarr v3 array (no zarr.json)")
  spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(p)}}
  mode = {"open": True, "read": True, "write": write}
  try:
    return ts.open(spec, context=context(), **mode).result()
  except ValueError as e:
    raise errors.UserError(f"cannot open zarr array {str(p)!r}: {errors.short_message(e)}") from None


def _marked(attrs: dict[str, Any]) -> dict[str, Any]:
  """Attributes with bonejax's mark: how --overwrite knows this node is ours to replace."""
  import bonejax
  return {**jsonable.to_jsonable(attrs), "bonejax_version": attrs.get("bonejax_version",
                                                                 bonejax.__version__)}


def set_array_attrs(path: str | os.PathLike, attrs: dict[str, Any]) -> None:
  """Stores user attributes in a zarr v3 array's zarr.json (tensorstore leaves them alone)."""
  meta_path = Path(path) / "zarr.json"
  meta = json.loads(meta_path.read_text())
  meta["attributes"] = _marked(attrs)
  outputs.atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")


def array_attrs(path: str | os.PathLike) -> dict[str, Any]:
  meta_path = Path(path) / "zarr.json"
  return dict(json.loads(meta_path.read_text()).get("attributes", {})) if meta_path.exists() else {}


def plane_index(axis: int, index: int, ndim: int = 3) -> tuple:
  sl = [slice(None)] * ndim
  sl[axis] = index
  return tuple(sl)


def slab_index(axis: int, start: int, stop: int, ndim: int = 3) -> tuple:
  sl = [slice(None)] * ndim
  sl[axis] = slice(start, stop)
  return tuple(sl)


def result(future: ts.Future, what: Any = "zarr array") -> Any:
  """`future.result()`, with a damaged chunk reported as bad input in one line, not a bug."""
  try:
    return future.result()
  except ValueError as e:
    line = errors.io_error(e)
    if line is None:
      raise
    raise errors.UserError(f"cannot read {what}: {line}") from None


def read_plane(arr: ts.TensorStore, axis: int, index: int) -> np.ndarray:
  """One 2D plane perpendicular to `axis`; only the chunks it crosses are read."""
  return result(arr[plane_index(axis, index, arr.rank)].read())


def read_slab(arr: ts.TensorStore, axis: int, start: int, stop: int) -> np.ndarray:
  return result(arr[slab_index(axis, start, stop, arr.rank)].read())


def write_slab(arr: ts.TensorStore, axis: int, start: int, data: np.ndarray) -> ts.Future:
  """Starts writing `data` at `start` along `axis`; returns the future (wait on many together)."""
  stop = start + data.shape[axis]
  return arr[slab_index(axis, start, stop, arr.rank)].write(data)


def read_box(arr: ts.TensorStore, starts: Sequence[int], sizes: Sequence[int]) -> ts.Future:
  """Starts reading an axis-aligned box; returns the future."""
  idx = tuple(slice(int(a), int(a) + int(n)) for a, n in zip(starts, sizes))
  return arr[idx].read()


# ---------------------------------------------------------------------------------------------
# Groups and scans.
# ---------------------------------------------------------------------------------------------


def write_group_attrs(path: str | os.PathLike, attrs: dict[str, Any]) -> None:
  meta = {"zarr_format": 3, "node_type": "group", "attributes": _marked(attrs)}
  outputs.atomic_write_text(Path(path) / "zarr.json", json.dumps(meta, indent=2) + "\n")


def read_group_attrs(path: str | os.PathLike) -> dict[str, Any]:
  p = Path(path) / "zarr.json"
  if not p.exists():
    raise errors.UserError(f"{str(Path(path))!r} is not a scan (no zarr.json)")
  try:
    meta = json.loads(p.read_text())
  except json.JSONDecodeError as e:
    raise errors.UserError(f"{str(p)!r} is not valid JSON: {e}") from None
  if meta.get("node_type") != "group":
    raise errors.UserError(f"{str(Path(path))!r} is a zarr {meta.get('node_type')}, not a scan group")
  return dict(meta.get("attributes", {}))


@dataclasses.dataclass
class Scan:
  """An opened scan: lazy tensorstore arrays plus the group attributes."""
  path: Path
  image: ts.TensorStore
  labels: ts.TensorStore | None
  attrs: dict[str, Any]

  @property
  def name(self) -> str:
    return self.path.name

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(int(s) for s in self.image.shape)

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(self.image.dtype.numpy_dtype)

  @property
  def stats(self) -> dict[str, float]:
    """Intensity statistics stored at import (see bonejax.io.intensity)."""
    if "intensity" not in self.attrs:
      raise errors.UserError(f"scan {self.name!r} has no intensity statistics; re-import it")
    return self.attrs["intensity"]

  @property
  def voxel_size_um(self) -> float:
    return float(self.attrs.get("voxel_size_um", 1.0))

  def read_image(self) -> np.ndarray:
    return result(self.image.read(), f"scan {str(self.path)!r}")

  def read_labels(self) -> np.ndarray:
    if self.labels is None:
      raise errors.UserError(f"scan {self.name!r} has no labels")
    return result(self.labels.read(), f"scan {str(self.path)!r}")


def is_scan(path: str | os.PathLike) -> bool:
  p = Path(path)
  return (p / "zarr.json").exists() and (p / "image" / "zarr.json").exists()


def open_scan(path: str | os.PathLike) -> Scan:
  p = Path(path)
  if not p.exists():
    raise errors.UserError(f"scan {str(p)!r} does not exist")
  attrs = read_group_attrs(p)
  if not (p / "image" / "zarr.json").exists():
    raise errors.UserError(f"scan {str(p)!r} has no image array")
  image = open_array(p / "image")
  labels = open_array(p / "labels") if (p / "labels" / "zarr.json").exists() else None
  if image.rank != 3:
    raise errors.UserError(f"scan {str(p)!r}: image must be 3D (Z, Y, X), got rank {image.rank}")
  if labels is not None and tuple(labels.shape) != tuple(image.shape):
    raise errors.UserError(f"scan {str(p)!r}: labels shape {tuple(labels.shape)} != image shape "
                        f"{tuple(image.shape)}")
  warn_missing_chunks(p, attrs)
  return Scan(p, image, labels, attrs)


# Chunks equal to the fill value are never written (tensorstore's default), so an absent chunk
# file is normally "all zeros", and a deleted one would read as zeros too. A scan therefore
# records how many chunk files each array had when it was written; fewer later means loss.
STORED_CHUNKS = "stored_chunks"
_WARNED: set[str] = set()


def count_chunks(array_path: str | os.PathLike) -> int:
  """Chunk files stored for a zarr v3 array (everything but its zarr.json)."""
  n = 0
  for root, _, files in os.walk(array_path):
    n += sum(1 for f in files if not f.startswith(".")
             and not (f == "zarr.json" and Path(root) == Path(array_path)))
  return n


def record_chunks(scan: Scan) -> None:
  """Stores the chunk count of each array in the scan's attributes (call once written)."""
  counts = {"image": count_chunks(scan.path / "image")}
  if scan.labels is not None:
    counts["labels"] = count_chunks(scan.path / "labels")
  update_scan_attrs(scan, **{STORED_CHUNKS: counts})


def missing_chunks(path: str | os.PathLike,
                   attrs: dict[str, Any] | None = None) -> dict[str, tuple[int, int]]:
  """{array: (chunks present, chunks recorded)} for the arrays of a scan that lost chunks."""
  p = Path(path)
  recorded = (attrs if attrs is not None else read_group_attrs(p)).get(STORED_CHUNKS)
  if not isinstance(recorded, dict):
    return {}  # written before scans kept the record
  lost = {}
  for name, n in recorded.items():
    if (p / name / "zarr.json").exists() and isinstance(n, int):
      have = count_chunks(p / name)
      if have < n:
        lost[name] = (have, n)
  return lost


def warn_missing_chunks(path: str | os.PathLike, attrs: dict[str, Any] | None = None) -> None:
  """One warning line per damaged scan (once per process): its missing chunks read as 0."""
  key = os.path.abspath(path)
  if key in _WARNED:
    return
  lost = missing_chunks(path, attrs)
  if lost:
    _WARNED.add(key)
    what = "; ".join(f"{name} has {have} of its {n} chunk files" for name, (have, n) in
                     lost.items())
    errors.warn(f"scan {str(path)!r} is damaged: {what} (deleted or lost?); the missing parts read "
             f"as 0. Re-import the scan")


def create_scan(path: str | os.PathLike, shape: Sequence[int], image_dtype: str | np.dtype,
                with_labels: bool, attrs: dict[str, Any] | None = None,
                chunks: Sequence[int] = DEFAULT_CHUNKS) -> Scan:
  """Creates an empty scan (arrays filled with 0) to be written slab by slab.

  Callers wanting atomicity create it under a temporary name (outputs.atomic_output) and rename.
  """
  dtype = np.dtype(image_dtype).name
  if dtype not in IMAGE_DTYPES:
    raise errors.UserError(f"image dtype {dtype} is not one of {', '.join(IMAGE_DTYPES)}")
  if len(shape) != 3:
    raise errors.UserError(f"a scan is 3D (Z, Y, X); got shape {tuple(shape)}")
  p = Path(path)
  p.mkdir(parents=True, exist_ok=True)
  attrs = dict(attrs or {})
  write_group_attrs(p, attrs)
  image = create_array(p / "image", shape, dtype, chunks)
  labels = create_array(p / "labels", shape, LABEL_DTYPE, chunks) if with_labels else None
  return Scan(p, image, labels, attrs)


def update_scan_attrs(scan: Scan, **updates: Any) -> None:
  scan.attrs.update(updates)
  write_group_attrs(scan.path, scan.attrs)


def write_scan(path: str | os.PathLike, image: np.ndarray, labels: np.ndarray | None = None,
               attrs: dict[str, Any] | None = None, chunks: Sequence[int] = DEFAULT_CHUNKS,
               num_classes: int | None = None) -> Scan:
  """Writes an in-memory volume as a scan, computing its intensity statistics.

  Not atomic by itself: wrap in outputs.atomic_output for user-facing outputs.
  """
  from bonejax.io import intensity  # local import: intensity depends on nothing here

  image = np.asarray(image)
  if labels is not None:
    labels = np.asarray(labels)
    validate_labels(labels, image.shape, num_classes)
  intensity.validate_image(image)
  attrs = dict(attrs or {})
  attrs["intensity"] = intensity.compute_stats(image)
  scan = create_scan(path, image.shape, image.dtype, labels is not None, attrs, chunks)
  futures = [scan.image.write(image)]
  if labels is not None:
    futures.append(scan.labels.write(labels.astype(np.uint8)))
  for f in futures:
    f.result()
  record_chunks(scan)
  return scan


def validate_labels(labels: np.ndarray, shape: Sequence[int], num_classes: int | None,
                    unlabelled: int | None = None) -> None:
  """Refuses labels of another shape, non-integers, and values without a class (other than
  the dataset's `unlabelled` value, which sparse labels use for unpainted voxels)."""
  if tuple(labels.shape) != tuple(shape):
    raise errors.UserError(f"labels shape {tuple(labels.shape)} != image shape {tuple(shape)}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise errors.UserError(f"labels must be integers, got {labels.dtype}")
  if labels.size:
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
      raise errors.UserError(f"label value {lo} is negative")
    if num_classes is not None and hi >= num_classes:
      high = labels[labels >= num_classes]
      bad = high[high != unlabelled] if unlabelled is not None else high
      if bad.size:
        also = f" (the unlabelled value is {unlabelled})" if unlabelled is not None else ""
        raise errors.UserError(f"label value {int(bad.max())} >= number of classes "
                               f"{num_classes}{also}")
    if hi > 255:
      raise errors.UserError(f"label value {hi} does not fit uint8")


# ---------------------------------------------------------------------------------------------
# Datasets.
# ---------------------------------------------------------------------------------------------


# Sparse labels: the label value of voxels nobody painted, by convention. A dataset opts in with
# `"unlabelled": 255` in dataset.json (import: --unlabelled=255); such voxels then weigh nothing
# in the loss, the validation and the evaluation, and the patch samplers cut crops around
# labelled voxels. The value must not be a class (>= the number of classes, and a uint8).
UNLABELLED = 255


@dataclasses.dataclass
class Dataset:
  path: Path
  classes: list[str]
  scans: list[str]
  unlabelled: int | None = None  # the label value of unpainted voxels (sparse labels), if any

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  def scan_path(self, name: str) -> Path:
    return self.path / name

  def open_scan(self, name: str) -> Scan:
    if name not in self.scans:
      raise errors.UserError(f"scan {name!r} is not in dataset {str(self.path)!r} "
                          f"(has {', '.join(self.scans) or 'none'})")
    return open_scan(self.path / name)


def check_unlabelled(value: Any, classes: Sequence[str], where: str) -> int | None:
  """The unlabelled value as an int (None: dense labels); refuses one that is a class."""
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= 255:
    raise errors.UserError(f"{where}: unlabelled value {value!r} must be an integer in 0..255 "
                           "(uint8 labels; the convention is 255)")
  if value < len(classes):
    raise errors.UserError(f"{where}: unlabelled value {int(value)} collides with class "
                           f"{int(value)} ({classes[int(value)]!r}); use a value >= "
                           f"{len(classes)}, e.g. {UNLABELLED}")
  return int(value)


def write_dataset_json(path: str | os.PathLike, classes: Sequence[str],
                       scans: Sequence[str], unlabelled: int | None = None) -> None:
  meta = {"classes": list(classes), "scans": list(scans)}
  if unlabelled is not None:
    meta["unlabelled"] = int(check_unlabelled(unlabelled, classes, str(path)))
  outputs.atomic_write_json(Path(path) / DATASET_JSON, meta)


def open_dataset(path: str | os.PathLike) -> Dataset:
  p = Path(path)
  f = p / DATASET_JSON
  if not f.exists():
    raise errors.UserError(f"{str(p)!r} is not a dataset (no {DATASET_JSON})")
  try:
    meta = json.loads(f.read_text())
  except json.JSONDecodeError as e:
    raise errors.UserError(f"{str(f)!r} is not valid JSON: {e}") from None
  if not isinstance(meta, dict):
    raise errors.UserError(f"{str(f)!r} is not a JSON object with classes and scans")
  classes = meta.get("classes")
  if not isinstance(classes, list) or len(classes) < 2:
    raise errors.UserError(f"{str(f)!r} needs a list of at least 2 classes")
  scans = meta.get("scans", [])
  if not isinstance(scans, list):
    raise errors.UserError(f"{str(f)!r}: scans must be a list of names")
  unlabelled = check_unlabelled(meta.get("unlabelled"), classes, str(f))
  return Dataset(p, [str(c) for c in classes], [str(s) for s in scans], unlabelled)


def dataset_lock(path: str | os.PathLike):
  """The lock every read-modify-write of DATA/dataset.json holds (parallel imports)."""
  return outputs.locked(Path(path) / f".{DATASET_JSON}.lock")


def _natural(name: str) -> list:
  return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def unlisted_scans(path: str | os.PathLike, listed: Sequence[str]) -> list[str]:
  """Scan directories in a dataset that dataset.json does not name, and no live run is writing
  (an import registers its scan itself), in natural order."""
  p = Path(path)
  listed = set(listed)
  found = [e.name for e in os.scandir(p) if e.is_dir() and not e.name.startswith(".")
           and e.name not in listed and is_scan(p / e.name) and not outputs.is_claimed(p / e.name)]
  return sorted(found, key=_natural)


def add_scan_to_dataset(path: str | os.PathLike, scan: str, classes: Sequence[str],
                        unlabelled: int | None = None) -> Dataset:
  """Registers a scan in dataset.json, creating the file (with `classes`) if needed.

  `unlabelled` (sparse labels) is recorded when given; a dataset keeps the value it has.

  Safe from many processes at once: the read-modify-write holds the dataset's lock and
  replaces the file atomically. Scan directories found unlisted (an import killed between
  renaming its scan into place and registering it; a lost dataset.json) are listed too, with
  a warning: dataset.json can always be rebuilt from the scan directories.
  """
  p = Path(path)
  p.mkdir(parents=True, exist_ok=True)
  with dataset_lock(p):
    if (p / DATASET_JSON).exists():
      ds = open_dataset(p)
      if list(classes) != ds.classes:
        raise errors.UserError(f"classes {list(classes)} disagree with dataset's {ds.classes}")
      if unlabelled is not None and ds.unlabelled not in (None, unlabelled):
        raise errors.UserError(f"unlabelled value {unlabelled} disagrees with the dataset's "
                               f"{ds.unlabelled}")
      ds.unlabelled = ds.unlabelled if unlabelled is None else int(unlabelled)
    else:
      ds = Dataset(p, list(classes), [], unlabelled)
    orphans = [s for s in unlisted_scans(p, ds.scans) if s != scan]
    if orphans:
      errors.warn(f"dataset {str(p)!r}: scan director{'y' if len(orphans) == 1 else 'ies'} "
               f"{', '.join(orphans)} existed but {'was' if len(orphans) == 1 else 'were'} not "
               f"listed in {DATASET_JSON} (an interrupted import?); listed now")
      ds.scans.extend(orphans)
    if scan not in ds.scans:
      ds.scans.append(scan)
    write_dataset_json(p, ds.classes, ds.scans, ds.unlabelled)
  return ds


def rebuild_dataset(path: str | os.PathLike, classes: Sequence[str] | None = None) -> Dataset:
  """Writes dataset.json anew from the scan directories present (natural order).

  `classes` default to those of the present dataset.json; scans it lists that are gone are
  dropped, with a warning.
  """
  p = Path(path)
  if not p.is_dir():
    raise errors.UserError(f"dataset {str(p)!r} is not a directory")
  with dataset_lock(p):
    old = open_dataset(p) if (p / DATASET_JSON).exists() else None
    if classes is None:
      if old is None:
        raise errors.UserError(f"{str(p)!r} has no {DATASET_JSON}: give the class names")
      classes = old.classes
    if len(classes) < 2:
      raise errors.UserError(f"a dataset needs at least 2 classes, got {list(classes)}")
    listed = [s for s in (old.scans if old else []) if is_scan(p / s)]
    gone = [s for s in (old.scans if old else []) if s not in listed]
    if gone:
      errors.warn(f"dataset {str(p)!r}: {', '.join(gone)} listed but gone; dropped")
    ds = Dataset(p, [str(c) for c in classes], listed + unlisted_scans(p, listed),
                 old.unlabelled if old else None)
    write_dataset_json(p, ds.classes, ds.scans, ds.unlabelled)
  return ds
