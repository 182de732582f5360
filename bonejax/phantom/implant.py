"""A degrading magnesium screw in new bone (the explants of "Scaling the U-net").

Classes: 0 background (soft tissue, marrow, cracks), 1 bone, 2 degradation layer, 3 residual
material. A threaded screw runs along Z. Corrosion eats a pitted layer off its original
surface (and the products swell a little beyond it); the layer is broken into fragments by a
network of cracks. Its grey values wander from those of the residual metal up to those of bone,
so only its place (between metal and bone) and texture identify it, as in the real scans.
Woven new bone grows around the screw, touching it in places and separated by a soft-tissue gap
elsewhere, inside an outer cortical shell.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage, special

from bonejax.phantom import fields

CLASSES = ["background", "bone", "degradation layer", "residual material"]
BACKGROUND, BONE, LAYER, RESIDUAL = 0, 1, 2, 3


def sample_params(rng: np.random.Generator, shape) -> dict[str, Any]:
  u = lambda a, b: float(rng.uniform(a, b))  # noqa: E731
  return {
      "thread_radius_frac": u(0.34, 0.46),  # thread crest radius / half the YX side
      "core_frac": u(0.68, 0.8),            # core radius / crest radius
      "pitch": u(8.0, 14.0),                # voxels per turn
      "thread_phase": u(0.0, 1.0),
      "tip_frac": u(0.0, 0.3),              # fraction of Z beyond the screw tip
      "tip_end": int(rng.integers(2)),
      "tilt": (u(-0.04, 0.04), u(-0.04, 0.04)),
      "corrosion_depth": u(0.1, 0.28),      # mean depth / crest radius
      "pitting": u(0.3, 0.7),               # relative variation of the depth
      "swelling": u(0.5, 2.5),              # voxels the layer grows beyond the surface
      "crack_fraction": u(0.1, 0.22),       # crack volume / layer volume
      "crack_scale": u(3.0, 4.5),
      "bone_fraction": u(0.35, 0.55),       # near the implant, falling with distance
      "bone_scale": u(2.8, 4.0),
      "contact": u(0.3, 0.8),               # fraction of the surface bone touches
      "gap": u(1.5, 4.0),                   # soft-tissue gap elsewhere (voxels)
      "shell_frac": u(0.82, 0.93),          # outer cortical shell radius / half side
      "shell_thickness": u(4.0, 8.0),
      "residual_level": u(0.5, 0.72),       # attenuation of the metal, bone = 1
      "layer_spread": u(0.25, 0.4),
      "new_bone_mineral": u(0.82, 0.95),
  }


def generate(rng: np.random.Generator, shape) -> tuple[np.ndarray, np.ndarray, dict[str, Any],
                                                        dict[str, float]]:
  """(labels uint8, clean attenuation float32, parameters, object geometry for ct.render)."""
  nz, ny, nx = shape
  p = sample_params(rng, shape)
  half = min(ny, nx) / 2.0
  zc = np.arange(nz, dtype=np.float32) - nz / 2.0
  cy = ny / 2.0 - 0.5 + rng.uniform(-0.05, 0.05) * half + p["tilt"][0] * zc
  cx = nx / 2.0 - 0.5 + rng.uniform(-0.05, 0.05) * half + p["tilt"][1] * zc
  r, theta = fields.polar(shape, cy, cx)
  z = np.arange(nz, dtype=np.float32)[:, None, None]

  # Threaded screw: a helical trapezoid profile between core and crest, with a conical tip.
  r_t = p["thread_radius_frac"] * half
  r_c = p["core_frac"] * r_t
  turn = np.mod(z / p["pitch"] + theta / (2 * np.pi) + p["thread_phase"], 1.0)
  profile = np.clip((1.0 - np.abs(2.0 * turn - 1.0) - 0.2) / 0.6, 0.0, 1.0)
  r_s = r_c + (r_t - r_c) * profile
  along = z if p["tip_end"] == 0 else (nz - 1) - z
  tip = p["tip_frac"] * nz
  r_s = r_s * np.clip((along - tip) / (1.5 * p["pitch"]), 0.0, 1.0) ** 0.6
  screw = r < r_s

  # Corrosion: everything closer to the original surface than a pitted depth is layer.
  depth_in = ndimage.distance_transform_edt(screw).astype(np.float32)
  pits = fields.noise_field(rng, shape, (3, 3, 3), None)
  depth = p["corrosion_depth"] * r_t * np.maximum(1 + p["pitting"] * pits, 0.2)
  residual = screw & (depth_in > depth)
  swell = p["swelling"] * np.maximum(1 + 0.6 * fields.noise_field(rng, shape, (3, 3, 3), None), 0)
  outside = r - r_s  # radial distance beyond the surface (exact enough for a thin shell)
  layer = (screw & ~residual) | (~screw & (r_s > 0.5) & (outside < swell))
  # Cracks: the thickened zero set of band-passed noise fragments the layer into pieces.
  sc = p["crack_scale"]
  cracks = np.abs(fields.noise_field(rng, shape, (sc, sc, sc), 2.0)) < (
      np.sqrt(2.0) * special.erfinv(p["crack_fraction"]))
  layer &= ~cracks
  implant = residual | layer

  # New bone: a woven network, denser close to the implant, kept a gap away from it except
  # where it makes contact; an outer cortical shell closes the explant.
  dist = np.maximum(r - (r_t + p["swelling"]), 0.0)
  v = p["bone_fraction"] * (0.45 + 0.55 * np.exp(-dist / (0.4 * half)))
  bs = p["bone_scale"]
  woven = fields.noise_field(rng, shape, (bs, bs, bs), 2.0) > (
      np.sqrt(2.0) * special.erfinv(1 - 2 * v))
  contact = fields.noise_field(rng, shape, (4, 6, 6), None) < (
      np.sqrt(2.0) * special.erfinv(2 * p["contact"] - 1))
  near = (r - r_s < p["gap"] + swell) & (r_s > 0.5)
  shell_r = p["shell_frac"] * half * (1 + 0.03 * fields.noise_field(rng, shape, (8, 8, 8), None))
  shell = (r < shell_r) & (r > shell_r - p["shell_thickness"])
  bone = (woven & (r < shell_r) & ~(near & ~contact)) | shell
  bone = fields.remove_small(bone & ~implant & ~cracks, 64)

  labels = np.zeros(shape, np.uint8)
  labels[bone] = BONE
  labels[layer] = LAYER
  labels[residual] = RESIDUAL

  # Attenuation: the layer's grey value drifts between the metal's and bone's.
  rm = p["residual_level"]
  mix = np.clip(0.5 + p["layer_spread"] * fields.noise_field(rng, shape, (2, 2, 2), None), 0, 1)
  mu = np.zeros(shape, np.float32)
  mu[residual] = rm
  mu[layer] = (rm - 0.12 + (1.08 - rm + 0.12) * mix)[layer]
  mu[bone] = np.where(shell, 1.0, p["new_bone_mineral"])[bone]
  mu[bone] *= 1 + 0.04 * fields.noise_field(rng, shape, (5, 5, 5), None)[bone]

  p["thread_radius_vox"] = r_t
  p["core_radius_vox"] = r_c
  geom = {"cy": float(cy.mean()), "cx": float(cx.mean()), "radius": float(p["shell_frac"] * half)}
  return labels, mu, p, geom
