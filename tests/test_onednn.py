"""oneDNN convolutions (bonejax/models/onednn) against XLA's: every shape kind of the zoo, every
zoo model's folded graph, a training step's gradients, and the fallback without the extension.

The extension is built on first use (a C++ compiler and libdnnl-dev are needed, as in CI); on a
machine without them these tests check the fallback only and say so (the fast-path tests fail
rather than skip: CI must run the fast path).
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import model_helpers  # tests/ is on sys.path (conftest)
from bonejax import models
from bonejax.models import conv_lowering, inference_graph, onednn
from bonejax.models.conv_lowering import ConvSpec, Planner


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _spec(b, h, w, cin, cout, k, s=1, d=1, p=None, g=1, dtype="float32") -> ConvSpec:
  if p is None:  # "same" padding at stride 1, the zoo's usual
    p = ((d * (k - 1)) // 2, d * (k - 1) - (d * (k - 1)) // 2)
  p = (p, p) if isinstance(p[0], int) else p
  return ConvSpec(b, h, w, cin, cout, (k, k), (s, s), (d, d), p, g, dtype)


# Every kind of convolution the zoo calls (tests/test_onednn.py::test_zoo_shapes_are_covered
# checks that list against the models): the ResNet 7x7 stride-2 stem, 3x3 stride 1 and 2, 1x1
# projections (stride 1 and 2), DeepLabV3+'s ASPP dilations and its depthwise (grouped) halves of
# separable convolutions (dilations 12-36 on an 8-px map), SegFormer's overlapping patch embeddings
# (7x7 s4) and attention reductions (kxk stride k), odd sides.
SHAPES = {
    "stem7x7s2": _spec(2, 32, 32, 1, 8, 7, s=2, p=(3, 3)),
    "3x3": _spec(2, 16, 16, 8, 16, 3),
    "3x3s2": _spec(2, 16, 16, 8, 16, 3, s=2, p=(1, 1)),
    "3x3s2_odd": _spec(2, 15, 17, 8, 16, 3, s=2, p=((0, 1), (1, 1))),
    "1x1": _spec(2, 8, 8, 16, 8, 1),
    "1x1s2": _spec(2, 8, 8, 16, 8, 1, s=2, p=(0, 0)),
    "dil2": _spec(2, 16, 16, 8, 8, 3, d=2),
    "dil12": _spec(1, 16, 16, 8, 8, 3, d=12),
    "dil18_bigger_than_map": _spec(1, 8, 8, 8, 8, 3, d=18),
    "depthwise": _spec(2, 16, 16, 8, 8, 3, g=8),
    "depthwise_dil": _spec(2, 16, 16, 8, 8, 3, d=6, g=8),
    "groups2": _spec(2, 8, 8, 8, 16, 3, g=2),
    "patch7x7s4": _spec(1, 32, 32, 3, 8, 7, s=4, p=(3, 3)),
    "reduce8x8s8": _spec(1, 16, 16, 8, 8, 8, s=8, p=(0, 0)),
    "reduce4x4s4": _spec(1, 16, 16, 8, 8, 4, s=4, p=(0, 0)),
    "reduce2x2s2": _spec(1, 16, 16, 8, 8, 2, s=2, p=(0, 0)),
    "aspp_depthwise_dil36": _spec(1, 8, 8, 8, 8, 3, d=36, g=8),
}


def _data(spec: ConvSpec, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((spec.batch, spec.height, spec.width, spec.cin)).astype(np.float32)
  k = rng.standard_normal(spec.kernel + (spec.cin // spec.groups, spec.cout)).astype(np.float32)
  b = rng.standard_normal(spec.cout).astype(np.float32)
  return jnp.asarray(x, spec.dtype), jnp.asarray(k * 0.2, spec.dtype), jnp.asarray(b)


def test_extension_is_built_here():
  """CI installs libdnnl-dev and g++: the fast path must be there (no silent fallback)."""
  assert onednn.available(), onednn.unavailable_reason()


@pytest.mark.parametrize("name", list(SHAPES))
def test_forward_and_gradients_equal_xla_float32(name):
  spec = SHAPES[name]
  x, k, b = _data(spec)
  ok, impl = onednn.supports(spec, "float32", train=True)
  assert ok and "ref" not in impl, impl

  def xla(x, k, b):
    return conv_lowering.conv_xla(x, k, spec) + b

  def one(x, k, b):
    return onednn.conv(x, k, b, spec, out_dtype=jnp.float32)

  ref, out = jax.jit(xla)(x, k, b), jax.jit(one)(x, k, b)
  assert out.shape == ref.shape and _rel(out, ref) < 1e-5

  def loss(fn):  # a cotangent that is not uniform, so every weight tap matters
    return lambda x, k, b: jnp.sum(jnp.sin(fn(x, k, b)) * jnp.arange(ref.size).reshape(
        ref.shape) / ref.size)

  g_ref = jax.jit(jax.grad(loss(xla), (0, 1, 2)))(x, k, b)
  g_out = jax.jit(jax.grad(loss(one), (0, 1, 2)))(x, k, b)
  for r, o, what in zip(g_ref, g_out, ("dx", "dkernel", "dbias")):
    assert _rel(o, r) < 1e-4, (what, _rel(o, r))


@pytest.mark.parametrize("name", ["3x3", "3x3s2_odd", "1x1", "dil2", "depthwise", "stem7x7s2"])
def test_bfloat16_forward_and_gradients(name):
  """bf16 operands, float32 accumulation: within bf16 rounding of the float32 result."""
  spec32 = SHAPES[name]
  spec = ConvSpec(**{**spec32.__dict__, "dtype": "bfloat16"})
  x, k, b = _data(spec32)
  xb, kb = x.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
  assert onednn.supports(spec, "bfloat16", train=True)[0]
  ref = conv_lowering.conv_xla(xb.astype(jnp.float32), kb.astype(jnp.float32), spec32) + b
  for out_dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 8e-3)):
    out = jax.jit(lambda x, k, b, o=out_dtype: onednn.conv(x, k, b, spec, out_dtype=o))(xb, kb, b)
    assert out.dtype == out_dtype and _rel(out, ref) < tol, (out_dtype, _rel(out, ref))
  loss = lambda fn: lambda x, k: jnp.sum(jnp.sin(fn(x, k).astype(jnp.float32)))  # noqa: E731
  g_ref = jax.grad(loss(lambda x, k: conv_lowering.conv_xla(x, k, spec32)), (0, 1))(
      xb.astype(jnp.float32), kb.astype(jnp.float32))
  g_out = jax.grad(loss(lambda x, k: onednn.conv(x, k, None, spec, out_dtype=jnp.float32)),
                   (0, 1))(xb, kb)
  assert g_out[0].dtype == jnp.bfloat16 and g_out[1].dtype == jnp.bfloat16
  for r, o in zip(g_ref, g_out):  # the cotangent is rounded to bf16 (as torch's autocast)
    assert _rel(o, r) < 2e-2


@pytest.mark.parametrize("name", ["3x3", "3x3s2_odd", "depthwise", "stem7x7s2"])
def test_bfloat16_layer_takes_its_float32_master_kernel(name):
  """A bf16 convolution handed the float32 kernel (training's master weights): oneDNN's reorder
  rounds it as XLA's cast would (the same output, bit for bit), and the kernel's gradient comes
  back in float32, the unrounded backward-weights result."""
  spec32 = SHAPES[name]
  spec = ConvSpec(**{**spec32.__dict__, "dtype": "bfloat16"})
  x, k, b = _data(spec32)
  xb = x.astype(jnp.bfloat16)
  k = k + 1e-3 * jnp.sin(jnp.arange(k.size).reshape(k.shape))  # not exact in bf16
  conv = jax.jit(lambda x, k: onednn.conv(x, k, b, spec, out_dtype=jnp.float32))
  assert np.array_equal(conv(xb, k), conv(xb, k.astype(jnp.bfloat16)))
  def loss(k):
    return jnp.sum(jnp.sin(onednn.conv(xb, k, None, spec, out_dtype=jnp.float32)))

  g32 = jax.jit(jax.grad(loss))(k)
  g16 = jax.jit(jax.grad(loss))(k.astype(jnp.bfloat16))
  assert g32.dtype == jnp.float32 and g16.dtype == jnp.bfloat16
  assert not np.array_equal(g32, g32.astype(jnp.bfloat16).astype(jnp.float32))  # unrounded
  assert np.array_equal(g32.astype(jnp.bfloat16), g16)  # the same sums, rounded once
  # dx through the float32 kernel equals dx through its bf16 cast.
  gx = [jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.sin(onednn.conv(
      x, k, None, spec, out_dtype=jnp.float32)))))(xb, kk) for kk in (k, k.astype(jnp.bfloat16))]
  assert np.array_equal(gx[0], gx[1])


def test_relu_and_residual_post_ops():
  spec = SHAPES["3x3"]
  x, k, b = _data(spec)
  res = jnp.asarray(np.random.default_rng(3).standard_normal((2, 16, 16, 16)), jnp.float32)

  def ref(x, k, b, r):
    return jax.nn.relu(conv_lowering.conv_xla(x, k, spec) + b + r)

  def fused(x, k, b, r):
    return onednn.conv(x, k, b, spec, out_dtype=jnp.float32, relu=True, residual=r)

  out = jax.jit(fused)(x, k, b, res)
  assert _rel(out, ref(x, k, b, res)) < 1e-5 and float(out.min()) == 0.0
  loss = lambda fn: lambda *a: jnp.sum(jnp.cos(fn(*a)))  # noqa: E731
  for r, o in zip(jax.grad(loss(ref), (0, 1, 2, 3))(x, k, b, res),
                  jax.jit(jax.grad(loss(fused), (0, 1, 2, 3)))(x, k, b, res)):
    assert _rel(o, r) < 1e-4
  # Without aliasing (the residual still needed afterwards) the residual is left unchanged.
  both = jax.jit(lambda x, k, b, r: (fused(x, k, b, r), r * 1))(x, k, b, res)
  np.testing.assert_array_equal(both[1], res)


# ---------------------------------------------------------------------------------------------
# The zoo.
# ---------------------------------------------------------------------------------------------

ZOO = {
    "unet": dict(depth=3, width=8),
    "unet_resnet18": {}, "unet_resnet34": {}, "unet_resnet50": {},
    "unetpp_resnet18": {}, "deeplabv3plus_resnet18": {},
    "segformer_b0": {}, "unet_mit_b0": {},
}
X = np.random.default_rng(0).normal(size=(2, 32, 32, 1)).astype(np.float32)


def _model(name: str, dtype=jnp.float32) -> nnx.Module:
  model = models.fill_from_numpy(models.abstract_model(
      models.create, name, num_classes=3, dtype=dtype, **ZOO[name]))
  return model_helpers.randomise_batch_norm(model, ("mean", "var"))  # folding must matter


def _run(model: nnx.Module) -> np.ndarray:
  graphdef, state = nnx.split(model)
  return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(X)),
                    np.float32)


def _choices(graph) -> list[str]:
  return [c["choice"] for c in graph.planner.choices.values()]


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_folded_graph_on_onednn_equals_xla(name):
  # Plain BatchNorm statistics (folding itself is tests/test_inference_graph.py's; randomised
  # statistics put even XLA's own bf16 graph below 99 % argmax agreement on unet_resnet50).
  model = models.fill_from_numpy(models.abstract_model(models.create, name, num_classes=3,
                                                       **ZOO[name]))
  ref = _run(inference_graph.build_inference_model(model, policy="xla"))
  graph = inference_graph.build_inference_model(model, policy="onednn")
  out = _run(graph)
  choices = _choices(graph)
  assert choices.count("onednn") == len(choices), graph.planner.choices  # every layer taken
  assert _rel(out, ref) < 1e-5

  # bf16: the graph's inner layers in bf16 on oneDNN, against the float32 result.
  graph = inference_graph.build_inference_model(model, policy="onednn", dtype=jnp.bfloat16)
  low = _run(graph)
  assert _choices(graph).count("onednn") == len(_choices(graph))
  # Argmax agreement where the float32 top two logits are not a near-tie (within 1 % of the
  # logit range: bf16's own rounding decides those, e.g. 3 of 2048 pixels of unet_resnet50 flip
  # between oneDNN 2.6 and 3.2 at identical max error), and the error stays bf16-sized.
  top2 = np.sort(np.asarray(ref), axis=-1)[..., -2:]
  decisive = (top2[..., 1] - top2[..., 0]) > 0.01 * np.ptp(np.asarray(ref))
  assert decisive.mean() > 0.9
  assert (low.argmax(-1) == ref.argmax(-1))[decisive].mean() >= 0.99
  assert _rel(low, ref) < 0.05


def test_zoo_shapes_are_covered():
  """Every (kernel, stride, dilation>1, groups>1) kind the zoo's graphs call is in SHAPES."""
  kinds = {(s.kernel, s.stride, s.dilation != (1, 1), s.groups > 1) for s in SHAPES.values()}
  for name in ZOO:
    planner = Planner("onednn", cache=False)
    graph = inference_graph.build_inference_model(_model(name), planner=planner)
    graphdef, state = nnx.split(graph)
    jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                   jax.ShapeDtypeStruct(X.shape, jnp.float32))
    for rec in planner.choices.values():
      sp = rec["spec"]
      kind = (tuple(sp["kernel"]), tuple(sp["stride"]), tuple(sp["dilation"]) != (1, 1),
              sp["groups"] > 1)
      assert kind in kinds, (name, kind)


