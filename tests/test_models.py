"""Tests for bonejax/models: shapes, dtypes, parameter and FLOP counts, BatchNorm modes, padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bonejax import models

CONTRACT_NAMES = ("unet", "unet_resnet18", "unet_resnet34", "unet_resnet50", "unetpp_resnet18",
                  "unetpp_resnet34", "deeplabv3plus_resnet18", "deeplabv3plus_resnet34")
# Small widths where a model takes them, so the whole zoo runs in seconds on a CPU.
SMALL = {"unet": dict(depth=3, width=4)}


def _concrete(name, seed=0, dtype=jnp.float32, **kw):
  """A usable model whose state is filled on the host (numpy), skipping XLA-compiled init.

  Real init compiles one threefry kernel per parameter shape, which costs minutes on a slow
  shared CPU; the forward pass does not care where its weights came from. Kernels are He-normal
  in their fan-in, like the real initialisers; scales and variances are 1, the rest 0.
  """
  model = models.abstract_model(models.create, name, num_classes=3, in_channels=1, dtype=dtype,
                                **kw)
  return models.fill_from_numpy(model, seed)


def _jit_forward(model):
  """The split/merge pattern training code uses: one compiled pure function, state in and out."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, x):
    m = nnx.merge(graphdef, state)
    return m(x), nnx.state(m)

  return forward, state


def _abstract(name, **kw):
  return models.abstract_model(models.create, name, num_classes=3, in_channels=1, **kw)


def test_registry_has_the_contract_names():
  assert set(CONTRACT_NAMES) <= set(models.MODEL_NAMES)
  assert {"segformer_b0", "unet_mit_b0", "unetpp_resnet50", "deeplabv3plus_resnet50"} <= set(
      models.MODEL_NAMES)
  assert models.STRIDE == 32


MODELS_2D = [n for n in models.MODEL_NAMES if models.spatial_dims(n) == 2]  # 3D: test_models3d


@pytest.mark.parametrize("name", MODELS_2D)
def test_output_shapes_and_dtype(name):
  """Traced, not run (shapes are static, so this is the real check): square and non-square."""
  forward, state = _jit_forward(_abstract(name, **SMALL.get(name, {})))
  shapes = ((2, 64, 64, 1), (1, 96, 64, 1))
  outs = jax.eval_shape(lambda s, xs: [forward(s, x)[0] for x in xs], state,
                        [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes])
  for shape, logits in zip(shapes, outs):
    assert logits.shape == shape[:3] + (3,) and logits.dtype == jnp.float32


@pytest.mark.parametrize("name,mode", [("unet", "train"), ("deeplabv3plus_resnet18", "train"),
                                       ("segformer_b0", "eval")])
def test_forward_runs_and_is_finite(name, mode):
  """Numbers, not just shapes (unet_resnet18 runs in the bf16 test)."""
  model = _concrete(name, **SMALL.get(name, {}))
  getattr(model, mode)()  # deeplab in train mode: its dropout draws from the model's RNG stream
  forward, state = _jit_forward(model)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 96, 64, 1)), jnp.float32)
  logits, _ = forward(state, x)
  assert logits.shape == (2, 96, 64, 3) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all() and float(jnp.std(logits)) > 0


def test_parameter_counts_match_smp():
  assert models.count_params(_abstract("unet_resnet18")) == 14_322_227
  assert models.count_params(_abstract("unetpp_resnet18")) == pytest.approx(15.96e6, rel=0.01)
  assert models.count_params(_abstract("unet_resnet34")) == pytest.approx(24.43e6, rel=0.01)
  # Hand-derived (encoder + decoder + head); a change here changes a published architecture.
  assert models.count_params(_abstract("unet_resnet34")) == 24_430_387
  assert models.count_params(_abstract("unet_resnet50")) == 32_515_123
  assert models.count_params(_abstract("unetpp_resnet18")) == 15_964_467


def test_parameter_counts_of_the_other_smp_architectures():
  # segmentation_models_pytorch 0.6.0's own counts for 1 channel in, 3 classes out;
  # tests/test_convert_parity.py also compares them live, weight for weight.
  expected = {"deeplabv3plus_resnet18": 12_323_539, "deeplabv3plus_resnet50": 26_671_827,
              "unetpp_resnet50": 48_979_763, "segformer_b0": 3_711_779, "unet_mit_b0": 5_546_643}
  for name, n in expected.items():
    assert models.count_params(_abstract(name)) == n, name


def test_count_params_excludes_batch_stats():
  model = _abstract("unet", depth=1, width=2)
  # conv 1->2 (18) + BN (4) + conv 2->2 (36) + BN (4) + 1x1 head with bias (6 + 3)
  assert models.count_params(model) == 18 + 4 + 36 + 4 + 9
  stats = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
  assert sum(int(np.prod(s.shape)) for s in stats) == 8


