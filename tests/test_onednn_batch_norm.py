"""BatchNorm's batch statistics on oneDNN (training, bfloat16) against float64 and Flax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bonejax import models
from bonejax.models import inference_graph, layers, onednn
from bonejax.models.onednn import batch_norm as obn

SHAPE = (4, 24, 20, 32)


def _pair(dtype=jnp.bfloat16, c=SHAPE[-1]):
  """(Flax's BatchNorm, the same module as OnednnBatchNorm), train mode, random scale / bias."""
  rng = np.random.default_rng(0)
  ref = layers.batch_norm(c, dtype=dtype, rngs=nnx.Rngs(0))
  ref.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
  ref.bias[...] = jnp.asarray(rng.normal(size=c), jnp.float32)
  ref.train()
  fast = nnx.clone(ref)
  fast.__class__ = obn.OnednnBatchNorm
  return ref, fast


def _run(module, x, r, call=lambda m, x: m(x)):
  """(y, grads of sum(y * r) in x, scale and bias, running mean and var after `call`)."""
  graphdef, state = nnx.split(module)

  def loss(state, x):
    m = nnx.merge(graphdef, state)
    y = call(m, x)
    return jnp.sum(y.astype(jnp.float32) * r), (y, nnx.state(m))

  (_, (y, after)), (g_state, gx) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
      state, x)
  return (np.asarray(y, np.float64), np.asarray(gx, np.float64),
          np.asarray(g_state["scale"][...], np.float64), np.asarray(g_state["bias"][...], np.float64),
          np.asarray(after["mean"][...]), np.asarray(after["var"][...]))


def _reference(x, scale, bias, r, eps=1e-5):
  """The same in float64, by the formulas (biased variance, gradient through the statistics)."""
  ax = (0, 1, 2)
  mu, var = x.mean(ax), x.var(ax)
  inv = 1 / np.sqrt(var + eps)
  xh = (x - mu) * inv
  dx = scale * inv * (r - r.mean(ax) - xh * (r * xh).mean(ax))
  return xh * scale + bias, dx, (r * xh).sum(ax), r.sum(ax), mu, var


def _rel(a, b):
  return float(np.abs(a - b).max() / np.abs(b).max())


def test_extension_has_the_batch_norm_handlers():
  assert onednn.available(), onednn.unavailable_reason()
  ok, impl = obn.supports(SHAPE, "bfloat16")
  assert ok and "ref" not in impl, impl


def test_bfloat16_forward_and_gradients_against_float64_and_flax():
  ref, fast = _pair()
  rng = np.random.default_rng(1)
  x = jnp.asarray(np.maximum(rng.normal(size=SHAPE), 0) * 3 + 0.5, jnp.bfloat16)  # ReLU-like
  r = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
  x64, r64 = np.asarray(x.astype(jnp.float32), np.float64), np.asarray(r, np.float64)
  want = _reference(x64, np.asarray(ref.scale[...], np.float64),
                    np.asarray(ref.bias[...], np.float64), r64)
  flax_out, onednn_out = _run(ref, x, r), _run(fast, x, r)
  for i, name in enumerate(("y", "dx", "dscale", "dbias")):
    err_flax, err_onednn = _rel(flax_out[i], want[i]), _rel(onednn_out[i], want[i])
    # bf16 outputs carry 2^-8 relative rounding; oneDNN no further from float64 than Flax.
    assert err_onednn < 1.5e-2 and err_onednn <= 1.5 * err_flax + 1e-3, (name, err_onednn,
                                                                          err_flax)
  # Running averages: momentum 0.9 (Flax's convention) of the float32 batch statistics.
  for i, stat in ((4, want[4]), (5, want[5])):
    start = 0.0 if i == 4 else 1.0
    np.testing.assert_allclose(onednn_out[i], 0.9 * start + 0.1 * stat, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(onednn_out[i], flax_out[i], rtol=1e-5, atol=1e-6)


def test_batch_norm_with_its_relu_as_one_primitive():
  ref, fast = _pair()
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=SHAPE) * 2 + 1, jnp.bfloat16)
  r = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
  flax_out = _run(ref, x, r, lambda m, x: jax.nn.relu(m(x)))
  y, gx, _, g_bias, mean, _ = _run(fast, x, r, lambda m, x: m.norm_relu(x))
  x64, r64 = np.asarray(x.astype(jnp.float32), np.float64), np.asarray(r, np.float64)
  scale, bias = np.asarray(ref.scale[...], np.float64), np.asarray(ref.bias[...], np.float64)
  mu, var = x64.mean((0, 1, 2)), x64.var((0, 1, 2))
  pre = (x64 - mu) / np.sqrt(var + 1e-5) * scale + bias
  want_y = np.maximum(pre, 0)
  masked = np.where(pre > 0, r64, 0.0)  # the ReLU's gradient, then BatchNorm's
  want_dx = _reference(x64, scale, bias, masked)[1]
  assert _rel(y, want_y) <= 1.5 * _rel(flax_out[0], want_y) + 1e-3
  assert _rel(gx, want_dx) <= 1.5 * _rel(flax_out[1], want_dx) + 1e-3
  np.testing.assert_allclose(g_bias, masked.sum((0, 1, 2)), rtol=2e-2,
                             atol=2e-2 * np.abs(masked.sum((0, 1, 2))).max())
  np.testing.assert_allclose(mean, flax_out[4], rtol=1e-5, atol=1e-6)
  ref.eval(), fast.eval()
  assert fast.norm_relu(x) is None  # running averages: the caller applies the two itself