def test_training_step_gradients_equal_xla():
  """A unet_resnet18 step (train-mode BatchNorm, cross-entropy) on oneDNN: loss and gradients.

  Against a float64 run of the same step (XLA, 64-bit), within 1e-4 of each leaf's largest
  gradient: oneDNN is at ~2e-5 there. XLA's own float32 step is *not* that close (~3e-3 on
  decoder kernels, measured on jaxlib 0.10.2), so against it the bound is XLA's own error.
  """
  base = _model("unet_resnet18")
  # 64 px: batch statistics of the 2 x 2 bottleneck, not of a single pixel per image (whose
  # variance magnifies every rounding difference).
  x = np.random.default_rng(0).normal(size=(2, 64, 64, 1))
  y = jnp.asarray(np.random.default_rng(2).integers(0, 3, x.shape[:3]), jnp.int32)

  def grads(model, dtype=jnp.float32):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, r):
      logits = nnx.merge(graphdef, p, r, copy=True)(jnp.asarray(x, dtype))
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return jax.jit(jax.value_and_grad(loss))(params, rest)

  lowered = inference_graph.lower_convs(nnx.clone(base), policy="onednn")
  planner = next(m.planner for _, m in nnx.iter_graph(lowered)
                 if isinstance(m, inference_graph.FastConv))
  l_out, g_out = grads(lowered)
  assert set(_choices_of(planner)) == {"onednn"}
  l_xla, g_xla = grads(nnx.clone(base))
  with jax.enable_x64(True):
    m64 = models.fill_from_numpy(models.abstract_model(
        models.create, "unet_resnet18", num_classes=3, dtype=jnp.float64,
        param_dtype=jnp.float64))
    nnx.update(m64, jax.tree.map(lambda a: jnp.asarray(a, jnp.float64)
                                 if jnp.issubdtype(a.dtype, jnp.floating) else a,
                                 nnx.state(base)))
    l64, g64 = grads(m64, jnp.float64)
    g64 = jax.tree.map(np.asarray, g64)
  assert abs(float(l_out) - float(l64)) < 1e-5 * abs(float(l64))
  errs = jax.tree.leaves_with_path(jax.tree.map(_rel, g_out, g64))
  worst = max(errs, key=lambda e: e[1])
  assert worst[1] < 1e-4, worst
  xla_err = max(jax.tree.leaves(jax.tree.map(_rel, g_xla, g64)))
  assert max(jax.tree.leaves(jax.tree.map(_rel, g_out, g_xla))) <= 2 * xla_err + 1e-4


