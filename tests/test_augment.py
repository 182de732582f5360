"""On-device augmentation: shapes, label values, identity, jit, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bonejax.core import errors
from bonejax.train import augment as aug

B, P = 3, 24


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(B, P, P, 1)).astype(np.float32)
  label = rng.choice(np.array([0, 2, 5], np.int32), size=(B, P, P))
  return jnp.asarray(image), jnp.asarray(label)


def _all_on():
  cfg = aug.default_augment_config()
  cfg.flip_v, cfg.rot90, cfg.gamma, cfg.noise_std, cfg.elastic_prob = True, True, 0.2, 0.05, 1.0
  return cfg


def test_shapes_labels_jit_and_determinism():
  image, label = _batch()
  cfg = _all_on()
  f = jax.jit(lambda k, x, y: aug.augment(k, x, y, cfg))
  x1, y1 = f(jax.random.key(1), image, label)
  x2, y2 = f(jax.random.key(1), image, label)
  x3, _ = f(jax.random.key(2), image, label)
  assert x1.shape == image.shape and x1.dtype == jnp.float32
  assert y1.shape == label.shape and y1.dtype == label.dtype
  assert set(np.unique(y1)) <= {0, 2, 5}
  np.testing.assert_array_equal(x1, x2)
  np.testing.assert_array_equal(y1, y2)
  assert not np.allclose(x1, x3)
  assert np.isfinite(np.asarray(x1)).all()


def test_identity_config_returns_input_exactly():
  image, label = _batch()
  for cfg in (aug.identity_augment_config(),
              dict(crop=False, flip_h=False, rotate_degrees=0.0, elastic_prob=0.0,
                   brightness=0.0, contrast=0.0)):
    x, y = jax.jit(lambda k, a, b: aug.augment(k, a, b, cfg))(jax.random.key(0), image, label)
    np.testing.assert_array_equal(x, image)
    np.testing.assert_array_equal(y, label)


def test_flips_and_rot90_are_exact_permutations():
  image, label = _batch()
  cfg = dict(crop=False, flip_h=True, flip_v=True, rot90=True, rotate_degrees=0.0,
             elastic_prob=0.0, brightness=0.0, contrast=0.0)
  x, y = jax.jit(lambda k, a, b: aug.augment(k, a, b, cfg))(jax.random.key(3), image, label)
  for i in range(B):
    cands = [np.rot90(f, k) for k in range(4)
             for f in (np.asarray(image[i, ..., 0]), np.asarray(image[i, ::-1, :, 0]))]
    match = [k for k, c in enumerate(cands) if np.array_equal(c, x[i, ..., 0])]
    assert match, "a flip/rot90 must only permute pixels"
    lab = [np.rot90(f, k) for k in range(4)
           for f in (np.asarray(label[i]), np.asarray(label[i, ::-1]))][match[0]]
    np.testing.assert_array_equal(lab, y[i])  # image and labels move together


def test_geometry_moves_image_and_label_together():
  # Label = 1 where the image is bright: after any geometric transform, they still agree.
  yy, xx = np.mgrid[:P, :P]
  img = ((yy // 6 + xx // 6) % 2).astype(np.float32)
  image = jnp.asarray(np.broadcast_to(img[None, ..., None], (B, P, P, 1)))
  label = jnp.asarray(np.broadcast_to(img[None].astype(np.int32), (B, P, P)))
  cfg = dict(brightness=0.0, contrast=0.0, elastic_prob=1.0)
  x, y = jax.jit(lambda k, a, b: aug.augment(k, a, b, cfg))(jax.random.key(5), image, label)
  agree = (np.asarray(x[..., 0]) > 0.5) == (np.asarray(y) == 1)
  assert agree.mean() > 0.97  # only interpolated edge pixels may disagree


def test_unknown_option_refused():
  with pytest.raises(errors.UserError, match="colour"):
    aug.resolve_config({"colour": 1})


def test_bone_recipe_one_op_shift_scale_clip():
  # BONe's augmentation (configs/bone_dlfit.py): one table op per example, shift and scale each
  # with p = 0.4, clip to [-5, 5]; on 3-channel (2.5D) examples. Every output is exactly
  # clip((D(x) + s) * f) for one D of the table, s = 0 or |s| <= 0.15, f = 1 or in [0.75, 1.25].
  n, p, ops = 240, 8, aug.DIHEDRAL
  rng = np.random.default_rng(0)
  image = rng.uniform(-3, 3, (n, p, p, 3)).astype(np.float32)
  image[:, 0, 0, 0] = 20.0  # clipped to 5 whatever the shift and scale
  label = rng.integers(0, 3, (n, p, p)).astype(np.int32)
  cfg = dict(crop=False, flip_h=False, rotate_degrees=0.0, elastic_prob=0.0, contrast=0.0,
             one_of=tuple(ops), brightness=0.15, brightness_prob=0.4, scale=(0.75, 1.25),
             scale_prob=0.4, clip=(-5.0, 5.0))
  x, y = jax.jit(lambda k, a, b: aug.augment(k, a, b, cfg))(jax.random.key(7), image, label)
  x, y = np.asarray(x), np.asarray(y)
  assert x.max() == 5.0 and x.min() >= -5.0
  seen, shifted, scaled = [], 0, 0
  for i in range(n):
    fits = []
    for name, m in ops.items():
      k = {"none": 0, "rot90": 1, "rot180": 2, "rot270": 3}.get(name)
      # (row, col) -> m (row, col): rot90 is numpy's rot90 the other way round (output pixel
      # (r, c) reads the input at m (r, c)).
      t = (lambda a, k=k: np.rot90(a, -k)) if k is not None else (
          (lambda a: a[:, ::-1]) if name == "flip_h" else (lambda a: a[::-1]))
      src = t(image[i])
      ok = src < 10  # the clipped pixel aside
      a, b = np.polyfit(src[ok], x[i][ok], 1)
      if np.abs(a * src[ok] + b - x[i][ok]).max() < 1e-4:
        fits.append((name, a, b))
        np.testing.assert_array_equal(y[i], t(label[i]))
    assert len(fits) == 1, fits
    name, f, b = fits[0]
    s = b / f
    seen.append(name)
    assert abs(f - 1) < 1e-5 or 0.75 - 1e-5 <= f <= 1.25 + 1e-5
    assert abs(s) <= 0.15 + 1e-5
    shifted += abs(s) > 1e-6
    scaled += abs(f - 1) > 1e-6
  counts = [seen.count(k) for k in ops]
  assert min(counts) >= 20, counts  # each op ~40 of 240
  assert 0.28 < shifted / n < 0.52 and 0.28 < scaled / n < 0.52, (shifted, scaled)


def test_bone_options_refused_when_wrong():
  for bad, message in ((dict(one_of=("flip_d",)), "unknown operation"),
                       (dict(scale=(1.2, 0.8)), "augment.scale"),
                       (dict(clip=(5.0, -5.0)), "augment.clip"),
                       (dict(scale_prob=1.5), "scale_prob")):
    with pytest.raises(errors.UserError, match=message):
      aug.resolve_config(bad)
