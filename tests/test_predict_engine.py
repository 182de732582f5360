"""The plane engine's compute dtype and device budget; the host memory plan of a run."""

import logging
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bonejax import models, predict
from bonejax.io import intensity
from bonejax.predict import memory


class TinyNet(nnx.Module):
  """Two 3x3 convs with BatchNorm (receptive field radius 2)."""

  def __init__(self, cin: int = 1, k: int = 3, *, rngs: nnx.Rngs):
    self.c1 = nnx.Conv(cin, 6, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(6, rngs=rngs)
    self.c2 = nnx.Conv(6, k, (3, 3), rngs=rngs)

  def __call__(self, x):
    return self.c2(jnp.tanh(self.bn(self.c1(x) * 3.0)))


@pytest.fixture(scope="module")
def tiny():
  m = TinyNet(rngs=nnx.Rngs(0))
  m.eval()
  return m


def _unet(dtype):
  abstract = nnx.eval_shape(lambda: models.create("unet", num_classes=3, in_channels=1,
                                                  rngs=nnx.Rngs(0), depth=2, width=4,
                                                  dtype=dtype))
  return models.fill_from_numpy(abstract, 0)


def _dtypes(graph_owner):
  """{module path: dtype} of every module with a dtype in the engine's graph."""
  model = nnx.merge(graph_owner.graphdef, graph_owner.state)
  return {"/".join(map(str, path)): m.dtype for path, m in nnx.iter_modules(model)
          if getattr(m, "dtype", None) is not None}


# ---------------------------------------------------------------------------------------------
# Compute dtype.
# ---------------------------------------------------------------------------------------------


def test_engine_dtype_keeps_the_models_float32_stem_and_head():
  built = _unet(jnp.bfloat16)
  own = _dtypes(predict.PlaneEngine(built))
  pinned = {p for p, d in own.items() if jnp.dtype(d) == jnp.float32}
  # The zoo keeps the first conv and the head in float32 (models.layers FP32_EDGES).
  assert "head" in pinned and any(p.startswith("down/0/conv1/conv") for p in pinned)
  switched = _dtypes(predict.PlaneEngine(built, dtype="float16"))
  for path, dt in switched.items():
    want = jnp.float32 if path in pinned else jnp.float16
    assert jnp.dtype(dt) == jnp.dtype(want), path
  # ... which is how the model built in float16 looks.
  assert {p: jnp.dtype(d) for p, d in switched.items()} == {
      p: jnp.dtype(d) for p, d in _dtypes(predict.PlaneEngine(_unet(jnp.float16))).items()}


# ---------------------------------------------------------------------------------------------
# Device budget.
# ---------------------------------------------------------------------------------------------


def test_peak_bytes_counts_live_values_by_hand():
  def f(x):
    y = x * 2.0        # x, y live: 8000 B
    z = y + 1.0        # x, y, z: 12000 B (y dies here)
    return z.sum()     # x, z, the scalar
  jaxpr = jax.make_jaxpr(f)(jax.ShapeDtypeStruct((1000,), jnp.float32))
  assert memory.peak_bytes(jaxpr) == 12000
  # Inside a jit the call's own peak counts on top of its caller's live values.
  jaxpr = jax.make_jaxpr(lambda a, b: jax.jit(f)(a) + b.sum())(
      jax.ShapeDtypeStruct((1000,), jnp.float32), jax.ShapeDtypeStruct((500,), jnp.float32))
  assert memory.peak_bytes(jaxpr) == 12000 + 2000


def test_device_budget_holds_without_memory_analysis(tiny, monkeypatch, caplog):
  x = np.random.default_rng(1).integers(0, 4000, (3, 100, 130)).astype(np.uint16)
  stats = {"p0_5": 100.0, "p99_9": 3900.0}
  whole = predict.PlaneEngine(tiny, batch_size=4)
  whole.set_normalization(stats, "percentile")
  ref = whole.infer(x)
  xla = whole.plan((100, 130), np.uint16).device_bytes
  # A backend without memory analysis (some plugins return None or raise).
  monkeypatch.setattr(jax.stages.Compiled, "memory_analysis", lambda self: None)
  engine_module = sys.modules[predict.PlaneEngine.__module__]
  monkeypatch.setattr(engine_module, "_WARNED_ESTIMATE", False, raising=False)
  estimate = predict.PlaneEngine(tiny, batch_size=4).plan((100, 130), np.uint16).device_bytes
  assert 0.5 * xla <= estimate <= 4 * xla  # close to what XLA allocates
  budget = estimate // 3
  with caplog.at_level(logging.WARNING):
    fitted = predict.PlaneEngine(tiny, batch_size=4, device_budget_bytes=budget)
    fitted.set_normalization(stats, "percentile")
    plan = fitted.plan((100, 130), np.uint16)
    fitted.plan((60, 70), np.uint16)
  # The budget still shrinks the batch (or tiles the plane) ...
  assert 0 < plan.device_bytes <= budget and (plan.batch < 4 or plan.tile is not None)
  np.testing.assert_allclose(fitted.infer(x), ref, atol=1e-6)
  # ... and says once that it works from an estimate.
  warned = [r for r in caplog.records if "memory analysis" in r.getMessage()]
  assert len(warned) == 1


# ---------------------------------------------------------------------------------------------
# Host memory.
# ---------------------------------------------------------------------------------------------


def test_resident_bytes_counts_the_probabilities_handed_back():
  shape, sets = (10, 20, 30), predict.plane_sets(3)
  base = predict.resident_bytes(shape, 1, 2, 3, sets, "soft")
  assert predict.resident_bytes(shape, 1, 2, 3, sets, "soft", keep_probs=True) == \
      base + math.prod(shape) * 3 * 4


def test_return_probs_goes_out_of_core_when_they_do_not_fit(tiny, tmp_path):
  vol = np.random.default_rng(2).integers(0, 4000, (12, 40, 36)).astype(np.uint16)
  stats = intensity.compute_stats(vol)
  sets = predict.plane_sets(3)
  without = predict.resident_bytes(vol.shape, 1, 2, 3, sets, "soft")
  with_probs = without + math.prod(vol.shape) * 3 * 4
  # A budget whose in-memory limit lies between the two.
  budget = (without + with_probs) / 2 / (predict.resident_limit(1 << 30) / 2**30)
  labels, probs, info = predict.predict_volume(
      tiny, vol, stats=stats, planes=3, return_probs=True, return_info=True,
      memory_budget_gb=budget / 2**30, device_memory_gb=1.0, scratch_dir=tmp_path)
  assert info["mode"] == "out_of_core"
  ref_labels, ref_probs = predict.predict_volume(tiny, vol, stats=stats, planes=3,
                                                 return_probs=True, device_memory_gb=1.0)
  assert (labels == ref_labels).all()
  np.testing.assert_allclose(probs, ref_probs, atol=1e-6)