def _choices_of(planner) -> list[str]:
  return [c["choice"] for c in planner.choices.values()]


def test_auto_policy_picks_onednn_on_the_cpu_and_xla_elsewhere():
  spec = SHAPES["3x3"]
  assert Planner("auto", cache=False).choose(spec) == "onednn"
  assert Planner("auto", cache=False, backend="gpu").choose(spec) == "xla"  # cuDNN stays
  assert Planner("xla", cache=False).choose(spec) == "xla"


# ---------------------------------------------------------------------------------------------
# Fallbacks.
# ---------------------------------------------------------------------------------------------


def test_a_shape_onednn_refuses_stays_on_xla_with_one_note(capsys):
  bad = ConvSpec(1, 8, 8, 8, 8, (3, 3), (1, 1), (1, 1), ((-1, 0), (0, 0)), 1, "float32")
  assert not onednn.supports(bad)[0]
  odd = ConvSpec(1, 8, 8, 8, 8, (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 1, "float16")
  assert not onednn.supports(odd)[0]
  planner = Planner("auto", cache=False)
  assert planner.choose(bad) == "xla" and planner.choose(bad) == "xla"
  notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("note:")]
  assert len(notes) == 1 and "runs on XLA" in notes[0]


@pytest.fixture
def without_extension(monkeypatch):
  """The extension cannot be built (no oneDNN / no compiler), in this process."""
  def fail(*_, **__):
    raise onednn._build.BuildError("oneDNN (dnnl.hpp, libdnnl.so) not found; "
                                   f"{onednn._build.NEEDS}")
  monkeypatch.setattr(onednn._build, "build", fail)
  onednn._reset_for_tests()
  yield
  monkeypatch.undo()
  onednn._reset_for_tests()