@pytest.mark.parametrize("case", ["float32", "running_average", "mask"])
def test_what_onednn_does_not_take_runs_flax_exactly(case):
  ref, fast = _pair(jnp.float32 if case == "float32" else jnp.bfloat16)
  x = jnp.asarray(np.random.default_rng(2).normal(size=SHAPE), ref.dtype)
  kw = {}
  if case == "running_average":
    ref.eval(), fast.eval()
  if case == "mask":
    kw["mask"] = jnp.ones(SHAPE, bool)
  np.testing.assert_array_equal(np.asarray(fast(x, **kw), np.float32),
                                np.asarray(ref(x, **kw), np.float32))
  assert not fast._onednn_ok(x, case == "running_average", kw.get("mask"))


def test_training_lowering_swaps_the_class_and_keeps_the_state_tree():
  model = models.create("unet_resnet18", num_classes=3, in_channels=1, dtype=jnp.bfloat16,
                        rngs=nnx.Rngs(0))
  before = jax.tree.structure(nnx.state(model))
  lowered = inference_graph.lower_convs(model, policy="auto")
  kinds = {type(n) for _, n in nnx.iter_graph(lowered) if isinstance(n, nnx.BatchNorm)}
  assert kinds == {obn.OnednnBatchNorm}
  assert jax.tree.structure(nnx.state(lowered)) == before
  fresh = models.create("unet_resnet18", num_classes=3, in_channels=1, dtype=jnp.bfloat16,
                        rngs=nnx.Rngs(0))
  fresh = inference_graph.lower_convs(fresh, policy="xla")  # the reference path: no swap
  assert {type(n) for _, n in nnx.iter_graph(fresh)
          if isinstance(n, nnx.BatchNorm)} == {nnx.BatchNorm}


def test_without_the_extension_it_runs_flax(monkeypatch):
  def fail(*_, **__):
    raise onednn._build.BuildError("oneDNN (dnnl.hpp, libdnnl.so) not found")
  monkeypatch.setattr(onednn._build, "build", fail)
  onednn._reset_for_tests()
  try:
    ref, fast = _pair()
    x = jnp.asarray(np.random.default_rng(3).normal(size=SHAPE), jnp.bfloat16)
    assert obn.supports(SHAPE, "bfloat16")[0] is False
    np.testing.assert_array_equal(np.asarray(fast(x), np.float32), np.asarray(ref(x), np.float32))
  finally:
    monkeypatch.undo()
    onednn._reset_for_tests()
