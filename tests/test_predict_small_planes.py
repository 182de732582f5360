"""A plane whose deepest maps are smaller than a 3x3 kernel (64 x 64 through a stride-32
network: 2 x 2 at the bottom) is predicted as the model computes it, graph on or off.

XLA's CPU backend runs such convolutions as a slow loop; the engine used to pad those planes
(by reflection) past the problem, which changed the probabilities: on a 64^3 phantom a 2.5D
model scored 0.51 miou_fg by the predictor against 0.81 in its own validation. The inference
graph now lowers those layers to dot products (or oneDNN) instead (`xla_would_swap`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import test_predict_graph  # tests/ is on sys.path (conftest)
from bonejax import predict
from bonejax.models import conv_lowering
from bonejax.models.conv_spec import ConvSpec


@pytest.fixture(scope="module")
def model_and_planes():
  planes = np.random.default_rng(0).normal(0, 1, (2, 64, 64)).astype(np.float32)
  # A classic U-Net 6 levels deep: stride 32, random BatchNorm statistics (test_predict_graph).
  model = test_predict_graph._model("unet", depth=6, width=2)
  view = nnx.view(model, use_running_average=True, deterministic=True,
                  raise_if_not_found=False)
  want = np.asarray(jax.nn.softmax(view(jnp.asarray(planes[..., None])), axis=-1))
  return model, planes, want


@pytest.mark.parametrize("graph", ["off", "auto"])
def test_small_planes_are_predicted_as_the_model_computes_them(model_and_planes, graph):
  model, planes, want = model_and_planes
  eng = predict.make_engine(model, graph=graph, dtype="float32", devices=1, batch_size=2)
  got = eng.infer(planes)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert eng.describe()[0]["tile"] is None


def test_the_planner_keeps_maps_smaller_than_the_kernel_off_xla(monkeypatch):
  from bonejax.models import onednn
  monkeypatch.setattr(onednn, "available", lambda: False)
  small = ConvSpec(1, 2, 2, 8, 8, (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 1, "float32")
  big = ConvSpec(1, 3, 3, 8, 8, (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 1, "float32")
  assert conv_lowering.xla_would_swap(small) and not conv_lowering.xla_would_swap(big)
  auto = conv_lowering.Planner("auto", cache=False, backend="cpu")
  assert auto.choose(small) == "taps" and auto.choose(big) == "xla"
  assert conv_lowering.Planner("xla", cache=False, backend="cpu").choose(small) == "xla"
  assert conv_lowering.Planner("auto", cache=False, backend="gpu").choose(small) == "xla"
  # The dot lowering computes the same sums as XLA's convolution.
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 2, 2, 8)), jnp.float32)
  k = jnp.asarray(np.random.default_rng(2).normal(size=(3, 3, 8, 8)), jnp.float32)
  np.testing.assert_allclose(conv_lowering.apply("taps", x, k, small),
                             conv_lowering.apply("xla", x, k, small), rtol=1e-5, atol=1e-5)