def test_without_the_extension_the_graph_runs_on_xla(without_extension, capsys):
  model = _model("unet_resnet18")
  ref = _run(inference_graph.build_inference_model(model, policy="xla"))
  graph = inference_graph.build_inference_model(model, policy="auto")
  out = _run(graph)
  assert "onednn" not in _choices(graph)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
  assert Planner("onednn", cache=False).choose(SHAPES["3x3"]) == "xla"
  notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("note:")]
  assert len(notes) == 1 and "libdnnl-dev" in notes[0], notes


def test_switched_off_by_environment_in_a_fresh_process(tmp_path):
  code = ("from bonejax.models import onednn, conv_lowering as c\n"
          "s = c.ConvSpec(1, 8, 8, 4, 4, (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 1, 'float32')\n"
          "print(onednn.available(), c.Planner('auto', cache=False).choose(s))\n")
  env = {"BONEJAX_ONEDNN": "off", "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
         "HOME": str(tmp_path)}
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=env, cwd=str(__import__("pathlib").Path(__file__).parents[1]),
                        timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == ["False", "xla"]
  assert [ln for ln in proc.stderr.splitlines() if ln.startswith("note:")] == [
      "note: oneDNN convolutions are off ($BONEJAX_ONEDNN); convolutions run on XLA"]


