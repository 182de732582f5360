"""3D data augmentation on the device: per example, inside the jitted train step, jnp only.

The 3D twin of `augment` with the same call, `augment(key, image, label, cfg)` on (B, D, H, W,
C) images and (B, D, H, W) labels. Geometric transforms are the exact symmetries of a voxel
grid, so labels are only ever moved, never interpolated, and no voxel is invented: a mirror
along each axis (p = 0.5 each), a 90-degree rotation k x 90 (k uniform in 0..3) in the (H, W)
plane when the patch is square there, and a random permutation of the three axes when the patch
is a cube (micro-CT is usually isotropic; switch it off for anisotropic voxels). Intensity:
brightness (add U(-b, b)), contrast (scale about the example's mean by U(1 - c, 1 + c)),
Gaussian noise of std U(0, noise). nnU-Net's 3D defaults also mirror on every axis.

`cfg` is static (read while tracing): close over it. Keys are split per example, so a batch
sharded on the trainer's 'data' axis keeps its sharding.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import jax.numpy as jnp

from bonejax.core import errors
from bonejax.train import augment as augment2d


@dataclasses.dataclass(frozen=True)
class AugmentConfig3d:
  enabled: bool = True
  flip: bool = True            # mirror each axis with p = 0.5
  rot90: bool = True           # k x 90 degrees in (H, W), when H == W
  permute_axes: bool = True    # one of the 6 axis orders, when D == H == W
  brightness: float = 0.1
  contrast: float = 0.1
  noise: float = 0.0


def resolve_config(cfg: Any = None) -> AugmentConfig3d:
  """An AugmentConfig3d from None (defaults), a dict / ConfigDict (unknown keys refused)."""
  if isinstance(cfg, AugmentConfig3d):
    return cfg
  if cfg is None:
    return AugmentConfig3d()
  c = AugmentConfig3d(**augment2d.config_fields(AugmentConfig3d, cfg))
  for k in ("brightness", "contrast", "noise"):
    if float(getattr(c, k)) < 0:
      raise errors.UserError(f"augment.{k}={getattr(c, k)} must be >= 0")
  return c


def augment(key: jax.Array, image: jax.Array, label: jax.Array, cfg: Any = None):
  """(B, D, H, W, C) float32 image, (B, D, H, W) int labels -> the same shapes, augmented."""
  c = resolve_config(cfg)
  if not c.enabled:
    return image, label
  if image.ndim != 5 or label.ndim != 4:
    raise ValueError(f"3D augment takes (B, D, H, W, C) images and (B, D, H, W) labels, got "
                     f"{image.shape} and {label.shape}")
  keys = jax.random.split(key, image.shape[0])
  return jax.vmap(lambda k, x, y: _one(k, x, y, c))(keys, image, label)


def _one(key, image, label, c: AugmentConfig3d):
  kf, kr, kp, ki = jax.random.split(key, 4)
  d, h, w = label.shape
  if c.flip:
    flags = jax.random.bernoulli(kf, 0.5, (3,))
    for axis in range(3):
      image = jnp.where(flags[axis], jnp.flip(image, axis), image)
      label = jnp.where(flags[axis], jnp.flip(label, axis), label)
  if c.rot90 and h == w:
    k = jax.random.randint(kr, (), 0, 4)
    branches = [lambda xy, k=k: (jnp.rot90(xy[0], k, axes=(1, 2)),
                                 jnp.rot90(xy[1], k, axes=(1, 2))) for k in range(4)]
    image, label = jax.lax.switch(k, branches, (image, label))
  if c.permute_axes and d == h == w:
    perms = list(itertools.permutations(range(3)))
    i = jax.random.randint(kp, (), 0, len(perms))
    branches = [lambda xy, p=p: (jnp.transpose(xy[0], p + (3,)), jnp.transpose(xy[1], p))
                for p in perms]
    image, label = jax.lax.switch(i, branches, (image, label))
  kb, kc, kn, ks = jax.random.split(ki, 4)
  if c.brightness:
    image = image + jax.random.uniform(kb, (), minval=-c.brightness, maxval=c.brightness)
  if c.contrast:
    f = jax.random.uniform(kc, (), minval=1 - c.contrast, maxval=1 + c.contrast)
    mean = jnp.mean(image)
    image = (image - mean) * f + mean
  if c.noise:
    sigma = jax.random.uniform(ks, (), maxval=c.noise)
    image = image + sigma * jax.random.normal(kn, image.shape)
  return image, label
