"""Degree of anisotropy from the mean intercept length (MIL; Whitehouse 1974, Harrigan and Mann
1984), as BoneJ's Anisotropy reports it: the MIL along many directions w, points MIL(w) w, an
ellipsoid x^T M x = 1 fitted to them by linear least squares, DA = 1 - smallest / largest
eigenvalue of M.

Instead of casting test lines through voxels (BoneJ samples random line grids), the intercepts
per unit length P_L(w) come from the bone surface's orientations (surface.intercepts_per_um):
that is what line counting estimates, without its sampling noise, and it works unchanged on
anisotropic voxels and in blocks. MIL(w) = 2 / P_L(w): the mean length between successive
entries into bone along w.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Fabric:
  da: float                   # 1 - min/max eigenvalue of M (0 isotropic, 1 fully anisotropic)
  eigenvalues: tuple          # of M, ascending (um^-2)
  eigenvectors: tuple         # unit (Z, Y, X) columns, in the eigenvalues' order
  mil_um: tuple               # MIL along the eigenvectors: 1 / sqrt(eigenvalue)


def fit(directions: np.ndarray, p_l: np.ndarray) -> Fabric:
  """Ellipsoid through the MIL points: w^T M w = (P_L(w) / 2)^2 for every direction w."""
  ok = p_l > 0
  w, target = directions[ok], (p_l[ok] / 2) ** 2
  z, y, x = w[:, 0], w[:, 1], w[:, 2]
  design = np.stack([z * z, y * y, x * x, 2 * z * y, 2 * z * x, 2 * y * x], 1)
  c = np.linalg.lstsq(design, target, rcond=None)[0]
  m = np.array([[c[0], c[3], c[4]], [c[3], c[1], c[5]], [c[4], c[5], c[2]]])
  vals, vecs = np.linalg.eigh(m)
  vals = np.maximum(vals, 0.0)  # a direction with no intercepts: an infinite MIL
  da = 1.0 - vals[0] / vals[-1] if vals[-1] > 0 else float("nan")
  mil = tuple(float(1 / np.sqrt(v)) if v > 0 else float("inf") for v in vals)
  return Fabric(float(da), tuple(float(v) for v in vals),
                tuple(tuple(float(a) for a in vecs[:, i]) for i in range(3)), mil)
