"""Cortical indices: Ct.Ar, Tt.Ar and Ct.Ar/Tt.Ar slice by slice along the bone's axis, Ct.Th by
local thickness (Bouxsein et al. 2010: the direct 3D thickness, as for Tb.Th).

Tt.Ar is the area inside the periosteal envelope: the ROI mask's area when one is given, else the
cortex slice with its holes filled (scipy.ndimage.binary_fill_holes; a cortex open in a slice
leaves its marrow unfilled there: give the envelope as an ROI for such scans).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy import ndimage


def areas(read_phase: Callable[[tuple[slice, ...]], np.ndarray], shape: Sequence[int],
          vs: Sequence[float], axis: int, roi_mask: Callable[[tuple[slice, ...]], np.ndarray]
          | None = None, slab: int = 16) -> tuple[float, float, int]:
  """(summed Ct.Ar, summed Tt.Ar, slices with any cortex): areas in um^2."""
  pixel = float(np.prod([v for i, v in enumerate(vs) if i != axis]))
  ct = tt = 0.0
  used = 0
  for a in range(0, shape[axis], slab):
    sl = [slice(0, n) for n in shape]
    sl[axis] = slice(a, min(a + slab, shape[axis]))
    phase = np.moveaxis(np.asarray(read_phase(tuple(sl)), bool), axis, 0)
    env = None if roi_mask is None else np.moveaxis(np.asarray(roi_mask(tuple(sl)), bool), axis, 0)
    for i in range(phase.shape[0]):
      c = int(phase[i].sum())
      if c == 0:
        continue
      used += 1
      ct += c * pixel
      filled = env[i] if env is not None else ndimage.binary_fill_holes(phase[i])
      tt += float(filled.sum()) * pixel
  return ct, tt, used
