"""The Euler characteristic of a phase with Odgaard and Gundersen's (1993, Bone 14:173)
boundary correction, for Conn.D.

Written by hand only in how the windows are counted: the per-configuration contributions are
scikit-image's (`EULER_COEFS3D_26`, Ohser et al. 2002: 26-connected phase, 6-connected
complement; each 2x2x2 window's coefficient is 8x its share of the Euler characteristic).
`skimage.measure.euler_number` pads the image with background and sums every window, giving
chi of the phase as cut out by the image. Counting only the windows wholly inside the image (or
ROI) gives instead the contribution of the sampled region to the Euler characteristic of the
unbounded structure it was cut from (delta chi, what BoneJ's Connectivity reports): a rod
crossing the border adds nothing, where padded counting adds 1 per cut end. The windows are
additive, so blocks overlapping by one plane sum exactly.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from skimage.measure._regionprops_utils import EULER_COEFS3D_26

from bonejax.evaluate.morphometry import inputs

# weight of each voxel of the window (offset dz, dy, dx) in the configuration index, as
# skimage's convolution kernel orders them (checked against skimage.measure.euler_number)
_WEIGHTS = {(1, 1, 1): 1, (1, 0, 1): 2, (1, 1, 0): 4, (1, 0, 0): 8,
            (0, 1, 1): 16, (0, 0, 1): 32, (0, 1, 0): 64, (0, 0, 0): 128}


def window_sum(phase: np.ndarray, inside: np.ndarray | None = None) -> float:
  """8 x the summed Euler contributions of the 2x2x2 windows of `phase` (all 8 voxels in
  `inside`, when given)."""
  a = phase.astype(np.uint8, copy=False)
  n = [s - 1 for s in a.shape]
  if min(n) <= 0:
    return 0.0
  idx = np.zeros(n, np.uint8)
  for (dz, dy, dx), w in _WEIGHTS.items():
    idx += a[dz:dz + n[0], dy:dy + n[1], dx:dx + n[2]] * np.uint8(w)
  if inside is not None:
    ok = np.ones(n, bool)
    for dz, dy, dx in _WEIGHTS:
      ok &= inside[dz:dz + n[0], dy:dy + n[1], dx:dx + n[2]]
    idx = idx[ok]
  hist = np.bincount(idx.reshape(-1), minlength=256)
  return float(EULER_COEFS3D_26 @ hist)


def delta_chi(read_phase: Callable[[tuple[slice, ...]], np.ndarray], shape: Sequence[int], *,
              roi_mask: Callable[[tuple[slice, ...]], np.ndarray] | None = None,
              max_block_voxels: int = 2 ** 24) -> float:
  """Odgaard-Gundersen delta chi of the phase in the image (or mask ROI), block by block."""
  side = inputs.block_side(shape, [1, 1, 1], max_block_voxels)
  total = 0.0
  for b in inputs.blocks(shape, side, [0, 0, 0], extra_after=1):
    phase = np.asarray(read_phase(b.core), bool)
    inside = None if roi_mask is None else np.asarray(roi_mask(b.core), bool)
    total += window_sum(phase, inside)
  return total / 8


def padded_chi(phase: np.ndarray) -> float:
  """chi of the phase as cut by the image (skimage's convention), for checks."""
  return window_sum(np.pad(phase, 1)) / 8
