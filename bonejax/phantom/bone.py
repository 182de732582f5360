"""A long-bone shaft: cortex with intracortical canals, trabecular metaphysis, marrow.

Classes: 0 background (outside the periosteal envelope), 1 bone, 2 pore (void inside the
envelope: canals, marrow, trabecular spaces). Pore and background get the same attenuation, so
only context (inside or outside the cortical shell) tells them apart, as in real scans.

The shaft runs along Z. Its periosteal radius R(theta, z) and cortical thickness T(theta, z) are
smooth functions (lobes, a flare and thinner cortex towards the metaphyseal end), so canal centre
lines can be placed at a depth inside the cortex analytically. Sizes are in voxels: canals 3-8
voxels across, trabeculae about 3-6, so the structures survive the blur and noise of ct.py, and
an empty marrow cavity is at most about 60 voxels across, so a 2D model with a 64-128 px view
can always see the cortex that makes a dark voxel pore rather than background.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import special

from bonejax.phantom import fields

CLASSES = ["background", "bone", "pore"]
BACKGROUND, BONE, PORE = 0, 1, 2
MAX_CAVITY = 30.0


def sample_params(rng: np.random.Generator, shape) -> dict[str, Any]:
  """The scan-to-scan variation: size, shape, cortex, porosity, trabeculae, mineral."""
  u = lambda a, b: float(rng.uniform(a, b))  # noqa: E731
  return {
      "radius_frac": u(0.55, 0.8),      # mean periosteal radius / half the YX side
      "lobe2": u(0.0, 0.12), "lobe3": u(0.0, 0.07),
      "lobe2_phase": u(0, 2 * np.pi), "lobe3_phase": u(0, 2 * np.pi),
      "twist": u(-0.6, 0.6),            # radians of lobe rotation over the Z extent
      "cortex_frac": u(0.2, 0.34),      # cortical thickness / radius at the diaphysis
      "cortex_asym": u(0.0, 0.35), "cortex_asym_phase": u(0, 2 * np.pi),
      "metaphysis_end": int(rng.integers(2)),  # 0: trabecular end at z=0, 1: at z=Z-1
      "metaphysis_len": u(0.45, 1.0),   # fraction of Z where trabeculae fill the marrow
      "endocortical_ring": u(0.0, 0.3),  # trabecular rim under the endosteum elsewhere
      "flare": u(0.0, 0.12),            # radius gain at the metaphyseal end
      "cortex_thinning": u(0.25, 0.5),  # relative thinning at the metaphyseal end
      "canal_porosity": u(0.02, 0.08),  # canal area / cortex area, per slice
      "canal_radius": u(1.6, 3.0),      # mean canal radius (voxels); each canal *0.75..1.35
      "canal_branching": u(0.2, 0.6),   # probability that a canal branches
      "trabecular_bvtv": u(0.28, 0.4),  # bone volume fraction of the trabecular region
      "trabecular_scale": u(4.2, 5.5),  # band-pass sigma (voxels): plates ~3-5 voxels thick
      "trabecular_aniso": u(1.2, 1.8),  # elongation along the shaft axis
      "endosteal_roughness": u(0.8, 2.0),
      "trabecular_mineral": u(0.85, 0.97),  # trabecular / cortical attenuation
      "mineral_variation": u(0.02, 0.06),
  }


def _metaphysis_weight(nz: int, p: dict[str, Any]) -> np.ndarray:
  """1 at the metaphyseal end, falling smoothly to 0 at metaphysis_len of the Z extent."""
  zz = np.linspace(0.0, 1.0, nz)
  if p["metaphysis_end"] == 1:
    zz = zz[::-1]
  t = np.clip(1.0 - zz / p["metaphysis_len"], 0.0, 1.0)
  return (t * t * (3 - 2 * t)).astype(np.float32)


class _Shaft:
  """R(theta, z), T(theta, z) and the centre line: shared by the volume and the canal paths."""

  def __init__(self, rng: np.random.Generator, shape, p: dict[str, Any]):
    nz, ny, nx = shape
    half = min(ny, nx) / 2.0
    self.s = _metaphysis_weight(nz, p)
    wobble = fields.smooth_curve(rng, nz, nz / 4.0, 0.03)
    drift = 0.03 * half
    self.cy = ny / 2.0 - 0.5 + fields.smooth_curve(rng, nz, nz / 3.0, drift)
    self.cx = nx / 2.0 - 0.5 + fields.smooth_curve(rng, nz, nz / 3.0, drift)
    # Keep the whole envelope inside the plane with a margin of background around it.
    margin = max(3.0, 0.06 * half * 2)
    peak = (1 + p["flare"]) * (1 + np.abs(wobble).max()) * (1 + p["lobe2"] + p["lobe3"])
    room = half - margin - 3 * drift
    self.r0 = min(p["radius_frac"] * half, room / peak)
    self.scale = (1 + p["flare"] * self.s + wobble).astype(np.float32)
    # An empty marrow cavity at most MAX_CAVITY voxels in radius: its centre must stay
    # within a 2D model's view of the cortex, or pore and background become a coin toss.
    self.t0 = max(4.0, p["cortex_frac"] * self.r0, self.r0 - MAX_CAVITY)
    self.thin = (1 - p["cortex_thinning"] * self.s).astype(np.float32)
    self.p = p
    self.twist = np.linspace(0, p["twist"], nz).astype(np.float32)

  def radius(self, theta, z):
    p, zi = self.p, np.asarray(z, np.int64)
    tw = self.twist[zi]
    lobes = (1 + p["lobe2"] * np.cos(2 * (theta - p["lobe2_phase"] - tw))
             + p["lobe3"] * np.cos(3 * (theta - p["lobe3_phase"] - tw)))
    return self.r0 * self.scale[zi] * lobes

  def thickness(self, theta, z):
    p, zi = self.p, np.asarray(z, np.int64)
    asym = 1 + p["cortex_asym"] * np.cos(theta - p["cortex_asym_phase"] - self.twist[zi])
    t = self.t0 * self.thin[zi] * asym
    return np.minimum(np.maximum(t, 3.5), 0.5 * self.radius(theta, z))


def _canal_paths(rng: np.random.Generator, shaft: _Shaft, nz: int, p: dict[str, Any]):
  """Centre-line points and radii of roughly axial, branching canals and a few radial ones."""
  # Number of canals crossing a slice so that their area is canal_porosity of the cortex.
  cortex_area = 2 * np.pi * shaft.r0 * shaft.t0
  n_slice = max(2, int(round(p["canal_porosity"] * cortex_area / (np.pi * p["canal_radius"]**2))))
  pts, rads = [], []
  step = 0.5
  total = 0.0  # canal length placed so far, in slices
  while total < n_slice * nz:
    length = int(rng.integers(max(8, nz // 4), nz + 1))
    z0 = int(rng.integers(-length // 2, nz - length // 2))
    zs = np.arange(z0, z0 + length, step)
    zs = zs[(zs >= 0) & (zs <= nz - 1)]
    total += len(zs) * step
    if len(zs) < 4:
      continue
    theta = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.004, len(zs)))
    depth = np.clip(rng.uniform(0.3, 0.7) + np.cumsum(rng.normal(0, 0.01, len(zs))), 0.25, 0.75)
    radius = p["canal_radius"] * rng.uniform(0.75, 1.35)
    branches = [(theta, depth, radius)]
    if rng.uniform() < p["canal_branching"] and len(zs) > 16:
      # The branch leaves the parent at a random level and drifts away along theta and depth.
      b = int(rng.integers(len(zs) // 4, 3 * len(zs) // 4))
      sign = rng.choice([-1.0, 1.0], size=2)
      ramp = np.maximum(np.arange(len(zs)) - b, 0) * step
      th_b = theta + sign[0] * ramp * rng.uniform(0.004, 0.012)
      de_b = np.clip(depth + sign[1] * ramp * rng.uniform(0.0, 0.01), 0.2, 0.8)
      keep = np.arange(len(zs)) >= b
      branches.append((th_b[keep], de_b[keep], radius * 0.8))
      zs_b = zs[keep]
    for k, (th, de, rad) in enumerate(branches):
      z = zs if k == 0 else zs_b
      zi = np.rint(z).astype(np.int64)
      rr = shaft.radius(th, zi) - de * shaft.thickness(th, zi)
      pts.append(np.stack([z, shaft.cy[zi] + rr * np.sin(th), shaft.cx[zi] + rr * np.cos(th)], 1))
      rads.append(np.full(len(z), rad))
  # Volkmann canals: short radial tubes from the marrow into the cortex.
  for _ in range(int(rng.integers(1, 4))):
    z = int(rng.integers(0, nz))
    th = rng.uniform(0, 2 * np.pi)
    de = np.arange(0.35, 1.15, 0.02)
    rr = shaft.radius(th, z) - de * shaft.thickness(th, z)
    pts.append(np.stack([np.full(len(de), z), shaft.cy[z] + rr * np.sin(th),
                         shaft.cx[z] + rr * np.cos(th)], 1))
    rads.append(np.full(len(de), p["canal_radius"] * 0.8))
  return np.concatenate(pts), np.concatenate(rads)


def generate(rng: np.random.Generator, shape) -> tuple[np.ndarray, np.ndarray, dict[str, Any],
                                                        dict[str, float]]:
  """(labels uint8, clean attenuation float32, parameters, object geometry for ct.render)."""
  nz, ny, nx = shape
  p = sample_params(rng, shape)
  shaft = _Shaft(rng, shape, p)
  r, theta = fields.polar(shape, shaft.cy, shaft.cx)
  z = np.arange(nz)[:, None, None]
  rad = shaft.radius(theta, z)
  thick = shaft.thickness(theta, z)
  s = shaft.s[:, None, None]

  # Surfaces: a smooth periosteum, an endosteum roughened more where trabeculae attach.
  peri = rad + 0.6 * fields.noise_field(rng, shape, (4, 4, 4), None) - r
  rough = fields.noise_field(rng, shape, (3, 4, 4), 2.0)
  endo = rad - thick + p["endosteal_roughness"] * (1 + s) * rough - r
  envelope = peri > 0
  medulla = endo > 0
  cortex = envelope & ~medulla

  # Canals keep 1.5 voxels of bone under the periosteum, so the envelope stays closed.
  pts, radii = _canal_paths(rng, shaft, nz, p)
  canals = fields.tubes(shape, pts, radii) & cortex & (peri > 1.5)

  # Trabeculae: the thickened zero set of band-passed noise is a connected plate-and-rod
  # network; P(|n| < t) = erf(t / sqrt 2) sets its bone volume fraction. Towards the
  # diaphysis the trabecular region shrinks to a ring under the endosteum and vanishes, rather
  # than thinning: thin struts would fall below what the blur leaves resolvable.
  sc, an = p["trabecular_scale"], p["trabecular_aniso"]
  n = fields.noise_field(rng, shape, (sc * an, sc, sc), 2.0)
  rel = r / np.maximum(rad - thick, 1.0) + 0.08 * rough
  region = medulla & (rel > 1.0 - np.maximum(1.3 * s, p["endocortical_ring"]))
  t = np.sqrt(2.0) * special.erfinv(p["trabecular_bvtv"])
  tb = region & (np.abs(n) < t * (0.85 + 0.15 * np.clip(rel, 0, 1)))

  bone = fields.remove_small((cortex & ~canals) | tb, 64)
  labels = np.where(envelope, PORE, BACKGROUND).astype(np.uint8)
  labels[bone] = BONE

  # Clean attenuation relative to cortical bone; soft tissue is set by ct.render.
  mineral = 1 + p["mineral_variation"] * fields.noise_field(rng, shape, (6, 6, 6), None)
  mu = np.where(bone, mineral, 0.0).astype(np.float32)
  mu[tb & bone] *= p["trabecular_mineral"]
  # Osteocyte lacunae: sub-voxel dark specks in the bone (texture, not a class).
  lac = bone & (rng.random(shape, dtype=np.float32) < 0.004)
  mu[lac] *= 0.5

  p["periosteal_radius_vox"] = shaft.r0
  p["cortical_thickness_vox"] = shaft.t0
  p["canals_per_slice"] = int(round(p["canal_porosity"] * 2 * np.pi * shaft.r0 * shaft.t0
                                    / (np.pi * p["canal_radius"]**2)))
  geom = {"cy": float(shaft.cy.mean()), "cx": float(shaft.cx.mean()), "radius": shaft.r0}
  return labels, mu, p, geom