def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
  """A second build() reuses the binary; nothing half-written is left in the cache dir."""
  monkeypatch.setenv("BONEJAX_CACHE_DIR", str(tmp_path))
  first = onednn._build.build()
  mtime = first.stat().st_mtime_ns
  assert onednn._build.build() == first and first.stat().st_mtime_ns == mtime
  assert sorted(p.name for p in first.parent.iterdir()) == sorted([".lock", first.name])


def test_build_prefers_the_environments_onednn_and_system_forces_the_fallback(tmp_path,
                                                                              monkeypatch):
  """pip's oneDNN wheels (include/oneapi/dnnl, lib/libdnnl.so.3 only) in the environment's
  prefix win over the system's; $BONEJAX_ONEDNN=system skips them. (Discovery only: fake files.)"""
  inc = tmp_path / "include" / "oneapi" / "dnnl"
  inc.mkdir(parents=True)
  (inc / "dnnl.hpp").write_text("")
  (inc / "dnnl_version.h").write_text("#define DNNL_VERSION_MAJOR 3\n#define DNNL_VERSION_MINOR 7"
                                      "\n#define DNNL_VERSION_PATCH 1\n")
  (tmp_path / "include" / "dnnl_version.h").write_text('#include "oneapi/dnnl/dnnl_version.h"')
  (tmp_path / "lib").mkdir()
  (tmp_path / "lib" / "libdnnl.so.3").write_bytes(b"")
  monkeypatch.delenv("BONEJAX_DNNL_ROOT", raising=False)
  monkeypatch.delenv("BONEJAX_ONEDNN", raising=False)
  monkeypatch.setattr(sys, "prefix", str(tmp_path))
  includes, libs = onednn._build._dnnl_dirs()
  assert includes == [str(tmp_path / "include"), str(inc)]
  assert libs == [str(tmp_path / "lib" / "libdnnl.so.3")]
  assert onednn._build.dnnl_version_found() == "3.7.1"
  monkeypatch.setenv("BONEJAX_ONEDNN", "system")
  try:
    includes = onednn._build._dnnl_dirs()[0]
  except onednn._build.BuildError:
    includes = []  # no system oneDNN on this machine: not found is then the right answer
  assert includes == [] or not includes[0].startswith(str(tmp_path))


