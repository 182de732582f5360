"""Voxel sizes: length units to micrometres, and how a voxel size is written into attributes.

A voxel size is (Z, Y, X) in micrometres everywhere in bonejax, never collapsed to one number
except in the contract's `voxel_size_um` attribute (X's size), which is written beside the full
`voxel_size_zyx_um` whenever the voxels are anisotropic.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from bonejax.io import resample

# Length units to micrometres (OME, NeXus, ImageJ and HDF5 attribute spellings).
_UNITS_UM = {"um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "micrometre": 1.0,
             "\u00b5m": 1.0, "\u03bcm": 1.0, "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3,
             "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3, "cm": 1e4, "centimeter": 1e4,
             "m": 1e6, "meter": 1e6, "metre": 1e6, "angstrom": 1e-4, "\u00e5": 1e-4, "a": 1e-4}


def unit_to_um(unit: Any) -> float | None:
  """Micrometres per `unit` (a name in any common spelling), or None when unknown."""
  if unit is None:
    return None
  if isinstance(unit, bytes):
    unit = unit.decode(errors="replace")
  return _UNITS_UM.get(str(unit).strip().lower())


def positive(values: Sequence[float]) -> tuple[float, float, float] | None:
  """`values` as a (Z, Y, X) tuple when there are three finite positive sizes, else None."""
  v = tuple(float(x) for x in values)
  return v if len(v) == 3 and all(math.isfinite(x) and x > 0 for x in v) else None


def voxel_attrs(voxel: Sequence[float]) -> dict[str, Any]:
  """`voxel_size_um` as one number (the contract's), plus (Z, Y, X) when anisotropic."""
  voxel = [float(v) for v in voxel]
  if resample.isotropic(voxel):
    return {"voxel_size_um": voxel[2]}
  return {"voxel_size_um": voxel[2], "voxel_size_zyx_um": voxel}
