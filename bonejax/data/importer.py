"""Importing volumes into a dataset: `import_volume` streams a volume (any input
`io.registry.open_volume` reads) and optional labels into DATA/<scan> (`store`), slab by slab,
with its intensity statistics, and registers it in dataset.json. It is what
`launch/import_volume.py` runs.
"""

from __future__ import annotations

import datetime
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import bonejax
from bonejax.core import errors, memory_plan, outputs, placement
from bonejax.core.progress import Progress
from bonejax.data import store
from bonejax.io import intensity, registry, resample, source, voxel

DEFAULT_CLASSES = ("background", "bone", "pore")
STATS_VOXELS = 1 << 20
# Where a scan's voxel size came from, as its `voxel_size_source` attribute records it (reports
# say "assumed" sizes): --voxel_size_um, the file's metadata, or nothing (1 um assumed).
VOXEL_SIZE_SOURCE = {"flag": "given", "metadata": "metadata", "default": "assumed"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_scan_name(name: str) -> str:
  if not name or not _SAFE_NAME.match(name) or name in (store.DATASET_JSON, "zarr.json"):
    raise errors.UserError(f"--scan={name!r} is not a safe scan name (letters, digits, '.', '_', "
                        f"'-'; starting with a letter or digit)")
  return name


def parse_classes(text: str | Sequence[str]) -> list[str]:
  names = text.split(",") if isinstance(text, str) else list(text)
  names = [str(c).strip() for c in names]
  if len(names) < 2 or not all(names) or len(set(names)) != len(names):
    raise errors.UserError(f"--classes={text!r} needs at least 2 distinct, non-empty names")
  if len(names) > 256:
    raise errors.UserError(f"--classes: at most 256 classes fit uint8 labels, got {len(names)}")
  return names


def _wait(futures: list) -> None:
  """Waits for every write in `futures`, then raises the first failure: a failed write must
  not leave the others still writing into a temporary that clean-up is about to remove."""
  first = None
  for f in futures:
    try:
      f.result()
    except Exception as e:  # pylint: disable=broad-except
      first = first or e
  if first is not None:
    raise first


def _settle(in_flight: list[list]) -> None:
  """Waits for every write still in flight, whatever happens meanwhile (their errors are
  dropped: the run has already failed). A Ctrl-C or SIGTERM arriving during the wait is held
  until all are done, then raised: clean-up must never race the writes it removes."""
  interrupted = None
  for futures in in_flight:
    for f in futures:
      while True:
        try:
          f.result()
          break
        except KeyboardInterrupt as e:
          interrupted = interrupted or e
        except Exception:  # pylint: disable=broad-except
          break
  in_flight.clear()
  if interrupted is not None:
    raise interrupted


def remove_temporary(path: Path, wait_s: float = 10.0) -> None:
  """Removes a failed scan's temporary directory, and again if it comes back: a failed
  multi-chunk write reports its first error while tensorstore still writes its other chunks,
  and those recreate their directories (so a single rmtree left the temporary in about one
  failed import of three). Done once it stays gone for 0.1 s, or after `wait_s`."""
  deadline = time.monotonic() + wait_s
  while True:
    outputs.remove_path(path)
    time.sleep(0.1)
    if not (path.exists() or path.is_symlink()) or time.monotonic() > deadline:
      return


# Host bytes of the intensity statistics' temporaries (float64 copies of STATS_VOXELS voxels).
STATS_BYTES = 3 * 8 * STATS_VOXELS


def slab_cost(src: Any) -> tuple[int, int]:
  """(fixed, per slice) host bytes of streaming `src` into a scan: each slice as read, as
  converted, and about two more copies while the previous slab and tensorstore's copy of it
  are being written; a resampled source adds its interpolation temporaries."""
  yx = math.prod(src.shape[1:])
  out = np.dtype(src.dtype).itemsize
  if isinstance(src, resample.ResampledSource):
    fixed, per = src.working_bytes()
    return fixed, per + 3 * yx * out
  return 0, yx * (np.dtype(src.source_dtype).itemsize + 3 * out)


def plan_slab(src: Any, lab: Any, slab: int, memory_budget_gb: float | None = None,
              resample_um: float | None = None) -> int:
  """The slices streamed per slab: `slab`, or fewer when that many would not fit in memory
  (`memory_plan.budget_bytes`). A UserError naming the value (the resampling, else the
  input's shape) and the bytes when not even one slice fits: checked before any allocation."""
  fixed, per = slab_cost(src)
  fixed += STATS_BYTES
  if lab is not None:
    f, p = slab_cost(lab)
    fixed, per = fixed + f, per + p
  limit, _ = memory_plan.budget_bytes(memory_budget_gb)
  n = memory_plan.largest_fitting(per, fixed, slab, limit)
  if 1 <= n < slab:
    print(f"note: streaming {n} slices at a time (not --slab={slab}) to stay within "
          f"{memory_plan.format_bytes(limit)} of memory", file=sys.stderr, flush=True)
  if n >= 1:
    return n
  if isinstance(src, resample.ResampledSource):
    v = src.from_voxel_size_um
    frm = f"{v[0]:g}" if len(set(v)) == 1 else ",".join(f"{x:g}" for x in v)
    what = (f"--resample_um={resample_um:g}: resampling {str(src.path)!r} {src.src.shape} "
            f"at {frm} um to {src.shape} voxels")
    hint = "choose a larger --resample_um or crop the volume"
  else:
    what = f"importing {str(src.path)!r} of shape {src.shape} ({src.dtype})"
    hint = "a slice this large cannot be imported on this machine"
  memory_plan.require_fits(what + " (one slice at a time)", fixed + per, memory_budget_gb,
                           hint=hint)
  return 1  # unreachable unless the limit moved meanwhile


def import_volume(image: str | os.PathLike, out: str | os.PathLike, scan: str,
                  labels: str | os.PathLike | None = None,
                  classes: str | Sequence[str] = DEFAULT_CLASSES,
                  voxel_size_um: float | Sequence[float] | None = None,
                  chunks: Sequence[int] = store.DEFAULT_CHUNKS, slab: int = 64,
                  overwrite: bool = False, progress_every_s: float = 5.0,
                  resample_um: float | None = None, image_key: str | None = None,
                  labels_key: str | None = None,
                  memory_budget_gb: float | None = None,
                  unlabelled: int | None = None) -> dict[str, Any]:
  """Streams a volume (and optional labels) into DATA/scan and registers it in dataset.json.

  `unlabelled` (sparse labels, e.g. 255): the label value of unpainted voxels, recorded in
  dataset.json; label values >= the number of classes are refused unless equal to it (or to
  the value the dataset already has).

  `voxel_size_um`: a number or (Z, Y, X); default the file's own (TIFF / OME / HDF5 / MRC /
  ISQ / OME-Zarr metadata), else 1 um with a warning on stderr (the scan's `voxel_size_source`
  attribute then says "assumed"). `resample_um`: resample image (linearly) and labels
  (nearest) to this isotropic voxel size on the way, slab by slab. `image_key` / `labels_key`:
  the datasets inside HDF5 / NeXus files. `memory_budget_gb`: host memory the streaming may
  use (default: what the machine has available); slabs shrink to fit, and an input or a
  resampling whose single slice would not fit is refused before anything is allocated
  (`plan_slab`). The scan is written under a temporary name and
  renamed into place only once complete; any error leaves the dataset as it was (no scan
  directory, dataset.json untouched).
  """
  start = time.perf_counter()
  check_scan_name(scan)
  classes = parse_classes(classes)
  given_voxel = resample.as_zyx(voxel_size_um)
  if resample_um is not None:
    resample.as_zyx(resample_um)
  if int(slab) < 1:
    raise errors.UserError(f"--slab={slab} must be positive")
  slab = int(slab)
  chunks = tuple(int(c) for c in chunks)
  if len(chunks) != 3 or min(chunks) < 1:
    raise errors.UserError(f"--chunks={chunks} needs 3 positive integers")
  if not out:
    raise errors.UserError("no --out dataset directory given")
  memory_plan.budget_bytes(memory_budget_gb)  # a bad budget fails before any work
  data = Path(out)
  if data.exists() and not data.is_dir():
    raise errors.UserError(f"--out {str(data)!r} exists and is not a directory")
  if (data / store.DATASET_JSON).exists():
    existing = store.open_dataset(data)
    if existing.classes != classes:
      raise errors.UserError(f"--classes {classes} disagree with {str(data / store.DATASET_JSON)!r}"
                          f" classes {existing.classes}")
    if unlabelled is not None and existing.unlabelled not in (None, unlabelled):
      raise errors.UserError(f"--unlabelled={unlabelled} disagrees with "
                             f"{str(data / store.DATASET_JSON)!r} unlabelled {existing.unlabelled}")
    unlabelled = existing.unlabelled if unlabelled is None else unlabelled
  unlabelled = store.check_unlabelled(unlabelled, classes, "--unlabelled")
  final = data / scan
  inputs = (image, labels)
  placement.refuse_inside(data, inputs, "--out")
  outputs.check_not_input(final, inputs, "scan")
  for given in inputs:
    if given and store.is_scan(given):
      store.warn_missing_chunks(given)
  made = outputs.make_dirs(data)
  try:
    # The claim makes a second import of the same scan fail at once, and is held until the scan
    # is registered, so parallel imports never take it for an orphan (store.unlisted_scans).
    with outputs.claim_output(final, "scan"):
      outputs.check_output(final, overwrite, inputs, "scan")
      src = registry.open_volume(image, "image", key=image_key)
      lab = None
      try:
        if labels:
          lab = registry.open_volume(labels, "labels", key=labels_key)
          if lab.shape != src.shape:
            raise errors.UserError(f"labels shape {lab.shape} != image shape {src.shape}")
        found = src.voxel_size_um
        voxel_um = given_voxel or found or (1.0, 1.0, 1.0)
        voxel_from = "flag" if given_voxel else ("metadata" if found else "default")
        if voxel_from == "default":
          errors.warn(f"{image}: voxel size unknown, 1 um assumed; pass --voxel_size_um")
        original = {"shape": list(src.shape), "voxel_size_um": list(voxel_um)}
        if resample_um is not None and not resample.same_size(voxel_um, resample_um):
          src.voxel_size_um = voxel_um
          src = resample.ResampledSource(src, resample_um, order=1)
          if lab is not None:
            lab.voxel_size_um = voxel_um
            lab = resample.ResampledSource(lab, resample_um, order=0)
          voxel_um = src.voxel_size_um
        elif resample_um is not None:
          voxel_um = resample.as_zyx(resample_um)
        slab = plan_slab(src, lab, slab, memory_budget_gb, resample_um)
        raw = math.prod(src.shape) * np.dtype(src.dtype).itemsize
        memory_plan.require_disk([(  # zstd leaves more than a quarter of a CT scan's bytes
            f"scan {scan!r} {tuple(src.shape)} {np.dtype(src.dtype).name} (at least a quarter "
            f"of its {memory_plan.format_bytes(raw)}, compressed)", raw // 4, data)])
        stats = stream_scan(src, lab, final, classes, voxel_um, chunks, slab, overwrite,
                            progress_every_s, inputs,
                            original if tuple(original["shape"]) != src.shape else None,
                            VOXEL_SIZE_SOURCE[voxel_from], unlabelled=unlabelled)
        try:
          dataset = store.add_scan_to_dataset(data, scan, classes, unlabelled)
        except BaseException:
          outputs.remove_path(final)
          raise
      finally:
        src.close()
        if lab is not None:
          lab.close()
  except BaseException:
    # Leave no empty dataset directory behind if this call made it.
    outputs.remove_made_dirs(made)
    raise
  result = {"dataset": str(data), "scan": scan, "path": str(final), "shape": list(src.shape),
            "dtype": src.dtype.name, "source_dtype": src.source_dtype.name,
            "has_labels": lab is not None, "classes": classes,
            "num_scans": len(dataset.scans), **voxel.voxel_attrs(voxel_um),
            "voxel_size_from": voxel_from, "voxel_size_source": VOXEL_SIZE_SOURCE[voxel_from],
            "intensity": stats,
            "seconds": round(time.perf_counter() - start, 3)}
  if isinstance(src, resample.ResampledSource):
    result["resampled_from"] = original
  return result


def stream_scan(src: source.VolumeSource, lab: source.VolumeSource | None, final: Path,
                classes: list[str], voxel_size_um: Sequence[float], chunks: Sequence[int],
                slab: int, overwrite: bool, progress_every_s: float, inputs: Sequence[Any] = (),
                resampled_from: dict[str, Any] | None = None,
                voxel_size_source: str = "metadata",
                unlabelled: int | None = None) -> dict[str, Any]:
  """Writes the scan `final` from `src` (and `lab`) slab by slab; returns its intensity stats.
  `voxel_size_source`: where the voxel size came from (`VOXEL_SIZE_SOURCE`'s values)."""
  attrs = {
      **voxel.voxel_attrs(voxel_size_um),
      "voxel_size_source": voxel_size_source,
      "source": str(Path(src.path).resolve()),
      "source_dtype": src.source_dtype.name,
      "imported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "bonejax_version": bonejax.__version__,
  }
  if lab is not None:
    attrs["labels_source"] = str(Path(lab.path).resolve())
  if resampled_from is not None:
    attrs["resampled_from"] = resampled_from
  depth = src.shape[0]
  n_slabs = -(-depth // slab)
  with outputs.atomic_output(final, overwrite, inputs, "scan") as tmp:
    in_flight: list = []  # [futures of the previous slab, futures of this one]
    try:
      scan = store.create_scan(tmp, src.shape, src.dtype, lab is not None, attrs, chunks)
      acc = intensity.StatsAccumulator(src.dtype, math.prod(src.shape))
      progress = Progress(total=n_slabs, desc=f"import {final.name}", unit="slabs",
                          every_s=progress_every_s)
      for z0 in range(0, depth, slab):
        z1 = min(z0 + slab, depth)
        where = f"(slices {z0}-{z1 - 1})"
        img = src.read_slab(z0, z1)
        try:
          # A few planes at a time: the statistics make float64 temporaries of what they get.
          step = max(1, STATS_VOXELS // (img.shape[1] * img.shape[2]))
          for p0 in range(0, img.shape[0], step):
            acc.update(img[p0:p0 + step])
        except errors.UserError as e:
          raise errors.UserError(f"{src.path}: {e} {where}") from None
        lbl = None
        if lab is not None:
          lbl = lab.read_slab(z0, z1)
          try:
            store.validate_labels(lbl, img.shape, len(classes), unlabelled)
          except errors.UserError as e:
            raise errors.UserError(f"{lab.path}: {e} {where}") from None
        in_flight.append([store.write_slab(scan.image, 0, z0, img)])
        if lbl is not None:
          in_flight[-1].append(store.write_slab(scan.labels, 0, z0, lbl.astype(np.uint8)))
        del img, lbl
        # The next slab is read while this one is written; at most two slabs in memory.
        if len(in_flight) > 1:
          _wait(in_flight[0])
          in_flight.pop(0)
        progress.update(1)
      while in_flight:
        _wait(in_flight[0])
        in_flight.pop(0)
      stats = acc.finalize()
      store.update_scan_attrs(scan, intensity=stats)
      store.record_chunks(scan)
      progress.close()
    except BaseException:
      # Never let the temporary scan be removed under writes still in flight (a failed write,
      # bad labels, Ctrl-C, SIGTERM): wait for all of them, then remove it here, again while
      # tensorstore finishes stragglers; atomic_output then finds nothing left to remove.
      try:
        _settle(in_flight)
      finally:
        remove_temporary(tmp)
      raise
  return stats
