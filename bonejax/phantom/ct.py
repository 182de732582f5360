"""The micro-CT look: what a scanner does to a clean attenuation map.

In order: soft-tissue level, partial-volume blur (the system's point spread), optional
phase-contrast edge enhancement (synchrotron), cupping (beam hardening: dense material reads
darker towards the object's centre), correlated noise whose amplitude grows with attenuation,
ring artefacts (concentric about the rotation axis, fixed radius through Z), and the scanner's
own windowing into uint16. Every knob is drawn per scan, so no two scans share grey levels.

Labels are never touched here: they stay on the clean geometry.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from bonejax.phantom import fields


def sample_params(rng: np.random.Generator, kind: str) -> dict[str, Any]:
  u = lambda a, b: float(rng.uniform(a, b))  # noqa: E731
  synchrotron = kind == "implant"
  return {
      "voxel_size_um": round(u(2.0, 6.0) if synchrotron else u(5.0, 15.0), 2),
      "soft_level": u(0.1, 0.3),            # soft tissue / void, relative to cortical bone = 1
      "blur_sigma": u(0.6, 1.0),            # voxels
      "edge_enhancement": u(0.2, 0.6) if synchrotron else u(0.0, 0.2),
      "cupping": u(0.0, 0.2),
      "noise_base": u(0.03, 0.07),          # noise std at zero attenuation
      "noise_slope": u(0.02, 0.07),         # extra std per unit attenuation
      "noise_corr_sigma": u(0.4, 0.8),      # reconstruction filters correlate neighbours
      "rings": int(rng.integers(3, 16)),
      "ring_strength": u(0.3, 1.5),         # in units of noise_base
      "gamma": u(0.85, 1.15),
      "offset": u(500.0, 12000.0),          # uint16 grey value of zero attenuation
      "bone_grey": u(14000.0, 40000.0),     # grey value of cortical bone above the offset
  }


def render(mu: np.ndarray, geom: dict[str, float], p: dict[str, Any],
           rng: np.random.Generator) -> np.ndarray:
  """uint16 image (Z, Y, X) from attenuation `mu` (void 0, cortical bone ~1)."""
  nz, ny, nx = mu.shape
  soft = p["soft_level"]
  a = soft + (1.0 - soft) * mu
  a = ndimage.gaussian_filter(a, p["blur_sigma"], mode="nearest")
  if p["edge_enhancement"] > 0:
    a += p["edge_enhancement"] * (a - ndimage.gaussian_filter(a, 1.5, mode="nearest"))

  # Cupping scales the attenuation above the soft-tissue level, so pore and background keep
  # the same grey value (a real scanner darkens those a little too, but much less than bone).
  y = np.arange(ny, dtype=np.float32)[:, None] - geom["cy"]
  x = np.arange(nx, dtype=np.float32)[None, :] - geom["cx"]
  r2 = (y * y + x * x) / max(geom["radius"], 1.0) ** 2
  a = soft + (a - soft) * (1.0 - p["cupping"] * np.exp(-r2))[None]

  noise = rng.standard_normal(mu.shape, dtype=np.float32)
  noise = ndimage.gaussian_filter(noise, p["noise_corr_sigma"], mode="wrap")
  noise /= max(float(noise.std()), 1e-6)
  a += (p["noise_base"] + p["noise_slope"] * np.maximum(a, 0.0)) * noise

  # Rings about the rotation axis (near, not at, the image centre), fading a little along Z.
  ry = np.arange(ny, dtype=np.float32)[:, None] - (ny / 2 + rng.uniform(-3, 3))
  rx = np.arange(nx, dtype=np.float32)[None, :] - (nx / 2 + rng.uniform(-3, 3))
  rr = np.hypot(ry, rx)
  rings = np.zeros((ny, nx), np.float32)
  for _ in range(p["rings"]):
    r0, w = rng.uniform(2.0, 0.7 * max(ny, nx)), rng.uniform(0.4, 1.0)
    amp = rng.normal(0.0, p["ring_strength"] * p["noise_base"])
    rings += amp * np.exp(-0.5 * ((rr - r0) / w) ** 2)
  fade = 1.0 + fields.smooth_curve(rng, nz, nz / 3.0, 0.2)
  a += rings[None] * fade[:, None, None].astype(np.float32)

  grey = p["offset"] + p["bone_grey"] * np.maximum(a, 0.0) ** p["gamma"]
  return np.clip(np.rint(grey), 0, 65535).astype(np.uint16)
