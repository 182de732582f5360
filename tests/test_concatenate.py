"""layers.concatenate: bf16 operands moved as bits (XLA's CPU backend concatenates bf16 through
float32) give jnp.concatenate's values and its gradient (each operand's slice), bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bonejax.models import layers


@pytest.mark.parametrize("axis", [-1, 1, 3])
def test_bf16_values_and_gradient_equal_jnp_concatenate(axis):
  rng = np.random.default_rng(0)
  shapes = [(2, 3, 4, 5), (2, 3, 4, 5)]
  shapes[1] = tuple(s + 2 if i == axis % 4 else s for i, s in enumerate(shapes[1]))
  xs = [jnp.asarray(rng.normal(size=s), jnp.bfloat16) for s in shapes]
  special = np.resize(np.array([np.nan, -np.inf, 0.0, -0.0, 1e-40], np.float32), shapes[0])
  xs.append(jnp.asarray(special, jnp.bfloat16))  # NaN, infinities, signed zeros, subnormals
  want, want_vjp = jax.vjp(lambda *a: jnp.concatenate(a, axis=axis), *xs)
  got, got_vjp = jax.vjp(lambda *a: layers.concatenate(a, axis=axis), *xs)
  assert got.dtype == jnp.bfloat16 and got.shape == want.shape
  np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16))
  g = jnp.asarray(rng.normal(size=want.shape), jnp.bfloat16)
  for a, b in zip(got_vjp(g), want_vjp(g)):
    assert a.dtype == jnp.bfloat16 and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))
  jitted = jax.jit(jax.grad(lambda *a: layers.concatenate(a, axis=axis).astype(jnp.float32).sum(),
                            argnums=(0, 1)))
  for part in jitted(*xs):
    np.testing.assert_array_equal(np.asarray(part, np.float32), 1.0)


def test_other_dtypes_are_jnp_concatenate():
  a, b = jnp.ones((2, 3), jnp.float32), jnp.zeros((2, 1), jnp.bfloat16)
  got = layers.concatenate([a, b])
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, jnp.concatenate([a, b], axis=-1))
  single = jnp.ones((2, 3), jnp.bfloat16)
  np.testing.assert_array_equal(layers.concatenate([single]), single)
