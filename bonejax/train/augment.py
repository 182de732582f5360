"""Data augmentation on the device: per example, inside the jitted train step, jnp only.

The geometric transforms (random resized crop, flips, 90-degree rotations, free rotation,
elastic deformation) are composed into ONE sampling grid per example: each output pixel gets
one source coordinate, read with one bilinear gather for the image and one nearest-neighbour
gather for the labels. So any mix of them costs the same as one resize, and labels are only
ever copied, never interpolated: the label values out are a subset of the label values in.
Coordinates outside the patch are mirrored back into it (no edge repeat) for image and labels
alike, so a rotated corner shows real, correctly labelled tissue instead of an invented class
or an artificial black border.

Defaults follow Scaling the U-net (Baltruschat et al. 2021): crops of 85-100 % of the area with
aspect ratios 3:4 to 4:3 resized back to the patch, horizontal flips, rotations in
[-90, 90] degrees, elastic deformation, brightness and contrast. Vertical flips, 90-degree
rotations, gamma and noise are available and off by default.

BONe's (DLFit's) recipe is expressible too (configs/bone_dlfit.py): `one_of` draws ONE geometric
operation per example from a table (none, flip H, flip V, rot90 x k), uniformly; `brightness`
with `brightness_prob` is its intensity shift with a probability, `scale` with `scale_prob` its
multiplicative intensity scale (about 0, not the mean: on z-scored intensities it rescales the
spread of the values around the scan mean), `clip` bounds the result. These options draw their
random numbers from a stream of their own, so configs that do not use them get exactly the
augmentation they always had.

`cfg` is static (Python values read while tracing): close over it, do not pass it to jit.
The batch may be sharded on the trainer's 'data' mesh axis (AxisType.Auto, bonejax.train.mesh):
the per-example keys then follow it without help. (On an Explicit-axis mesh vmap would refuse
replicated keys beside a sharded batch; nothing in bonejax builds one.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bonejax.core import errors
from bonejax.data import context


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  enabled: bool = True
  crop: bool = True                       # random resized crop
  crop_area: tuple = (0.85, 1.0)          # fraction of the patch area
  crop_ratio: tuple = (3 / 4, 4 / 3)      # width / height, uniform
  flip_h: bool = True                     # mirror columns, p = 0.5
  flip_v: bool = False                    # mirror rows, p = 0.5
  rot90: bool = False                     # k * 90 degrees, k uniform in 0..3
  rotate_degrees: float = 90.0            # uniform in [-d, d]; 0 disables
  elastic_prob: float = 0.5               # probability of an elastic deformation
  elastic_grid: int = 4                   # control points per side of the coarse noise
  elastic_sigma: float = 0.02             # displacement std, fraction of the patch side
  brightness: float = 0.1                 # add U(-b, b)
  contrast: float = 0.1                   # scale about the mean by U(1 - c, 1 + c)
  gamma: float = 0.0                      # x^exp(U(-g, g)) on the example's [min, max]
  noise_std: float = 0.0                  # Gaussian noise, std U(0, s)
  one_of: tuple = ()                      # one op per example, uniform over these DIHEDRAL names
  brightness_prob: float = 1.0            # probability of the brightness shift
  scale: tuple = (1.0, 1.0)               # multiply by U(lo, hi)
  scale_prob: float = 1.0                 # probability of the scale
  clip: tuple = ()                        # (lo, hi): clip after every intensity change

  @property
  def geometric(self) -> bool:
    return self.enabled and (self.crop or self.flip_h or self.flip_v or self.rot90 or
                             self.rotate_degrees > 0 or self.elastic_prob > 0 or
                             bool(self.one_of))

  @property
  def extra_draws(self) -> bool:
    """Whether the options with a random stream of their own are used."""
    return bool(self.one_of) or (self.brightness > 0 and self.brightness_prob < 1) or \
        tuple(self.scale) != (1.0, 1.0)


# Options added after runs were written, at the values that keep the old augmentation (a run's
# fingerprint leaves them out at these values: configlib.normalize_fingerprint).
ADDED_DEFAULTS = {"one_of": (), "brightness_prob": 1.0, "scale": (1.0, 1.0), "scale_prob": 1.0,
                  "clip": ()}


def default_augment_config() -> ml_collections.ConfigDict:
  """The defaults as a ConfigDict (a training config's `augment` field)."""
  return ml_collections.ConfigDict(dataclasses.asdict(AugmentConfig()))


def identity_augment_config() -> ml_collections.ConfigDict:
  """Everything off: augment() returns its input unchanged."""
  cfg = default_augment_config()
  cfg.enabled = False
  return cfg


def config_fields(cls: type, cfg: Any) -> dict[str, Any]:
  """The fields a ConfigDict / dict gives for the dataclass `cls` (2D or 3D augmentation),
  unknown keys refused with one line naming them."""
  d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise errors.UserError(f"unknown augment option(s) {', '.join(unknown)} "
                           f"(known: {', '.join(sorted(known))})")
  return d


def resolve_config(cfg: Any = None) -> AugmentConfig:
  """ConfigDict / dict / AugmentConfig / None -> AugmentConfig; missing fields keep defaults."""
  if isinstance(cfg, AugmentConfig):
    return cfg
  if cfg is None:
    return AugmentConfig()
  d = config_fields(AugmentConfig, cfg)
  for k in ("crop_area", "crop_ratio", "scale", "clip"):
    if k in d:
      d[k] = tuple(float(v) for v in d[k])
  if "one_of" in d:
    d["one_of"] = tuple(str(v) for v in ((d["one_of"],) if isinstance(d["one_of"], str)
                                         else d["one_of"]))
  c = AugmentConfig(**d)
  bad = sorted(set(c.one_of) - set(DIHEDRAL))
  if bad:
    raise errors.UserError(f"augment.one_of has unknown operation(s) {', '.join(bad)} "
                        f"(known: {', '.join(DIHEDRAL)})")
  if len(c.scale) != 2 or not 0 < c.scale[0] <= c.scale[1]:
    raise errors.UserError(f"augment.scale={c.scale} must be (lo, hi) with 0 < lo <= hi")
  if c.clip and (len(c.clip) != 2 or not c.clip[0] < c.clip[1]):
    raise errors.UserError(f"augment.clip={c.clip} must be () or (lo, hi) with lo < hi")
  for k in ("brightness_prob", "scale_prob"):
    if not 0.0 <= getattr(c, k) <= 1.0:
      raise errors.UserError(f"augment.{k}={getattr(c, k)} must be in [0, 1]")
  return c


def augment(key: jax.Array, image: jax.Array, label: jax.Array, cfg: Any = None):
  """(B, H, W, C) float32 image, (B, H, W) int labels -> the same shapes, augmented."""
  c = resolve_config(cfg)
  if not c.enabled:
    return image, label
  keys = jax.random.split(key, image.shape[0])
  return jax.vmap(lambda k, x, y: _augment_one(k, x, y, c))(keys, image, label)


# ---------------------------------------------------------------------------------------------
# One example.
# ---------------------------------------------------------------------------------------------


def _augment_one(key, image, label, c: AugmentConfig):
  # Few, vectorised draws: every threefry call adds a sizeable subgraph to compile.
  k_u, k_elastic, k_noise = jax.random.split(key, 3)
  u = jax.random.uniform(k_u, (_NUM_UNIFORMS,))
  if c.extra_draws:  # their own stream: the draws above stay what they always were
    u = jnp.concatenate([u, jax.random.uniform(jax.random.fold_in(k_u, 1), (_NUM_EXTRA,))])
  if c.geometric:
    src = _sampling_grid(u, k_elastic, label.shape, c)
    image = _gather_bilinear(image, src)
    label = _gather_nearest(label, src)
  image = _intensity(u, k_noise, image, c)
  return image, label


# Slots of the per-example uniform draws (the extra ones only when `extra_draws`).
(_U_ELASTIC, _U_AREA, _U_RATIO, _U_CY, _U_CX, _U_FLIPV, _U_FLIPH, _U_ANGLE, _U_ROT90,
 _U_BRIGHT, _U_CONTRAST, _U_GAMMA, _U_NOISE, _NUM_UNIFORMS) = range(14)
_U_ONE_OF, _U_BRIGHT_P, _U_SCALE, _U_SCALE_P, _END = range(_NUM_UNIFORMS, _NUM_UNIFORMS + 5)
_NUM_EXTRA = _END - _NUM_UNIFORMS


def _between(u, lo, hi):
  return lo + (hi - lo) * u


# Exact rotation matrices for k * 90 degrees (cos/sin of pi/2 are not exactly 0 in float32).
# numpy, not jnp: a module-level jax array would start the backend at import time.
_ROT90 = np.array([[[1, 0], [0, 1]], [[0, -1], [1, 0]], [[-1, 0], [0, -1]], [[0, 1], [-1, 0]]],
                  np.float32)
# BONe's table of geometric operations, as (row, col) maps: `one_of` picks one per example.
DIHEDRAL = {"none": _ROT90[0], "flip_h": np.diag([1, -1]).astype(np.float32),
            "flip_v": np.diag([-1, 1]).astype(np.float32), "rot90": _ROT90[1],
            "rot180": _ROT90[2], "rot270": _ROT90[3]}


def _sampling_grid(u, key, shape, c: AugmentConfig) -> jax.Array:
  """(H, W, 2) source (row, col) coordinate of every output pixel.

  src = centre + R90 . R(theta) . F . S . (p + elastic(p)), with p the output pixel relative to
  the patch centre, S the crop's scale, F the flips; all in pixels.
  """
  h, w = shape
  rows = jnp.arange(h, dtype=jnp.float32) - (h - 1) / 2
  cols = jnp.arange(w, dtype=jnp.float32) - (w - 1) / 2
  p = jnp.stack(jnp.meshgrid(rows, cols, indexing="ij"), -1)  # (H, W, 2)

  if c.elastic_prob > 0:
    # Smooth displacements: Gaussian noise on a coarse grid, upsampled bicubically.
    g = max(2, int(c.elastic_grid))
    coarse = jax.random.normal(key, (g, g, 2)) * (c.elastic_sigma * max(h, w))
    # Separable matmuls with constant weights: far cheaper to compile than jax.image.resize.
    field = jnp.einsum("ia,abk,jb->ijk", _cubic_upsampler(h, g), coarse, _cubic_upsampler(w, g))
    p = p + jnp.where(u[_U_ELASTIC] < c.elastic_prob, field, 0.0)

  m = jnp.eye(2, dtype=jnp.float32)
  centre = jnp.zeros(2, jnp.float32)
  if c.crop:
    # torchvision's RandomResizedCrop, clipped to the patch instead of retried.
    area = _between(u[_U_AREA], *c.crop_area) * h * w
    ratio = _between(u[_U_RATIO], *c.crop_ratio)
    ch = jnp.minimum(jnp.sqrt(area / ratio), h)
    cw = jnp.minimum(jnp.sqrt(area * ratio), w)
    m = jnp.diag(jnp.stack([ch / h, cw / w]))
    free = jnp.stack([h - ch, w - cw]) / 2
    centre = _between(u[jnp.array([_U_CY, _U_CX])], -1.0, 1.0) * free
  flips = jnp.ones(2, jnp.float32)
  if c.flip_v:
    flips = flips.at[0].set(jnp.where(u[_U_FLIPV] < 0.5, -1.0, 1.0))
  if c.flip_h:
    flips = flips.at[1].set(jnp.where(u[_U_FLIPH] < 0.5, -1.0, 1.0))
  m = flips[:, None] * m
  if c.rotate_degrees > 0:
    t = _between(u[_U_ANGLE], -1.0, 1.0) * math.radians(c.rotate_degrees)
    cos, sin = jnp.cos(t), jnp.sin(t)
    m = jnp.array([[cos, -sin], [sin, cos]]) @ m
  if c.rot90:
    m = jnp.asarray(_ROT90)[jnp.minimum((u[_U_ROT90] * 4).astype(jnp.int32), 3)] @ m
  if c.one_of:
    table = np.stack([DIHEDRAL[name] for name in c.one_of])
    n = len(c.one_of)
    m = jnp.asarray(table)[jnp.minimum((u[_U_ONE_OF] * n).astype(jnp.int32), n - 1)] @ m
  src = p @ m.T + centre
  return src + jnp.array([(h - 1) / 2, (w - 1) / 2], jnp.float32)


def _cubic_upsampler(n: int, g: int) -> np.ndarray:
  """(n, g) weights of Keys cubic interpolation (a = -0.5) from g samples to n, edges clamped."""
  pos = (np.arange(n) + 0.5) * g / n - 0.5
  base = np.floor(pos).astype(int)
  out = np.zeros((n, g), np.float32)
  for off in range(-1, 3):
    j = base + off
    d = np.abs(pos - j)
    wgt = np.where(d <= 1, 1.5 * d**3 - 2.5 * d**2 + 1,
                   np.where(d < 2, -0.5 * d**3 + 2.5 * d**2 - 4 * d + 2, 0.0))
    np.add.at(out, (np.arange(n), np.clip(j, 0, g - 1)), wgt)
  return out


def _reflect(i: jax.Array, n: int) -> jax.Array:
  return context.reflect_index(i, n, jnp)


def _gather_bilinear(image, src):
  h, w, ch = image.shape
  flat = image.reshape(h * w, ch)
  y0f, x0f = jnp.floor(src[..., 0]), jnp.floor(src[..., 1])
  fy, fx = (src[..., 0] - y0f)[..., None], (src[..., 1] - x0f)[..., None]
  y0, x0 = y0f.astype(jnp.int32), x0f.astype(jnp.int32)
  ya, yb = _reflect(y0, h), _reflect(y0 + 1, h)
  xa, xb = _reflect(x0, w), _reflect(x0 + 1, w)
  at = lambda y, x: flat[y * w + x]  # noqa: E731
  top = at(ya, xa) * (1 - fx) + at(ya, xb) * fx
  bottom = at(yb, xa) * (1 - fx) + at(yb, xb) * fx
  return (top * (1 - fy) + bottom * fy).astype(image.dtype)


def _gather_nearest(label, src):
  h, w = label.shape
  y = _reflect(jnp.round(src[..., 0]).astype(jnp.int32), h)
  x = _reflect(jnp.round(src[..., 1]).astype(jnp.int32), w)
  return label.reshape(-1)[y * w + x]


def _intensity(u, key, x, c: AugmentConfig):
  if c.brightness > 0:
    shift = _between(u[_U_BRIGHT], -c.brightness, c.brightness)
    if c.brightness_prob < 1:
      shift = jnp.where(u[_U_BRIGHT_P] < c.brightness_prob, shift, 0.0)
    x = x + shift
  if c.contrast > 0:
    mean = x.mean()
    x = mean + (x - mean) * _between(u[_U_CONTRAST], 1 - c.contrast, 1 + c.contrast)
  if c.gamma > 0:
    # Gamma needs values in [0, 1]: apply it on the example's own range, then map back.
    g = jnp.exp(_between(u[_U_GAMMA], -c.gamma, c.gamma))
    lo, hi = x.min(), x.max()
    span = jnp.maximum(hi - lo, 1e-6)
    x = lo + jnp.power((x - lo) / span, g) * span
  if tuple(c.scale) != (1.0, 1.0):
    factor = _between(u[_U_SCALE], *c.scale)
    if c.scale_prob < 1:
      factor = jnp.where(u[_U_SCALE_P] < c.scale_prob, factor, 1.0)
    x = x * factor
  if c.noise_std > 0:
    x = x + c.noise_std * u[_U_NOISE] * jax.random.normal(key, x.shape, x.dtype)
  if c.clip:
    x = jnp.clip(x, c.clip[0], c.clip[1])
  return x
