"""The inference graph (bonejax/models/inference_graph.py) against the unfolded eval-mode model.

Every zoo model, tiny inputs, numpy-filled weights with randomised BatchNorm statistics (so that
folding really changes the weights), jitted on both sides. Lowerings are forced with the
deterministic policies ("xla", "dots"); "measure" is exercised on one small layer.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bonejax import models
from bonejax.models import conv_lowering, inference_graph
from bonejax.models.conv_lowering import ConvSpec, Planner

ZOO = {
    "unet": dict(depth=3, width=8),
    "unet_resnet18": {},
    "unet_resnet34": {},
    "unet_resnet50": {},
    "unetpp_resnet18": {},
    "unetpp_resnet34": {},
    "deeplabv3plus_resnet18": {},
    "deeplabv3plus_resnet34": {},
    "segformer_b0": {},
}
SAME_LAYERS_AS = {"unetpp_resnet34": "unetpp_resnet18",
                  "deeplabv3plus_resnet34": "deeplabv3plus_resnet18"}
X = np.random.default_rng(0).normal(size=(2, 64, 64, 1)).astype(np.float32)


def _model(name: str, dtype=jnp.float32) -> nnx.Module:
  model = models.fill_from_numpy(models.abstract_model(
      models.create, name, num_classes=3, dtype=dtype, **ZOO[name]))
  rng = np.random.default_rng(1)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.BatchNorm):  # statistics far from (0, 1): folding must matter
      c = node.mean.shape[0]
      node.mean[...] = jnp.asarray(rng.normal(0, 0.5, c), jnp.float32)
      node.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)
      node.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
      node.bias[...] = jnp.asarray(rng.normal(0, 0.2, c), jnp.float32)
  return model


def _forward(model: nnx.Module, eval_mode: bool = True) -> np.ndarray:
  if eval_mode:
    model = nnx.view(model, use_running_average=True, deterministic=True,
                     raise_if_not_found=False)
  graphdef, state = nnx.split(model)
  return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(X)))


def _softmax(z):
  return np.asarray(jax.nn.softmax(jnp.asarray(z), -1))


@pytest.mark.parametrize("name", list(ZOO))
def test_folded_graph_matches_the_model(name):
  model = _model(name)
  ref = _forward(model)
  folded = inference_graph.build_inference_model(model, policy="dots")
  n_bn = sum(isinstance(n, nnx.BatchNorm) for _, n in nnx.iter_graph(model))
  left = sum(isinstance(n, nnx.BatchNorm) for _, n in nnx.iter_graph(folded))
  assert n_bn > 0 and left == 0  # every BatchNorm of the zoo follows a conv and is folded
  out = _forward(folded, eval_mode=False)
  assert any(c["choice"] == "rows" for c in folded.planner.choices.values())  # (at trace time)
  # float32: folding only reorders rounding. Relative to the largest logit (these random
  # weights give logits of +-30 to +-90); the same unfolded model jitted vs eager differs by
  # ~3e-6 on this measure (and by 1.5e-5 in probability: see the next test for 1e-5 there).
  assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5
  assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.999

  if name in SAME_LAYERS_AS:
    return  # bf16 adds nothing over the resnet18 variant of the same architecture (time)
  # bfloat16: at least as close to float32 as the model's own bfloat16 forward (folding in
  # float32 and one rounding per layer make it ~2x closer), and > 99 % argmax agreement.
  own = _forward(_model(name, jnp.bfloat16))
  low = _forward(inference_graph.build_inference_model(model, policy="dots",
                                                        dtype=jnp.bfloat16), eval_mode=False)
  assert low.dtype == np.float32 and np.isfinite(low).all()
  p_ref = _softmax(ref)
  err = lambda z: np.linalg.norm(_softmax(z) - p_ref) / np.linalg.norm(p_ref)  # noqa: E731
  agree = lambda z: (z.argmax(-1) == ref.argmax(-1)).mean()  # noqa: E731
  assert err(low) <= 1.1 * err(own) + 1e-3
  # > 99 %, or no worse than the model's own bf16 (unet_resnet50 with these random statistics:
  # 98 %; the bounds of the next test hold for realistic statistics).
  assert agree(low) >= min(0.99, agree(own))


@pytest.mark.parametrize("name", ["unet", "unet_resnet18", "deeplabv3plus_resnet18",
                                  "segformer_b0"])
def test_bf16_graph_within_the_bf16_bounds(name):
  """tests/test_models.py's bounds for bf16 vs float32 (plain BatchNorm statistics there)."""
  model = models.fill_from_numpy(models.abstract_model(models.create, name, num_classes=3,
                                                       **ZOO[name]))
  ref = _forward(model)
  low = _forward(inference_graph.build_inference_model(model, policy="dots",
                                                        dtype=jnp.bfloat16), eval_mode=False)
  p_ref, p_low = _softmax(ref), _softmax(low)
  assert np.linalg.norm(p_low - p_ref) / np.linalg.norm(p_ref) < 1e-2
  assert (low.argmax(-1) == ref.argmax(-1)).mean() > 0.99


