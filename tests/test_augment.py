"""On-device augmentation: shapes, label values, identity, jit, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bonejax import cli
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
  with pytest.raises(cli.UserError, match="colour"):
    aug.resolve_config({"colour": 1})