def test_measure_policy_times_onednn_beside_the_others(tmp_path, monkeypatch):
  monkeypatch.setenv("BONEJAX_CACHE_DIR", str(tmp_path))
  spec = ConvSpec(1, 8, 8, 4, 4, (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 1, "float32")
  planner = Planner("measure", repeats=1)
  choice = planner.choose(spec)
  seconds = planner.choices[spec.key()]["seconds"]
  assert set(seconds) == set(conv_lowering.candidates(spec)) | {"onednn"}
  assert choice == min(seconds, key=seconds.get)
  train = Planner("measure", repeats=1, train=True)  # forward + backward through the vjp
  assert set(train.choices.get(spec.key(), {}).get("seconds", {})) <= set(seconds)
  train.choose(spec)
  assert "onednn" in train.choices[spec.key()]["seconds"]


def test_auto_rule_takes_onednn_for_every_layer_it_takes_forward_and_training():
  strided = _spec(4, 64, 64, 64, 128, 3, s=2, p=(1, 1), dtype="bfloat16")
  deep = _spec(4, 8, 8, 512, 512, 3, dtype="bfloat16")
  large = _spec(4, 128, 128, 32, 32, 3, dtype="bfloat16")
  for train in (False, True):
    planner = Planner("auto", cache=False, train=train)
    assert {planner.choose(s) for s in (strided, deep, large)} == {"onednn"}


# ---------------------------------------------------------------------------------------------
# ReLU / residual add fused into oneDNN's post-ops (bonejax/models/graph_fusion.py).
# ---------------------------------------------------------------------------------------------


class _ResNetLet(nnx.Module):
  """A stem, two ResNet basic blocks (the second with a strided 1x1 shortcut) and a head."""

  def __init__(self, *, rngs: nnx.Rngs):
    from bonejax.models.layers import ConvBNAct
    from bonejax.models.resnet import BasicBlock
    self.stem = ConvBNAct(1, 8, 3, rngs=rngs)
    self.block1 = BasicBlock(8, 8, 1, 1, rngs=rngs)
    self.block2 = BasicBlock(8, 16, 2, 1, rngs=rngs)
    self.head = nnx.Conv(16, 3, (1, 1), rngs=rngs)

  def __call__(self, x):
    return self.head(self.block2(self.block1(self.stem(x))))


class _PreActivationKept(nnx.Module):
  """conv -> BN whose output feeds its ReLU *and* a concatenation: the ReLU must not fuse."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, 8, (3, 3), use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.mid = nnx.Conv(16, 8, (3, 3), use_bias=False, rngs=rngs)
    self.head = nnx.Conv(8, 3, (1, 1), rngs=rngs)

  def __call__(self, x):
    y = self.bn(self.conv(x))
    return self.head(self.mid(jnp.concatenate([jax.nn.relu(y), y], -1)))


def _randomised(model: nnx.Module) -> nnx.Module:
  return model_helpers.randomise_batch_norm(model, ("mean", "var", "bias"))


def _post_ops(graph) -> list[tuple[bool, bool]]:
  """(relu, sum) of every oneDNN call of the graph's traced forward pass, in call order."""
  from bonejax.models import graph_fusion
  graphdef, state = nnx.split(graph)
  jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(X))
  return [(c["relu"], c["sum"]) for c in graph_fusion.fused_convs(jaxpr.jaxpr)]