def test_probabilities_within_1e5_at_trained_logit_scale():
  """With logits of a trained network's size (|z| < ~8), float32 probabilities agree to 1e-5."""
  model = _model("unet_resnet18")
  model.head.kernel[...] = model.head.kernel[...] * 0.25
  ref = _forward(model)
  for policy in ("xla", "dots"):
    out = _forward(inference_graph.build_inference_model(model, policy=policy), eval_mode=False)
    assert np.abs(_softmax(out) - _softmax(ref)).max() < 1e-5, policy


def test_model_is_left_unchanged_and_edges_stay_float32():
  model = _model("unet_resnet18")
  before = jax.tree.map(np.array, nnx.state(model))
  fast = inference_graph.build_inference_model(model, policy="xla", dtype=jnp.bfloat16)
  jax.tree.map(np.testing.assert_array_equal, before, nnx.state(model))
  assert isinstance(model.encoder.stem.bn, nnx.BatchNorm)
  assert fast.encoder.stem.conv.dtype == jnp.float32  # the raw scan in
  assert fast.encoder.stem.conv.out_dtype == jnp.bfloat16  # cast where BatchNorm cast
  assert fast.head.dtype == jnp.float32  # the logits out
  assert fast.blocks[0].conv1.conv.kernel[...].dtype == jnp.bfloat16  # stored pre-cast


def test_lower_convs_keeps_the_state_tree_and_the_training_forward():
  model = _model("unet", jnp.float32)
  ref = _forward(model, eval_mode=False)  # train mode: batch statistics
  lowered = inference_graph.lower_convs(nnx.clone(model), policy="dots")
  assert jax.tree.structure(nnx.state(lowered)) == jax.tree.structure(nnx.state(model))
  np.testing.assert_allclose(_forward(lowered, eval_mode=False), ref, rtol=1e-4, atol=1e-4)


def _lax_conv(x, k, spec):
  return jax.lax.conv_general_dilated(x, k, spec.stride, spec.padding,
                                      rhs_dilation=spec.dilation,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=spec.groups,
                                      precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("geom", [
    dict(kernel=(3, 3), stride=(1, 1), dilation=(1, 1), padding=((1, 1), (1, 1))),
    dict(kernel=(3, 3), stride=(2, 2), dilation=(1, 1), padding=((1, 1), (1, 1))),
    dict(kernel=(3, 3), stride=(1, 1), dilation=(2, 2), padding=((2, 2), (2, 2))),
    dict(kernel=(7, 7), stride=(2, 2), dilation=(1, 1), padding=((3, 3), (3, 3))),
    dict(kernel=(1, 1), stride=(2, 2), dilation=(1, 1), padding=((0, 0), (0, 0))),
    dict(kernel=(2, 3), stride=(1, 2), dilation=(1, 1), padding=((0, 1), (1, 0))),
    dict(kernel=(5, 5), stride=(1, 1), dilation=(1, 1), padding=((2, 2), (2, 2))),
])
def test_rows_lowering_equals_the_convolution(geom):
  spec = ConvSpec(batch=2, height=12, width=10, cin=5, cout=4, groups=1, dtype="float32",
                  **geom)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 12, 10, 5)), jnp.float32)
  k = jnp.asarray(rng.normal(size=geom["kernel"] + (5, 4)), jnp.float32)
  want = _lax_conv(x, k, spec)
  assert want.shape[1:3] == spec.out_hw
  hows = conv_lowering.candidates(spec)
  if geom["stride"] == (1, 1):
    assert "taps" in hows and ("blocks" in hows) == (geom["dilation"] == (1, 1))
  for how in hows:
    got = conv_lowering.apply(how, x, k, spec)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)


