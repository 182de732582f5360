"""onednn.bf16x3: a float32 convolution (a bf16 model's FP32_EDGES layers) as three bf16
products on oneDNN, against float64: forward to float32 accuracy (~1e-5), gradients to a bf16
cotangent's, and which layers of a model take it.

Needs the oneDNN extension (built in CI, as for tests/test_onednn.py: fails rather than skips).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bonejax import models
from bonejax.models import inference_graph, onednn
from bonejax.models.conv_lowering import ConvSpec
from bonejax.models.onednn import bf16x3

STEM = ConvSpec(2, 32, 32, 1, 8, (7, 7), (2, 2), (1, 1), ((3, 3), (3, 3)), 1, "float32")
HEAD = ConvSpec(2, 16, 16, 16, 3, (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 1, "float32")


def _conv64(x, k, spec: ConvSpec, bias):
  y = jax.lax.conv_general_dilated(
      np.asarray(x, np.float64), np.asarray(k, np.float64), spec.stride, spec.padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return np.asarray(y) + np.asarray(bias, np.float64)


def _data(spec: ConvSpec, x_dtype, seed=0):
  rng = np.random.default_rng(seed)
  # Intensities with 16-bit detail (a micro-CT scan's), which a bf16 input would lose.
  x = jnp.asarray(rng.integers(0, 65536, (spec.batch, spec.height, spec.width, spec.cin))
                  / 65535.0, jnp.float32).astype(x_dtype)
  k = jnp.asarray(rng.normal(size=spec.kernel + (spec.cin, spec.cout)) / 5, jnp.float32)
  b = jnp.asarray(rng.normal(size=(spec.cout,)), jnp.float32)
  return x, k, b


def test_split_keeps_sixteen_bits():
  a = jnp.asarray(np.random.default_rng(0).normal(size=10_000), jnp.float32)
  hi, lo = bf16x3.split(a)
  assert hi.dtype == lo.dtype == jnp.bfloat16
  err = np.abs(np.asarray(hi, np.float64) + np.asarray(lo, np.float64) - np.asarray(a, np.float64))
  assert (err <= 2.0 ** -16 * np.abs(np.asarray(a))).all()


@pytest.mark.parametrize("inference", [False, True])
def test_stem_float32_input_equals_float64_rounded_once(inference):
  assert onednn.available(), onednn.unavailable_reason()
  assert bf16x3.supports(STEM, exact_bf16_input=False, train=not inference)
  x, k, b = _data(STEM, jnp.float32)
  ref = _conv64(x, k, STEM, b)
  got = bf16x3.conv_bias(x, k, b, STEM, jnp.float32, inference=inference)
  assert got.dtype == jnp.float32
  # Written in bf16: the float64 result rounded once, off by at most one bf16 step where the
  # products' error (~1e-5 of the sum of their magnitudes) straddles a rounding boundary.
  scale = _conv64(np.abs(np.asarray(x)), np.abs(np.asarray(k)), STEM, np.abs(np.asarray(b)))
  assert (np.abs(np.asarray(got, np.float64) - ref) <= np.abs(ref) * 2.0 ** -8 + 1e-5 * scale).all()
  def rounded(y):
    return np.asarray(jnp.asarray(y, jnp.float32).astype(jnp.bfloat16), np.float64)

  same = (np.asarray(got, np.float64) == rounded(ref)).mean()
  # A bf16 input (its low half dropped) would round to other values far more often.
  coarse = _conv64(np.asarray(x.astype(jnp.bfloat16), np.float64), k, STEM, b)
  assert same > 0.97 and (rounded(coarse) == rounded(ref)).mean() < same - 0.2


@pytest.mark.parametrize("inference", [False, True])
def test_head_bf16_input_equals_float64_to_float32_accuracy(inference):
  assert bf16x3.supports(HEAD, exact_bf16_input=True, train=not inference)
  x, k, b = _data(HEAD, jnp.bfloat16)
  ref = _conv64(x, k, HEAD, b)
  got = bf16x3.conv_bias(x, k, b, HEAD, jnp.float32, inference=inference)
  assert got.dtype == jnp.float32 and got.shape == ref.shape
  assert np.abs(np.asarray(got, np.float64) - ref).max() <= 2e-5 * np.abs(ref).max()
  # bf16 weights alone would be ~100x further off.
  kb = np.asarray(k.astype(jnp.bfloat16), np.float64)
  assert np.abs(_conv64(x, kb, HEAD, b) - ref).max() > 30 * np.abs(np.asarray(got) - ref).max()


@pytest.mark.parametrize("spec,x_dtype", [(STEM, jnp.float32), (HEAD, jnp.bfloat16)])
def test_gradients_equal_float64_to_a_bf16_cotangent(spec, x_dtype):
  x, k, b = _data(spec, x_dtype, seed=1)
  ho, wo = spec.out_hw
  r = np.random.default_rng(2).normal(size=(spec.batch, ho, wo, spec.cout))

  def loss(k, b):
    y = bf16x3.conv_bias(x, k, b, spec, jnp.float32)
    return jnp.sum(y * jnp.asarray(r, jnp.float32))

  dk, db = jax.jit(jax.grad(loss, argnums=(0, 1)))(k, b)
  # float64: dL/dk = sum over pixels of x (x) r, dL/db = sum of r.
  _, vjp = jax.vjp(lambda kk: jax.lax.conv_general_dilated(
      np.asarray(x, np.float64), kk, spec.stride, spec.padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC")), np.asarray(k, np.float64))
  (dk_ref,) = vjp(r)
  rel = np.linalg.norm(np.asarray(dk, np.float64) - dk_ref) / np.linalg.norm(dk_ref)
  assert rel < 4e-3  # the cotangent rounded to bf16 (2^-9 per element), summed in float32
  db_err = np.abs(np.asarray(db, np.float64) - r.sum((0, 1, 2)))
  assert (db_err <= 2.0 ** -9 * np.abs(r).sum((0, 1, 2))).all()


def _fast_convs(model):
  return {path: node.bf16x3 for path, node in nnx.iter_graph(model)
          if isinstance(node, inference_graph.FastConv)}


def test_a_bf16_models_float32_layers_take_it_and_a_float32_model_none():
  def make(dtype):
    return models.fill_from_numpy(models.abstract_model(
        models.create, "unet_resnet18", num_classes=3, in_channels=1, dtype=dtype))

  marked = _fast_convs(inference_graph.lower_convs(make(jnp.bfloat16), policy="onednn"))
  assert sorted(p[-2] if p[-1] == "conv" else p[-1] for p, m in marked.items() if m) == \
      ["head", "stem"]
  assert not any(_fast_convs(inference_graph.lower_convs(make(jnp.float32),
                                                         policy="onednn")).values())
  graph = inference_graph.build_inference_model(make(jnp.float32), policy="onednn",
                                                dtype=jnp.bfloat16)
  assert sum(_fast_convs(graph).values()) == 2


def test_switched_off_the_model_computes_its_edges_in_float32(monkeypatch):
  model = models.fill_from_numpy(models.abstract_model(
      models.create, "unet_resnet18", num_classes=3, in_channels=1))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 64, 64, 1)), jnp.float32)

  def logits():
    graph = inference_graph.build_inference_model(model, policy="onednn", dtype=jnp.bfloat16)
    graphdef, state = nnx.split(graph)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))

  on = logits()
  monkeypatch.setattr(bf16x3, "ENABLED", False)
  off = logits()
  assert on.dtype == off.dtype == np.float32
  assert not np.array_equal(on, off)  # a different computation ...
  assert np.abs(on - off).max() < 0.02 * np.ptp(off)  # ... of the same logits, to bf16's size
  assert (on.argmax(-1) == off.argmax(-1)).mean() > 0.99
