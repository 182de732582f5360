"""Bone measures from a label volume: BV/TV, porosity, and for implants BIC and DR.

Which measures apply is read from the class names (case-insensitive), not from a "kind":
  bone          a class named like "bone"                      -> bv_tv
  pore          a class named like "pore" / "porosity"         -> porosity
  implant       "degradation ..." (or "dl") and/or "residual ..." (or "rm")
                                                                -> bic, volumes, dr, shell ROI
Definitions (Scaling the U-net, eqs. 1-3), all fractions in [0, 1] (not percent):
- ROI without implant classes: the filled periosteal envelope, i.e. every voxel that is not
  background (class 0); for the bone phantom TV = bone + pore.
- ROI with implant classes (eq. 3): the voxels outside the implant (degradation layer and
  residual material, both excluded) whose Euclidean distance to the nearest implant voxel is at
  most `roi_distance_um` (a Euclidean distance in micrometres over the (Z, Y, X) voxel size, so
  anisotropic voxels are measured as they are). Without a distance, the ROI is every voxel
  outside the implant.
- bv_tv = bone voxels in the ROI / ROI voxels.
- porosity = pore / (bone + pore).
- Implant surface: implant voxels with at least one 6-neighbour inside the volume that is not
  implant. Neighbours beyond the volume border do not count (an implant cut by the field of view
  has no surface there). bic (eq. 2) = surface voxels with a bone 6-neighbour / surface voxels.
- dr (eq. 1) = (v_i - v_r) / (a_i * t) in mm/year, v_r = residual material volume. v_i and a_i
  are the user's initial implant volume (mm^3) and surface (mm^2); without them they are
  estimated from the segmentation as the volume and surface of the union of degradation layer
  and residual material. The estimated surface counts exposed voxel faces (each with its own
  area on anisotropic voxels: a face across Z is Y x X): exact for faces
  along the axes, but it overestimates oblique surfaces (by 3/2 on average over orientations,
  by 4/pi on the side of an axis-aligned cylinder), so give --initial_surface_mm2 when known.
  Needs t (years); without it dr is not reported.

Voxel sizes are (Z, Y, X) in micrometres (one number means isotropic); volumes are counts
times the voxel's volume Z * Y * X, never a cube of one side.

Everything is counted slab by slab along Z with a halo (1 slice for contacts and faces,
ceil(distance / Z size) slices for the shell ROI), so no more than one padded slab is in memory; the
shell's distance transform needs about 20 bytes per voxel of the padded slab cropped to the
implant's neighbourhood (lower --slab for very wide scans).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from bonejax.core import errors
from bonejax.core.progress import Progress
from bonejax.evaluate import metrics


@dataclasses.dataclass(frozen=True)
class Options:
  roi_distance_um: float | None = None
  implant_time_years: float | None = None
  initial_volume_mm3: float | None = None
  initial_surface_mm2: float | None = None

  def validate(self) -> None:
    for name in ("roi_distance_um", "implant_time_years", "initial_volume_mm3",
                 "initial_surface_mm2"):
      v = getattr(self, name)
      if v is not None and not (math.isfinite(v) and v > 0):
        raise errors.UserError(f"--{name}={v} must be a positive number")


@dataclasses.dataclass(frozen=True)
class Roles:
  """Class indices by role (None when the dataset has no such class)."""
  bone: int | None = None
  pore: int | None = None
  degradation: int | None = None
  residual: int | None = None

  @property
  def implant(self) -> list[int]:
    return [c for c in (self.degradation, self.residual) if c is not None]


def _matches(name: str, words: Sequence[str], abbreviations: Sequence[str]) -> bool:
  n = name.strip().lower()
  return n in abbreviations or any(w in n for w in words)


def roles(classes: Sequence[str]) -> Roles:
  found: dict[str, int] = {}
  rules = {"bone": (("bone",), ()), "pore": (("pore", "poros"), ()),
           "degradation": (("degrad",), ("dl",)), "residual": (("residual",), ("rm",))}
  for i, name in enumerate(classes):
    if i == 0:  # class 0 is background by contract, whatever its name
      continue
    for role, (words, abbreviations) in rules.items():
      if role not in found and _matches(str(name), words, abbreviations):
        found[role] = i
        break
  return Roles(**found)


def applicable(classes: Sequence[str]) -> list[str]:
  r = roles(classes)
  names = []
  if r.bone is not None:
    names.append("bv_tv")
  if r.pore is not None and r.bone is not None:
    names.append("porosity")
  if r.implant:
    names += (["bic"] if r.bone is not None else []) + ["dr"]
  return names


def _any_neighbour(mask: np.ndarray) -> np.ndarray:
  """True where one of the 6 neighbours inside the array is True (edges have fewer)."""
  out = np.zeros_like(mask)
  for axis in range(mask.ndim):
    lo = [slice(None)] * mask.ndim
    hi = [slice(None)] * mask.ndim
    lo[axis], hi[axis] = slice(0, -1), slice(1, None)
    out[tuple(lo)] |= mask[tuple(hi)]
    out[tuple(hi)] |= mask[tuple(lo)]
  return out


def _exposed_faces(mask: np.ndarray, inner: slice) -> np.ndarray:
  """Faces between `mask` and not-`mask` voxels across Z, Y and X (three counts: their areas
  differ on anisotropic voxels), counted once, owned by the inner slices.

  Along Z a face belongs to the slice below it, so faces on slab boundaries are not doubled.
  """
  m = mask
  a = m[inner]
  faces = np.zeros(3, np.int64)
  for axis in (1, 2):
    lo = [slice(None)] * 3
    hi = [slice(None)] * 3
    lo[axis], hi[axis] = slice(0, -1), slice(1, None)
    faces[axis] = int(np.count_nonzero(a[tuple(lo)] != a[tuple(hi)]))
  # Z faces between slice k and k+1, for k in the inner slices (k+1 may be in the halo).
  start, stop = inner.start, min(inner.stop, m.shape[0] - 1)
  if stop > start:
    faces[0] = int(np.count_nonzero(m[start:stop] != m[start + 1:stop + 1]))
  return faces


def _count_slab(block: np.ndarray, inner: slice, r: Roles, roi_um: float | None,
                voxel: tuple[float, float, float], num_classes: int) -> dict[str, Any]:
  """Counts for the inner slices of a padded block (halo slices only serve as neighbours)."""
  lab = block[inner]
  out = {"class_counts": metrics.class_counts(lab, num_classes)}
  if not r.implant:
    return out
  implant = np.isin(block, r.implant)
  surface = implant & _any_neighbour(~implant)
  out["surface"] = int(np.count_nonzero(surface[inner]))
  if r.bone is not None:
    contact = surface & _any_neighbour(block == r.bone)
    out["contact"] = int(np.count_nonzero(contact[inner]))
  out["faces"] = _exposed_faces(implant, inner)
  outside = ~implant[inner]
  if roi_um is None:
    roi = outside
  elif implant.any():
    # Exact within the halo: any implant voxel nearer than the distance lies inside the block.
    # The distance transform (about 20 bytes a voxel) runs only on the implant's Y, X bounding
    # box grown by the distance: nothing outside it can be in the shell.
    hy, hx = (math.ceil(roi_um / v) for v in voxel[1:])
    ys = np.flatnonzero(implant.any(axis=(0, 2)))
    xs = np.flatnonzero(implant.any(axis=(0, 1)))
    box = (slice(max(0, ys[0] - hy), ys[-1] + hy + 1), slice(max(0, xs[0] - hx), xs[-1] + hx + 1))
    dist = ndimage.distance_transform_edt(~implant[(slice(None),) + box], sampling=voxel)[inner]
    roi = np.zeros_like(outside)
    roi[(slice(None),) + box] = outside[(slice(None),) + box] & (dist <= roi_um)
  else:
    roi = np.zeros_like(outside)
  out["roi"] = int(np.count_nonzero(roi))
  out["roi_bone"] = int(np.count_nonzero(roi & (lab == r.bone))) if r.bone is not None else 0
  return out


def voxel_zyx(voxel_size_um: float | Sequence[float]) -> tuple[float, float, float]:
  """One number or (Z, Y, X) micrometres as three positive finite floats (else UserError)."""
  v = voxel_size_um
  try:
    v = (float(v),) * 3 if np.ndim(v) == 0 else tuple(float(x) for x in v)
  except (TypeError, ValueError):
    raise errors.UserError(f"voxel size {voxel_size_um!r} is not a number") from None
  if len(v) != 3 or not all(math.isfinite(x) and x > 0 for x in v):
    raise errors.UserError(f"voxel size {voxel_size_um!r} um must be one or three (Z, Y, X) "
                           f"positive finite numbers")
  return v


def measure(labels: Any, classes: Sequence[str], voxel_size_um: float | Sequence[float],
            options: Options | None = None, slab: int = 64,
            progress: bool | Progress | None = None) -> dict[str, Any]:
  """The applicable measures of one label volume (numpy, tensorstore or `.read_slab`);
  `voxel_size_um`: (Z, Y, X) micrometres, or one number for isotropic voxels."""
  options = options or Options()
  options.validate()
  voxel = voxel_zyx(voxel_size_um)
  r = roles(classes)
  if r.bone is None and not r.implant:
    return {}
  shape = metrics.shape_of(labels)
  if len(shape) != 3:
    raise errors.UserError(f"labels must be 3D (Z, Y, X), got shape {shape}")
  roi_um = options.roi_distance_um if r.implant else None
  halo = (max(1, math.ceil(roi_um / voxel[0])) if roi_um is not None else 1) if r.implant else 0
  bar = Progress(total=shape[0], desc="measures", unit="slices") if progress is True \
      else (progress or None)
  totals: dict[str, Any] = {}
  for z0 in range(0, shape[0], slab):
    z1 = min(z0 + slab, shape[0])
    a0, a1 = max(0, z0 - halo), min(shape[0], z1 + halo)
    block = metrics.read_slab(labels, a0, a1)
    if not np.issubdtype(block.dtype, np.integer):
      raise errors.UserError(f"labels must be integers, got {block.dtype}")
    metrics.check_range(block, len(classes), "label")
    part = _count_slab(block, slice(z0 - a0, z1 - a0), r, roi_um, voxel, len(classes))
    for k, v in part.items():
      totals[k] = totals.get(k, 0) + v
    if bar is not None:
      bar.update(z1 - z0)
  if progress is True:
    bar.close()
  return _finish(totals, r, voxel, options)


def _frac(num: float, den: float) -> float:
  return float(num) / float(den) if den > 0 else float("nan")


def _finish(t: dict[str, Any], r: Roles, voxel: tuple[float, float, float],
            o: Options) -> dict[str, Any]:
  vz, vy, vx = (v * 1e-3 for v in voxel)  # mm
  out = _from_counts(t["class_counts"], r, vz * vy * vx)
  if r.implant:
    # What needs neighbours and distances, beside the counts: the shell ROI, contact, surface.
    out["roi_volume_mm3"] = t["roi"] * vz * vy * vx
    if r.bone is not None:
      out["bv_tv"] = _frac(t["roi_bone"], t["roi"])
      out["bic"] = _frac(t["contact"], t["surface"])
    # Faces across Z are Y x X, across Y Z x X, across X Z x Y.
    surface_mm2 = float(np.dot(t["faces"], (vy * vx, vz * vx, vz * vy)))
    out["implant_surface_mm2"] = surface_mm2
    if o.implant_time_years is not None:
      v_i = (o.initial_volume_mm3 if o.initial_volume_mm3 is not None
             else out["implant_volume_mm3"])
      a_i = o.initial_surface_mm2 if o.initial_surface_mm2 is not None else surface_mm2
      out["dr_mm_per_year"] = _frac(v_i - out["residual_volume_mm3"], a_i * o.implant_time_years)
  return out


def count_measures(counts: Sequence[int], classes: Sequence[str],
                   voxel_size_um: float | Sequence[float]) -> dict[str, Any]:
  """The measures that are plain class counts, from voxels per class (a sparse truth's
  labelled voxels, and the prediction on the same voxels: report.evaluate).

  Bone volume, TV and BV/TV of the envelope (no implant), porosity, implant and residual
  volumes: as `measure` gives them on the same voxels. The implant's surface, BIC, DR and the
  shell ROI's BV/TV need every voxel's neighbours (and distances) and are left out."""
  r = roles(classes)
  if r.bone is None and not r.implant:
    return {}
  return _from_counts(counts, r, math.prod(v * 1e-3 for v in voxel_zyx(voxel_size_um)))


def _from_counts(counts: Sequence[int], r: Roles, voxel_mm3: float) -> dict[str, Any]:
  """The measures that class counts alone give (shared by `measure` and `count_measures`)."""
  counts = np.asarray(counts, np.int64)
  n = lambda c: int(counts[c]) if c is not None else 0  # noqa: E731
  out: dict[str, Any] = {}
  if r.bone is not None:
    out["bone_volume_mm3"] = n(r.bone) * voxel_mm3
  if r.implant:
    out["implant_volume_mm3"] = sum(n(c) for c in r.implant) * voxel_mm3
    out["residual_volume_mm3"] = n(r.residual) * voxel_mm3
  elif r.bone is not None:
    tv = int(counts.sum()) - int(counts[0])
    out["total_volume_mm3"] = tv * voxel_mm3
    out["bv_tv"] = _frac(n(r.bone), tv)
  if r.bone is not None and r.pore is not None:
    out["porosity"] = _frac(n(r.pore), n(r.bone) + n(r.pore))
  return out


def compare(pred: dict[str, Any], truth: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """{measure: {pred, truth, rel_diff}}, rel_diff = (pred - truth) / |truth| (None if 0/NaN)."""
  out = {}
  for k in truth:
    p, t = pred.get(k), truth[k]
    rel = None
    if p is not None and t is not None and math.isfinite(p) and math.isfinite(t) and t != 0:
      rel = (p - t) / abs(t)
    out[k] = {"pred": p, "truth": t, "rel_diff": rel}
  return out
