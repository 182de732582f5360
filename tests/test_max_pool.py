"""layers.max_pool against nnx.max_pool and PyTorch's MaxPool2d / MaxPool3d, ties included:
the forward is exact, the gradient goes where PyTorch sends it (the first maximum of each
window), on XLA and on oneDNN (the CPU training step's lowering). (A strided-slices max-pool
with its own first-max backward was tried for the CPU training step: its profile share fell
from 156 to 98 ms, the step's wall time did not move, so it was not kept; oneDNN's pooling
took the stem's max-pool from 143 to 2.2 ms forward + backward and the step with it.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from bonejax.models import layers, onednn
from bonejax.models.onednn import pooling


@pytest.mark.parametrize("lowering", ["xla", "onednn"])
@pytest.mark.parametrize("k,s,p,shape", [(3, 2, 1, (2, 9, 10, 3)), (2, 2, 0, (2, 8, 6, 3)),
                                         (2, 2, 0, (1, 4, 4, 6, 2))])
def test_max_pool_equals_nnx_and_its_gradient_equals_torch(k, s, p, shape, lowering):
  if lowering == "onednn" and len(shape) == 4:  # 3D pools stay on XLA (checked as well)
    assert onednn.available(), onednn.unavailable_reason()
    for dtype in ("float32", "bfloat16"):
      assert pooling.supports(shape, dtype, k, s, p)[0], pooling.supports(shape, dtype, k, s, p)
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape).astype(np.float32)
  x[0, :3, :3] = 1.0  # ties: several window positions hold the maximum
  x[-1, 1:4, 2:5] = 0.0  # as ReLU outputs tie at zero
  n = x.ndim - 2
  for dtype in (jnp.float32, jnp.bfloat16):
    xi = jnp.asarray(x, dtype)
    want = nnx.max_pool(xi, (k,) * n, strides=(s,) * n, padding=((p, p),) * n)
    got = layers.max_pool(xi, k, s, p, lowering)
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  g = rng.normal(size=got.shape).astype(np.float32)
  grad = jax.grad(lambda v: jnp.sum(layers.max_pool(v, k, s, p, lowering) * g))(jnp.asarray(x))
  tx = torch.tensor(np.moveaxis(x, -1, 1).copy(), requires_grad=True)
  pool = torch.nn.functional.max_pool2d if n == 2 else torch.nn.functional.max_pool3d
  pool(tx, k, s, p).backward(torch.tensor(np.moveaxis(g, -1, 1).copy()))
  np.testing.assert_allclose(np.asarray(grad), np.moveaxis(tx.grad.numpy(), 1, -1), atol=1e-6)
  gb = jax.grad(lambda v: jnp.sum(
      layers.max_pool(v, k, s, p, lowering).astype(jnp.float32) * g))(
      jnp.asarray(x, jnp.bfloat16))
  assert gb.dtype == jnp.bfloat16


@pytest.mark.parametrize("k,s,p,shape", [(3, 2, 1, (2, 13, 11, 5)), (2, 2, 0, (2, 8, 8, 4)),
                                         (3, 1, 1, (2, 9, 9, 3))])
def test_onednn_max_pool_gradient_with_ties_everywhere_equals_torch(k, s, p, shape):
  # Integers in [-2, 2]: most windows hold their maximum more than once, overlapping windows
  # (stride < kernel) share them; oneDNN sums into a pixel in another order (float rounding).
  x = np.random.default_rng(0).integers(-2, 3, size=shape).astype(np.float32)
  out = (shape[0], (shape[1] + 2 * p - k) // s + 1, (shape[2] + 2 * p - k) // s + 1, shape[3])
  g = np.random.default_rng(1).normal(size=out).astype(np.float32)
  tx = torch.tensor(np.moveaxis(x, -1, 1).copy(), requires_grad=True)
  torch.nn.functional.max_pool2d(tx, k, s, p).backward(torch.tensor(np.moveaxis(g, -1, 1).copy()))
  got = jax.grad(lambda v: jnp.sum(layers.max_pool(v, k, s, p, "onednn") * g))(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got), np.moveaxis(tx.grad.numpy(), 1, -1), atol=1e-5)