def test_fused_residual_blocks_equal_the_unfused_graph():
  model = _randomised(_ResNetLet(rngs=nnx.Rngs(0)))
  ref = _run(inference_graph.build_inference_model(model, policy="xla"))
  unfused = inference_graph.build_inference_model(model, policy="onednn", fuse=False)
  fused = inference_graph.build_inference_model(model, policy="onednn")
  assert isinstance(fused, _ResNetLet) and type(unfused) is _ResNetLet
  assert _post_ops(unfused) == [(False, False)] * 7
  # stem; block1 conv1, conv2 + x; block2 conv1, the shortcut (its output is the add's
  # operand: not fused), conv2 + shortcut (moved to where the add was); head (the result).
  assert _post_ops(fused) == [(True, False), (True, False), (True, True), (True, False),
                              (False, False), (True, True), (False, False)]
  out, plain = _run(fused), _run(unfused)
  assert _rel(out, plain) < 1e-5 and _rel(out, ref) < 1e-5

  low = inference_graph.build_inference_model(model, policy="onednn", dtype=jnp.bfloat16)
  low_plain = inference_graph.build_inference_model(model, policy="onednn", dtype=jnp.bfloat16,
                                                    fuse=False)
  a, b = _run(low), _run(low_plain)
  assert _rel(a, ref) < 3e-2 and _rel(b, ref) < 3e-2
  assert (a.argmax(-1) == ref.argmax(-1)).mean() >= 0.99


def test_a_relu_whose_input_has_a_second_consumer_is_not_fused():
  model = _randomised(_PreActivationKept(rngs=nnx.Rngs(0)))
  ref = _run(inference_graph.build_inference_model(model, policy="xla"))
  fused = inference_graph.build_inference_model(model, policy="onednn")
  assert _post_ops(fused) == [(False, False)] * 3
  assert _rel(_run(fused), ref) < 1e-5


def test_kept_kernels_follow_the_weights_passed_in():
  """The inference graph's handler keeps its kernels reordered between calls; a call with other
  weights (same shapes, so the same primitive, possibly the same buffers) must use them."""
  model = _randomised(_ResNetLet(rngs=nnx.Rngs(0)))
  graph = inference_graph.build_inference_model(model, policy="onednn")
  graphdef, state = nnx.split(graph)
  fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  other = jax.tree.map(lambda v: -0.5 * v if v.ndim == 4 else v, state)
  xla_def = nnx.split(inference_graph.build_inference_model(model, policy="xla"))[0]
  ref = lambda st: _run(nnx.merge(xla_def, st))  # noqa: E731  (same state tree)
  first, second, again = (np.asarray(fn(s, jnp.asarray(X))) for s in (state, other, state))
  assert _rel(first, ref(state)) < 1e-5 and _rel(second, ref(other)) < 1e-5
  np.testing.assert_array_equal(first, again)


def test_xla_cpu_rewrites_are_exact():
  """bf16 concatenation as bits and max-pooling as slices: bit-equal to XLA's own."""
  from bonejax.models import graph_fusion
  from bonejax.models.layers import max_pool
  rng = np.random.default_rng(0)
  for dt in (jnp.float32, jnp.bfloat16):
    x = jnp.asarray(rng.normal(size=(2, 9, 11, 5)), dt).at[0, 0, 0, 0].set(-jnp.inf)
    for fn, args in ((lambda x: max_pool(x, 3, 2, 1), (x,)),
                     (lambda a, b: jnp.concatenate([a, b], -1), (x, -x))):
      got = jax.jit(lambda *a, fn=fn: graph_fusion.fused_call(fn, *a))(*args)
      np.testing.assert_array_equal(np.asarray(got, np.float32),
                                    np.asarray(jax.jit(fn)(*args), np.float32))
      names = {e.primitive.name for e in jax.make_jaxpr(
          lambda *a, fn=fn: graph_fusion.fused_call(fn, *a))(*args).jaxpr.eqns}
      assert "reduce_window_max" not in names
      assert dt == jnp.float32 or "bitcast_convert_type" in names