def test_flop_conventions_on_a_hand_counted_conv():
  class OneConv(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(2, 4, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, rngs=rngs)

    def __call__(self, x):
      return self.conv(x)

  model = OneConv(nnx.Rngs(0))
  # Dense (PyTorch counters): every tap of every output, padding included.
  assert round(models.forward_gflops(model, 8, 2) * 1e9) == 2 * 8 * 8 * 9 * 2 * 4
  # XLA: also 2 FLOP per multiply-add, but only taps inside the image: 2+3*6+2 = 22 per axis.
  assert round(models.forward_gflops(model, 8, 2, convention="xla") * 1e9) == 2 * 22 * 22 * 2 * 4


def test_unet_resnet18_gflops_per_256_patch():
  gflops = models.forward_gflops(_abstract("unet_resnet18"), 256, 1)
  assert gflops == pytest.approx(10.6, rel=0.01)


def test_real_init_is_deterministic_and_fp32():
  a = models.create("unet", num_classes=2, rngs=nnx.Rngs(0), depth=1, width=2)
  b = models.create("unet", num_classes=2, rngs=nnx.Rngs(0), depth=1, width=2,
                    dtype=jnp.bfloat16)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(a, nnx.Param), nnx.state(b, nnx.Param))
  assert {p.dtype for p in jax.tree.leaves(nnx.state(b, nnx.Param))} == {jnp.dtype("float32")}


def test_batchnorm_updates_in_train_mode_only():
  model = _concrete("unet", depth=2, width=4)
  x = jnp.asarray(np.random.default_rng(1).normal(2.0, 3.0, size=(2, 32, 32, 1)), jnp.float32)
  before = jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))
  model.train()
  forward, state = _jit_forward(model)  # the pattern train steps use: state in, state out
  _, new_state = forward(state, x)
  nnx.update(model, new_state)
  trained = jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b), before, trained)))

  model.eval()  # same weights, running statistics used and left alone
  forward, state = _jit_forward(model)
  y1, after = forward(state, x)
  y2, _ = forward(state, x[:1])  # a sample's output no longer depends on the rest of the batch
  jax.tree.map(np.testing.assert_array_equal, trained, nnx.filter_state(after, nnx.BatchStat))
  np.testing.assert_allclose(np.asarray(y1[:1]), np.asarray(y2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["unet_resnet18"])
def test_bf16_forward_close_to_fp32(name):
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 64, 64, 1)), jnp.float32)
  out = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    model = _concrete(name, seed=0, dtype=dtype)  # the very same fp32 weights
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    model.eval()
    forward, state = _jit_forward(model)
    out[dtype], _ = forward(state, x)
  ref, low = np.asarray(out[jnp.float32]), np.asarray(out[jnp.bfloat16])
  assert out[jnp.bfloat16].dtype == jnp.float32 and np.isfinite(low).all()
  # bfloat16 keeps 8 bits of mantissa: one conv layer alone is ~0.3 % off in relative L2 (with
  # float32 accumulation, as XLA does on CPU and GPU), and the ~20 layers of this network add
  # up to ~1.2 % (measured: 1.19 %; unet 0.87 %, segformer_b0 1.22 %). 1e-2 is below the
  # format's noise floor for a network this deep, so the bound is 2e-2, plus the decisions.
  assert np.linalg.norm(low - ref) / np.linalg.norm(ref) < 2e-2
  assert (low.argmax(-1) == ref.argmax(-1)).mean() > 0.99
  # What the predictor averages and votes on, the class probabilities, meets the 1e-2 bound.
  p_ref, p_low = np.asarray(jax.nn.softmax(ref, -1)), np.asarray(jax.nn.softmax(low, -1))
  assert np.linalg.norm(p_low - p_ref) / np.linalg.norm(p_ref) < 1e-2


@pytest.mark.parametrize("xp", [np, jnp])
@pytest.mark.parametrize("shape", [(2, 50, 70, 1), (45, 64, 3), (1, 1, 33, 2), (1, 64, 32, 1),
                                   (2, 5, 3, 1)])  # last: reflections longer than the side
def test_pad_to_multiple_round_trip(xp, shape):
  x = xp.asarray(np.random.default_rng(4).normal(size=shape).astype(np.float32))
  padded, hw = models.pad_to_multiple(x, 32)
  assert isinstance(padded, type(x))
  assert hw == shape[-3:-1]
  assert padded.shape[-3] % 32 == 0 and padded.shape[-2] % 32 == 0
  assert padded.shape[-3] - shape[-3] < 32 and padded.shape[-2] - shape[-2] < 32
  np.testing.assert_array_equal(np.asarray(models.crop_to(padded, hw)), np.asarray(x))
  if shape[-3] > 1 and padded.shape[-3] > shape[-3]:  # reflect: row h mirrors row h-2
    np.testing.assert_array_equal(np.asarray(padded[..., shape[-3], :, :]),
                                  np.asarray(padded[..., shape[-3] - 2, :, :]))


def test_unknown_names_and_arguments_are_clear_errors():
  with pytest.raises(ValueError, match="unknown model 'resnet9000'.*unet_resnet18"):
    models.create("resnet9000", num_classes=3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="does not take argument.*widht.*takes: .*width"):
    models.create("unet", num_classes=3, rngs=nnx.Rngs(0), widht=8)
  with pytest.raises(ValueError, match="encoder"):  # fixed by the name
    models.create("unet_resnet18", num_classes=3, rngs=nnx.Rngs(0), encoder="resnet50")


def test_bad_input_shapes_fail_at_trace_time():
  model = _abstract("unet_resnet18")
  graphdef, state = nnx.split(model)
  for shape in ((1, 48, 64, 1), (1, 64, 64, 2)):
    with pytest.raises(ValueError, match="multiples of 32|expects NHWC"):
      jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                     jax.ShapeDtypeStruct(shape, jnp.float32))


def test_dropout_follows_train_and_eval():
  model = _abstract("deeplabv3plus_resnet18")
  model.eval()
  assert model.aspp.dropout.deterministic and model.encoder.stem.bn.use_running_average
  model.train()
  assert not model.aspp.dropout.deterministic