def test_dot_conv_transpose_equals_nnx():
  up = nnx.ConvTranspose(6, 3, (2, 2), strides=(2, 2), padding="VALID", rngs=nnx.Rngs(0))
  up.bias[...] = jnp.arange(3, dtype=jnp.float32)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 4, 6)), jnp.float32)
  assert inference_graph.DotConvTranspose.applies(up)
  dot = inference_graph.DotConvTranspose(up, dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(dot(x)), np.asarray(up(x)), rtol=1e-5, atol=1e-5)


def test_planner_policies(tmp_path, monkeypatch):
  # The choices among XLA and the dot lowerings (oneDNN's: tests/test_onednn.py).
  monkeypatch.setattr(Planner, "_onednn", lambda self, spec, out: (False, "off in this test"))
  big = ConvSpec(4, 16, 16, 512, 512, (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 1, "bfloat16")
  depthwise = ConvSpec(1, 8, 8, 8, 8, (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 8, "bfloat16")
  assert Planner("xla", cache=False).choose(big) == "xla"
  assert Planner("dots", cache=False).choose(big) == "rows"
  assert Planner("dots", cache=False).choose(depthwise) == "xla"  # nothing else applies
  assert Planner("dots", cache=False, backend="gpu").choose(big) == "xla"  # GPUs keep cuDNN
  monkeypatch.setattr(conv_lowering, "native_bf16_dots", lambda: True)
  assert Planner("auto", cache=False).choose(big) == "taps"
  assert Planner("auto", cache=False).choose(
      ConvSpec(4, 256, 256, 16, 16, (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 1,
               "bfloat16")) == "xla"
  f32 = ConvSpec(4, 16, 16, 512, 512, (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 1, "float32")
  assert Planner("auto", cache=False).choose(f32) == "xla"
  with pytest.raises(ValueError, match="policy"):
    Planner("fast")


def test_measured_choices_are_cached_per_machine(tmp_path, monkeypatch):
  monkeypatch.setenv("BONEJAX_CACHE_DIR", str(tmp_path))
  monkeypatch.setattr(Planner, "_onednn", lambda self, spec, out: (False, "off in this test"))
  spec = ConvSpec(1, 8, 8, 4, 4, (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 1, "float32")
  planner = Planner("measure", repeats=1)
  choice = planner.choose(spec)
  assert choice in conv_lowering.candidates(spec)
  data = json.loads(conv_lowering.cache_path().read_text())
  entry = data[conv_lowering.machine_key()][spec.key()]
  assert entry["choice"] == choice
  assert set(entry["seconds"]) == set(conv_lowering.candidates(spec)) == {"xla", "rows", "taps",
                                                                         "blocks"}
  # A second planner reads the file instead of measuring again.
  monkeypatch.setattr(conv_lowering, "time_lowerings",
                      lambda *a, **k: pytest.fail("measured twice"))
  assert Planner("measure").choose(spec) == choice


def test_measurement_inside_jit_picks_a_lowering_per_shape(tmp_path, monkeypatch):
  monkeypatch.setenv("BONEJAX_CACHE_DIR", str(tmp_path))
  model = _model("unet")
  fast = inference_graph.build_inference_model(model, policy="measure")
  graphdef, state = nnx.split(fast)
  fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  out = fn(state, jnp.asarray(X))  # the planner measures each new layer shape while tracing
  assert np.isfinite(np.asarray(out)).all()
  measured = [c for c in fast.planner.choices.values() if "seconds" in c]
  assert measured and all(c["choice"] == min(c["seconds"], key=c["seconds"].get)
                          for c in measured)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rows_lowering_gradients(dtype):
  """Training through the dot lowering: float32 gradients equal the convolution's; bf16 ones
  (bf16 cotangents, float32 accumulation: `conv_lowering._dot_bf16`) stay close to them."""
  spec = ConvSpec(batch=2, height=8, width=8, cin=16, cout=8, kernel=(3, 3), stride=(2, 2),
                  dilation=(1, 1), padding=((1, 1), (1, 1)), groups=1, dtype=dtype)
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 16, 8)) * 0.1, jnp.float32)
  t = jnp.asarray(rng.normal(size=(2, 4, 4, 8)), jnp.float32)

  def loss(fn):
    return lambda x, k: jnp.sum(jnp.square(fn(x.astype(dtype), k.astype(dtype)) - t))

  want = jax.grad(loss(lambda x, k: _lax_conv(x.astype(jnp.float32), k.astype(jnp.float32),
                                              spec)), argnums=(0, 1))(x, k)
  got = jax.jit(jax.grad(loss(lambda x, k: conv_lowering.conv_rows(x, k, spec)),
                         argnums=(0, 1)))(x, k)
  for g, w in zip(got, want):
    assert g.dtype == jnp.float32
    rel = float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w))
    assert rel < (1e-5 if dtype == "float32" else 2e-2), rel
  if dtype == "bfloat16":  # the backward runs bf16 dots, not float32 ones
    text = jax.jit(jax.grad(loss(lambda x, k: conv_lowering.conv_rows(x, k, spec)),
                            argnums=(0, 1))).lower(x, k).as_text()
    operands = [l.split(" : (")[1].split(") ->")[0] for l in text.splitlines()
                if "dot_general" in l]
    assert len(operands) == 9 and all("f32" not in o for o in operands)


