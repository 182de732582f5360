"""Uncertainty maps for proofreading: where the voted segmentation deserves a second look.

A person proofreading a segmentation of 10^9 voxels cannot look at every slice. The plane sets
the predictor already ran say where it is unsure, at no extra inference:
- entropy: of the fused (mean) probabilities, divided by log K so it lies in [0, 1]: 0 where
  every set was certain of one class, 1 where the mean is uniform;
- disagreement: the fraction of plane sets whose own label differs from the vote (0 with one
  plane set).
Both are stored as uint8 (value * 255, rounded), channel 0 entropy, channel 1 disagreement:
zarr v3 (Z, Y, X, 2), OME-Zarr (c, z, y, x) with channel names, or an ImageJ hyperstack TIFF
(Z, C, Y, X) Fiji opens as two channels. `UncertaintyWriter` takes the voted Z slabs as the
prediction writes its labels, and ranks the slices along each axis by their mean entropy: the
result JSON lists the 10 highest per axis, where to look first.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import bonejax
from bonejax.core import errors, outputs
from bonejax.data import store
from bonejax.io import ome_zarr, registry, tiff

CHANNELS = ("entropy", "disagreement")
TOP_SLICES = 10


def output_kind(path: str | Path) -> str:
  kind = registry.output_format(path)
  if kind is not None:
    return kind
  raise errors.UserError(f"save_uncertainty {str(path)!r} must end in .zarr, .ome.zarr or "
                      f".tif/.tiff")


def maps(mean: np.ndarray, counts: np.ndarray | None, labels: np.ndarray,
         n_sets: int) -> np.ndarray:
  """(..., K) mean probabilities, per-class vote counts and voted labels -> (..., 2) uint8."""
  k = mean.shape[-1]
  p = np.clip(mean, 0, 1).astype(np.float32)
  with np.errstate(divide="ignore", invalid="ignore"):
    ent = -np.sum(np.where(p > 0, p * np.log(p), 0), axis=-1) / np.float32(math.log(k))
  out = np.empty(mean.shape[:-1] + (2,), np.uint8)
  out[..., 0] = np.rint(np.clip(ent, 0, 1) * 255)
  if counts is None or n_sets <= 1:
    out[..., 1] = 0
  else:
    agree = np.take_along_axis(counts, labels[..., None].astype(np.intp), axis=-1)[..., 0]
    out[..., 1] = np.rint((1 - agree.astype(np.float32) / n_sets) * 255)
  return out


class UncertaintyWriter:
  """Takes voted slabs (`add`) and writes the maps to `path` (through a temporary name: use as
  a context manager); `top_slices()` ranks slices afterwards."""

  def __init__(self, path: str | Path, shape: Sequence[int], *, overwrite: bool = False,
               voxel_size_um: Sequence[float] | None = None, attrs: dict[str, Any] | None = None,
               scratch: Path | None = None, context: Any = None):
    self.path, self.shape = Path(path), tuple(int(s) for s in shape[:3])
    self.kind = output_kind(path)
    self.overwrite, self.voxel_size_um = overwrite, voxel_size_um
    self.attrs = {**(attrs or {}), "content": "uncertainty (uint8: value x 255)",
                  "channels": list(CHANNELS)}
    self.scratch, self.context = scratch, context
    # Per-slice sums of each map along Z, Y and X.
    self.sums = [np.zeros((n, 2), np.float64) for n in self.shape]
    self._stack = contextlib.ExitStack()

  def __enter__(self) -> "UncertaintyWriter":
    tmp = self._stack.enter_context(outputs.atomic_output(self.path, self.overwrite))
    self.tmp = tmp
    shape4 = self.shape + (2,)
    if self.kind == "ome-zarr":
      self.ome = ome_zarr.OmeZarrWriter(tmp, self.shape, np.uint8, kind="image", channels=2,
                                        channel_names=CHANNELS, voxel_size_um=self.voxel_size_um,
                                        name=self.path.name, context=self.context)
      self.out = self.ome.view
    elif self.kind == "zarr":
      self.out = store.create_array(tmp, shape4, np.uint8, context=self.context)
    elif self.scratch is not None:  # TIFF, out of core: staged in scratch, exported at the end
      self.out = store.create_array(self.scratch / "uncertainty.zarr", shape4, np.uint8,
                                    context=self.context)
    else:
      self.out = np.zeros(shape4, np.uint8)
    self._pending: list = []
    return self

  def add(self, z0: int, labels: np.ndarray, mean: np.ndarray, counts: np.ndarray | None,
          n_sets: int) -> None:
    m = maps(mean, counts, labels, n_sets)
    z1 = z0 + m.shape[0]
    self.sums[0][z0:z1] += m.sum(axis=(1, 2), dtype=np.float64)
    self.sums[1] += m.sum(axis=(0, 2), dtype=np.float64)
    self.sums[2] += m.sum(axis=(0, 1), dtype=np.float64)
    if isinstance(self.out, np.ndarray):
      self.out[z0:z1] = m
      return
    while len(self._pending) > 1:
      self._pending.pop(0).result()
    self._pending.append(self.out[z0:z1].write(m))

  def __exit__(self, exc_type, exc, tb) -> None:
    try:
      if exc_type is None:
        for f in self._pending:
          f.result()
        self._finish()
    finally:
      self._stack.__exit__(exc_type, exc, tb)

  def _finish(self) -> None:
    attrs = {**self.attrs, "bonejax_version": bonejax.__version__}
    if self.kind == "ome-zarr":
      self.ome.finish(attrs)
    elif self.kind == "zarr":
      store.set_array_attrs(self.tmp, attrs)
    else:
      write_tiff(self.out, self.tmp, self.shape, voxel_size_um=self.voxel_size_um)

  def top_slices(self, n: int = TOP_SLICES) -> dict[str, list[dict[str, Any]]]:
    """Per axis, the `n` slices of highest mean entropy (ties: lower index), with both means
    in [0, 1]."""
    out = {}
    for axis, name in enumerate("zyx"):
      per_slice = math.prod(s for a, s in enumerate(self.shape) if a != axis)
      means = self.sums[axis] / (per_slice * 255.0)
      order = np.lexsort((np.arange(len(means)), -means[:, 0]))[:n]
      out[name] = [{"index": int(i), "entropy": round(float(means[i, 0]), 4),
                    "disagreement": round(float(means[i, 1]), 4)} for i in order]
    return out


def write_tiff(source: Any, path: Path, shape: Sequence[int], slab: int = 32,
               voxel_size_um: Sequence[float] | None = None) -> None:
  """(Z, Y, X, 2) uint8 -> an ImageJ hyperstack (Z, C, Y, X), slab by slab; calibrated
  (X/Y resolution, Z spacing, unit: `tiff.calibration`) when the voxel size is known, so Fiji
  and BoneJ open it in micrometres."""
  import tifffile
  z, y, x = shape
  big = z * y * x * 2 > tiff.BIGTIFF_BYTES
  cal = tiff.calibration(voxel_size_um)
  meta: dict[str, Any] = {"axes": "ZCYX"} if not big else {
      "axes": "ZCYX", "bonejax_version": bonejax.__version__}
  kw: dict[str, Any] = {}
  if cal:
    kw["resolution"] = cal["resolution"]
    meta.update(spacing=cal["spacing"], unit=cal["unit"])

  def read(z0, z1):
    part = source[z0:z1]
    return np.asarray(part if isinstance(source, np.ndarray) else part.read().result())

  def pages():
    for z0 in range(0, z, slab):
      data = read(z0, min(z0 + slab, z))
      for plane in data:
        yield plane[..., 0]
        yield plane[..., 1]

  with tifffile.TiffWriter(path, bigtiff=big, imagej=not big) as tw:
    tw.write(pages(), shape=(z, 2, y, x), dtype=np.uint8, photometric="minisblack",
             software=f"bonejax {bonejax.__version__}", metadata=meta, **kw)


class _TiffMaps:
  """An uncertainty TIFF (Z, C, Y, X pages) read as (Z, Y, X, 2) slabs."""

  def __init__(self, path: Path):
    import tifffile
    self.path = path
    self._tif = tifffile.TiffFile(path)
    series = self._tif.series[0]
    if len(series.shape) != 4 or series.shape[1] != 2:
      self._tif.close()
      raise errors.UserError(f"{str(path)!r} is not an uncertainty TIFF (Z, 2, Y, X); its shape "
                          f"is {tuple(series.shape)}")
    z, _, y, x = series.shape
    self.shape = (z, y, x, 2)

  def read_slab(self, z0: int, z1: int) -> np.ndarray:
    data = self._tif.asarray(key=range(2 * z0, 2 * z1), series=0)
    return np.moveaxis(data.reshape(z1 - z0, 2, *self.shape[1:3]), 1, -1)

  def close(self) -> None:
    self._tif.close()

  def __enter__(self) -> "_TiffMaps":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def open_maps(path: str | Path) -> Any:
  """An uncertainty output (zarr, OME-Zarr or TIFF) as a source of (Z, Y, X, 2) slabs."""
  path = Path(path)
  if output_kind(path) == "tiff":
    try:
      return _TiffMaps(path)
    except errors.UserError:
      raise
    except Exception as e:
      raise errors.UserError(f"cannot read TIFF {str(path)!r}: {errors.one_line(e)}") from None
  src = registry.open_volume(path, channels=None)
  if len(src.shape) != 4 or src.shape[3] != 2:
    src.close()
    raise errors.UserError(f"{str(path)!r} is not an uncertainty map (Z, Y, X, 2); its shape is "
                        f"{src.shape}")
  return src
