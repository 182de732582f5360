"""The standard bone indices of a labels volume (ASBMR nomenclature, Bouxsein et al. 2010,
J Bone Miner Res 25:1468), in micrometres, per class and region of interest.

    m = measure(labels, classes=1, voxel_size_um=(8, 6.24, 6.24), roi=mask_or_box)
    m.bv_tv, m.tb_th_um, m.conn_d_per_um3, m.as_dict(), m.table()
    c = cortical(labels, classes=3, voxel_size_um=..., axis=0)    # Ct.Th, Ct.Ar/Tt.Ar
    rows = compare(measure(pred, ...), measure(truth, ...))       # side by side, relative diff

The volume is read block by block (see inputs.py), so it may be larger than memory.

Definitions (the modules say how each is computed):
- TV: the ROI (or image) volume; BV: the phase's voxels x voxel volume.
- BS: area of the marching-cubes mesh (surface.py); BS/BV, BS/TV.
- Tb.Th, Tb.Sp: mean (SD, histogram) local thickness of the phase and of the marrow (the ROI
  minus the phase), Hildebrand and Ruegsegger 1997 (thickness.py).
- Tb.N = 1 / (Tb.Th + Tb.Sp) (the mean distance between mid-axes, as BoneJ users compute it;
  not the plate model BV/TV / Tb.Th).
- Conn.D = (1 - delta chi) / TV, delta chi the Odgaard-Gundersen Euler characteristic (euler.py).
- DA = 1 - min / max eigenvalue of the MIL fabric ellipsoid (anisotropy.py).
- SMI = 6 BV (dBS/dr) / BS^2 (Hildebrand and Ruegsegger 1997b), dBS/dr from the mesh moved
  along its normals: 0 for plates, 3 for rods, 4 for spheres. Caveat (Salmon et al. 2015,
  Front Endocrinol 6:162): concave surfaces, most of the surface at BV/TV above ~0.3, make dBS/dr
  negative and SMI negative or meaningless as a plate/rod index; report it beside BV/TV.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import numpy as np

from bonejax.core import errors
from bonejax.evaluate.morphometry import anisotropy, cortical as _cortical, euler, inputs, surface
from bonejax.evaluate.morphometry import thickness as _thickness

# name in reports -> (field, unit)
ASBMR = {
    "TV": ("tv_um3", "um^3"), "BV": ("bv_um3", "um^3"), "BV/TV": ("bv_tv", "1"),
    "BS": ("bs_um2", "um^2"), "BS/BV": ("bs_bv_per_um", "1/um"),
    "BS/TV": ("bs_tv_per_um", "1/um"), "Tb.Th": ("tb_th_um", "um"),
    "Tb.Th.SD": ("tb_th_sd_um", "um"), "Tb.Sp": ("tb_sp_um", "um"),
    "Tb.Sp.SD": ("tb_sp_sd_um", "um"), "Tb.N": ("tb_n_per_um", "1/um"),
    "Conn.D": ("conn_d_per_um3", "1/um^3"), "DA": ("da", "1"), "SMI": ("smi", "1"),
    "Ct.Th": ("ct_th_um", "um"), "Ct.Th.SD": ("ct_th_sd_um", "um"),
    "Ct.Ar": ("ct_ar_um2", "um^2"), "Tt.Ar": ("tt_ar_um2", "um^2"),
    "Ct.Ar/Tt.Ar": ("ct_ar_tt_ar", "1"),
}


@dataclasses.dataclass(frozen=True)
class Morphometry:
  """Trabecular indices of one phase (classes) in one region; lengths in micrometres."""
  classes: tuple
  voxel_size_zyx_um: tuple
  roi: str
  tv_um3: float
  bv_um3: float
  bv_tv: float
  bs_um2: float
  bs_bv_per_um: float
  bs_tv_per_um: float
  tb_th_um: float
  tb_th_sd_um: float
  tb_th_max_um: float
  tb_sp_um: float
  tb_sp_sd_um: float
  tb_sp_max_um: float
  tb_n_per_um: float       # 1 / (Tb.Th + Tb.Sp)
  delta_chi: float         # Odgaard-Gundersen
  connectivity: float      # 1 - delta_chi
  conn_d_per_um3: float
  da: float
  fabric_eigenvalues: tuple
  fabric_eigenvectors: tuple
  mil_um: tuple
  smi: float
  tb_th_histogram: dict = dataclasses.field(repr=False)
  tb_sp_histogram: dict = dataclasses.field(repr=False)

  def as_dict(self) -> dict[str, Any]:
    return _jsonable(dataclasses.asdict(self))

  def table(self) -> dict[str, float]:
    """ASBMR name -> value, for reports."""
    return {k: getattr(self, f) for k, (f, _) in ASBMR.items() if hasattr(self, f)}


@dataclasses.dataclass(frozen=True)
class Cortical:
  classes: tuple
  voxel_size_zyx_um: tuple
  roi: str
  axis: int
  slices: int              # slices holding cortex
  ct_th_um: float
  ct_th_sd_um: float
  ct_ar_um2: float         # mean over those slices
  tt_ar_um2: float
  ct_ar_tt_ar: float
  ct_th_histogram: dict = dataclasses.field(repr=False)

  def as_dict(self) -> dict[str, Any]:
    return _jsonable(dataclasses.asdict(self))

  def table(self) -> dict[str, float]:
    return {k: getattr(self, f) for k, (f, _) in ASBMR.items() if hasattr(self, f)}


def _jsonable(d: Any) -> Any:
  if isinstance(d, dict):
    return {k: _jsonable(v) for k, v in d.items()}
  if isinstance(d, (list, tuple)):
    return [_jsonable(v) for v in d]
  if isinstance(d, float) and not math.isfinite(d):
    return None
  return d


class _Clock:
  def __init__(self, into: dict[str, float] | None):
    self.into, self.t = into, time.perf_counter()

  def __call__(self, name: str) -> None:
    now = time.perf_counter()
    if self.into is not None:
      self.into[name] = self.into.get(name, 0.0) + now - self.t
    self.t = now


def _div(a: float, b: float) -> float:
  return a / b if b else float("nan")


class _Reader:
  """Reads blocks of the phase, of its complement in the ROI, and of the ROI (box: a crop)."""

  def __init__(self, labels: Any, class_ids: Sequence[int], is_mask: bool, roi: Any):
    self.labels, self.class_ids, self.is_mask = labels, class_ids, is_mask
    self.box = roi if isinstance(roi, inputs.Box) else None
    self.mask = None if roi is None or self.box is not None else roi
    shape = tuple(labels.shape)
    self.shape = self.box.shape if self.box else shape
    self.origin = self.box.start if self.box else (0, 0, 0)

  def _shift(self, sl):
    return tuple(slice(s.start + o, s.stop + o) for s, o in zip(sl, self.origin))

  def raw(self, sl) -> np.ndarray:
    return inputs.phase(self.labels[self._shift(sl)], self.class_ids, self.is_mask)

  def roi(self, sl) -> np.ndarray:
    return np.asarray(self.mask[sl]) != 0

  def phase(self, sl) -> np.ndarray:
    p = self.raw(sl)
    return p & self.roi(sl) if self.mask is not None else p

  def space(self, sl) -> np.ndarray:
    p = ~self.raw(sl)
    return p & self.roi(sl) if self.mask is not None else p

  def counts(self, max_block_voxels: int) -> tuple[int, dict[int, int]]:
    """(ROI voxels, voxels of each class in the ROI)."""
    tv, per = 0, {c: 0 for c in self.class_ids}
    side = inputs.block_side(self.shape, [0, 0, 0], max_block_voxels)
    for b in inputs.blocks(self.shape, side, [0, 0, 0]):
      lab = np.asarray(self.labels[self._shift(b.core)])
      roi = self.roi(b.core) if self.mask is not None else None
      tv += int(roi.sum()) if roi is not None else lab.size
      for c in self.class_ids:
        hit = (lab != 0) if self.is_mask else (lab == c)
        per[c] += int((hit & roi).sum() if roi is not None else hit.sum())
    return tv, per


def _prepare(labels, classes, voxel_size_um, roi, max_block_voxels):
  vs = inputs.voxel_size(voxel_size_um)
  labels = inputs.volume(labels)
  is_mask = np.dtype(getattr(labels, "dtype", bool)) == bool
  class_ids = inputs.classes(classes, is_mask)
  roi = inputs.roi(roi, labels.shape)
  reader = _Reader(labels, class_ids, is_mask, roi)
  tv_vox, per = reader.counts(max_block_voxels)
  where = " in the ROI" if roi is not None else ""
  if tv_vox == 0:
    raise errors.UserError("the ROI mask is empty")
  for c, n in per.items():
    if n == 0:
      name = "the mask" if is_mask else f"class {c}"
      raise errors.UserError(f"{name} has no voxels{where}: nothing to measure")
  roi_name = ("none" if roi is None else
              f"box {roi.start}..{roi.stop}" if isinstance(roi, inputs.Box) else "mask")
  return vs, reader, class_ids, tv_vox, sum(per.values()), roi_name


def measure(labels: Any, classes: int | Sequence[int] | None = None,
            voxel_size_um: float | Sequence[float] = 1.0, *, roi: Any = None,
            max_block_voxels: int = 2 ** 24, threads: int = 2,
            exact_radius_um: float | None = math.inf,
            timings: dict[str, float] | None = None) -> Morphometry:
  """All trabecular indices of the phase `classes` (their union) of `labels`.

  labels: (Z, Y, X) integer labels, or a boolean mask (then `classes` is ignored).
  voxel_size_um: one number or (Z, Y, X) in micrometres.
  roi: None (the whole volume), a `Box`/((z0, y0, x0), (z1, y1, x1)), or a mask volume of the
    labels' shape (nonzero = inside): TV is the ROI, the marrow is the ROI minus the phase.
  max_block_voxels: the largest padded block held in memory (the volume is read in blocks).
  exact_radius_um: spheres up to this radius are painted exactly, larger ones by radius levels
    half the smallest voxel side apart (thickness.py: a lower bound, about 1 % low on the
    mean, and since the spheres are painted as runs rarely faster); math.inf (default) paints
    every sphere (the exact transform, BoneJ's); None picks, per block, the radius that
    minimises the estimated cost (on the benchmark volume: every sphere painted).
  timings: a dict that receives the seconds of each part (counts, surface, Tb.Th, ...).
  """
  clock = _Clock(timings)
  vs, rd, class_ids, tv_vox, bv_vox, roi_name = _prepare(labels, classes, voxel_size_um, roi,
                                                        max_block_voxels)
  clock("counts")
  voxel = float(np.prod(vs))
  tv, bv = tv_vox * voxel, bv_vox * voxel
  roi_fn = rd.roi if rd.mask is not None else None
  exact = exact_radius_um

  surf = surface.surface(rd.raw, rd.shape, vs, roi_mask=roi_fn, max_block_voxels=max_block_voxels)
  clock("surface (BS, SMI)")
  th = _thickness.thickness(rd.phase, rd.shape, vs, max_block_voxels=max_block_voxels,
                            threads=threads, exact_radius_um=exact)
  clock("Tb.Th")
  sp = _thickness.thickness(rd.space, rd.shape, vs, max_block_voxels=max_block_voxels,
                            threads=threads, exact_radius_um=exact)
  clock("Tb.Sp")
  dchi = euler.delta_chi(rd.phase, rd.shape, roi_mask=roi_fn, max_block_voxels=max_block_voxels)
  clock("Conn.D")
  directions = surface.fibonacci_directions()
  fabric = anisotropy.fit(directions, surface.intercepts_per_um(surf, tv, directions))
  clock("DA")
  bs = surf.area
  return Morphometry(
      classes=tuple(class_ids), voxel_size_zyx_um=vs, roi=roi_name,
      tv_um3=tv, bv_um3=bv, bv_tv=bv / tv, bs_um2=bs, bs_bv_per_um=_div(bs, bv),
      bs_tv_per_um=bs / tv, tb_th_um=th.mean, tb_th_sd_um=th.sd, tb_th_max_um=th.maximum,
      tb_sp_um=sp.mean, tb_sp_sd_um=sp.sd, tb_sp_max_um=sp.maximum,
      tb_n_per_um=_div(1.0, th.mean + sp.mean), delta_chi=dchi, connectivity=1 - dchi,
      conn_d_per_um3=(1 - dchi) / tv, da=fabric.da, fabric_eigenvalues=fabric.eigenvalues,
      fabric_eigenvectors=fabric.eigenvectors, mil_um=fabric.mil_um,
      smi=_div(6 * bv * surf.area_shift, bs * bs),
      tb_th_histogram=th.histogram(), tb_sp_histogram=sp.histogram())


def cortical(labels: Any, classes: int | Sequence[int] | None = None,
             voxel_size_um: float | Sequence[float] = 1.0, *, roi: Any = None, axis: int = 0,
             max_block_voxels: int = 2 ** 24, threads: int = 2,
             exact_radius_um: float | None = math.inf) -> Cortical:
  """Ct.Th (local thickness of the cortical phase) and Ct.Ar, Tt.Ar per slice along `axis`
  (0 = Z, the bone's long axis); a mask ROI is taken as the periosteal envelope (Tt.Ar)."""
  if axis not in (0, 1, 2):
    raise errors.UserError(f"axis {axis!r} must be 0 (Z), 1 (Y) or 2 (X)")
  vs, rd, class_ids, _, _, roi_name = _prepare(labels, classes, voxel_size_um, roi,
                                               max_block_voxels)
  exact = exact_radius_um
  th = _thickness.thickness(rd.phase, rd.shape, vs, max_block_voxels=max_block_voxels,
                            threads=threads, exact_radius_um=exact)
  ct, tt, n = _cortical.areas(rd.phase, rd.shape, vs, axis,
                              rd.roi if rd.mask is not None else None)
  return Cortical(classes=tuple(class_ids), voxel_size_zyx_um=vs, roi=roi_name, axis=axis,
                  slices=n, ct_th_um=th.mean, ct_th_sd_um=th.sd, ct_ar_um2=ct / n,
                  tt_ar_um2=tt / n, ct_ar_tt_ar=ct / tt, ct_th_histogram=th.histogram())


def compare(prediction: Morphometry | Cortical, truth: Morphometry | Cortical
            ) -> dict[str, dict[str, float | None]]:
  """ASBMR name -> {prediction, truth, relative_difference ((pred - truth) / |truth|)}."""
  p, t = prediction.table(), truth.table()
  rows = {}
  for name in t:
    a, b = p.get(name), t[name]
    rel = (a - b) / abs(b) if a is not None and b and math.isfinite(a) and math.isfinite(b) \
        else None
    rows[name] = _jsonable({"prediction": a, "truth": b, "relative_difference": rel})
  return rows
