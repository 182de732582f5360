"""2.5D context planes, one definition for training and prediction.

A 2.5D model (BONe's DLFit: 3 to 9 planes) sees the 2k + 1 planes plane-k .. plane+k of a volume
as the channels of one example. At the volume's ends the missing planes are mirrored back into
it without repeating the edge plane (numpy's 'reflect'), the same rule the patch stream uses for
crops that overhang a plane: the model never sees a plane that does not exist, nor an edge
plane twice in a row. `reflect_index` is the one mirror rule of the package: the host patch
stream, the device sampler (jax, a per-crop n) and the augmentation's warps (jax) all call it.
numpy only at import: the predictor imports this without the data pipeline.
"""

from __future__ import annotations

import numpy as np


def reflect_index(idx, n, xp=np):
  """Mirror integer indices into [0, n) without repeating the edge (numpy's 'reflect' pad mode).

  `xp`: numpy, or jax.numpy inside jitted code; `n` a Python int or an array broadcasting
  against `idx` (a per-crop size). n = 1 maps everything to 0 (the period is clamped to 1).
  """
  period = max(2 * (n - 1), 1) if isinstance(n, int) else xp.maximum(2 * (n - 1), 1)
  m = xp.mod(idx, period)
  return xp.where(m < n, m, period - m)


def context_planes(plane: int, n: int, k: int) -> np.ndarray:
  """The 2k + 1 plane indices a 2.5D example stacks as channels, in order: plane-k .. plane+k,
  mirrored into [0, n). k = 0: [plane]."""
  return reflect_index(np.arange(int(plane) - int(k), int(plane) + int(k) + 1), int(n))


def read_with_context(read, n: int, s0: int, s1: int, k: int) -> np.ndarray:
  """Planes s0 .. s1-1 of a volume with n planes along the read axis, each with its 2k + 1
  context planes as the last axis: (s1 - s0, H, W, 2k + 1).

  `read(a, b)` returns planes a .. b-1 as (b - a, H, W); one read covers the slab and its
  k-plane halos (mirrored at the ends).
  """
  a, b = max(0, s0 - k), min(n, s1 + k)
  block = read(a, b)
  planes = block[reflect_index(np.arange(s0 - k, s1 + k), n) - a]
  windows = np.lib.stride_tricks.sliding_window_view(planes, 2 * k + 1, axis=0)
  return np.ascontiguousarray(windows)  # (s1 - s0, H, W, 2k + 1)