def test_make_folder_folds_current_weights_under_jit():
  """The trainer's validation path: fold the train state's params inside jit, then evaluate."""
  model = _model("unet")
  graphdef, fold = inference_graph.make_folder(model, policy="dots")
  _, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.tree.map(lambda p: p * 1.5, params)  # weights moved on since the folder was made
  model_now = nnx.merge(nnx.split(model, nnx.Param, ...)[0], params, rest)
  ref = _forward(model_now)
  out = jax.jit(lambda p, r, x: nnx.merge(graphdef, fold(p, r))(x))(params, rest, jnp.asarray(X))
  out = np.asarray(out)
  assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5


def test_off_the_cpu_the_graph_keeps_every_convolution():
  """A GPU planner: the same conv_general_dilated equations as the model (cuDNN keeps them);
  only BatchNorm is gone."""
  model = _model("unet")
  fast = inference_graph.build_inference_model(
      model, planner=Planner("measure", backend="gpu", cache=False), dtype=jnp.bfloat16)
  assert not any(isinstance(n, inference_graph.DotConvTranspose)
                 for _, n in nnx.iter_graph(fast))
  x = jnp.asarray(X)

  def convs(m):
    jaxpr = jax.make_jaxpr(lambda x: m(x))(x)
    return sorted(str(e.params["window_strides"]) + str(e.invars[1].aval.shape)
                  for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated")

  ref = nnx.view(model, use_running_average=True, deterministic=True, raise_if_not_found=False)
  assert convs(fast) == convs(ref)
  assert {c["choice"] for c in fast.planner.choices.values()} == {"xla"}
