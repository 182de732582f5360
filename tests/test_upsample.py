"""layers.upsample_nearest2x against PyTorch's nearest interpolation: forward, and the gradient
(each block of the cotangent summed in float32 and rounded once) against float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bonejax.models import layers


@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 3, 4, 5, 2)])
def test_forward_equals_torch_and_gradient_sums_each_block(shape):
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape).astype(np.float32)
  y = np.asarray(layers.upsample_nearest2x(jnp.asarray(x)))
  tx = torch.tensor(np.moveaxis(x, -1, 1).copy())
  want = torch.nn.functional.interpolate(tx, scale_factor=2, mode="nearest").numpy()
  np.testing.assert_array_equal(y, np.moveaxis(want, 1, -1))
  g = rng.normal(size=y.shape)
  n = len(shape) - 2
  # float64 reference: the cotangent of each input voxel is the sum over its 2^n copies.
  split = [shape[0]] + [a for s in shape[1:-1] for a in (s, 2)] + [shape[-1]]
  for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 2 ** -8)):
    _, vjp = jax.vjp(layers.upsample_nearest2x, jnp.asarray(x, dtype))
    (got,) = vjp(jnp.asarray(g, dtype))
    assert got.dtype == dtype and got.shape == x.shape
    # Of the cotangent as passed (bf16: rounded), summed exactly; the result rounded once.
    ref = np.asarray(jnp.asarray(g, dtype).astype(jnp.float32), np.float64).reshape(split).sum(
        tuple(2 + 2 * i for i in range(n)))
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), ref,
                               rtol=tol, atol=tol * np.abs(ref).max())
