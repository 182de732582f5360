"""The BatchNorm fold (bonejax/models/inference_graph.py) on models outside the zoo.

Two guards, each tested on its own: the single-consumer check of the probe pass's jaxpr (a conv
output that also feeds a skip connection is not folded) and the numeric check of a model outside
the zoo (folded vs unfolded logits once; on a difference, the plain model and one `note:` line).
The reference is always the eval-mode model itself, called eagerly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import model_helpers  # tests/ is on sys.path (conftest)
from bonejax import models
from bonejax.models import inference_graph
from bonejax.predict.engine import PlaneEngine

X = np.random.default_rng(0).normal(size=(2, 32, 32, 1)).astype(np.float32)


def _randomise_bn(model: nnx.Module) -> nnx.Module:
  """BatchNorm statistics far from (0, 1): a wrong fold must show in the logits."""
  return model_helpers.randomise_batch_norm(model)


class SkipNet(nnx.Module):
  """conv -> BN, and the conv's raw output also added back after the activation (a skip)."""

  def __init__(self, bn_cls=nnx.BatchNorm, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.bn = bn_cls(8, rngs=rngs)
    self.conv2 = nnx.Conv(8, 8, (3, 3), rngs=rngs)
    self.bn2 = bn_cls(8, rngs=rngs)
    self.head = nnx.Conv(8, 3, (1, 1), rngs=rngs)

  def __call__(self, x):
    h = self.conv(x)
    h = jax.nn.relu(self.bn(h)) + h  # the skip: conv output used twice
    h = jax.nn.relu(self.bn2(self.conv2(h)))  # a plain conv -> BN: may fold
    return self.head(h)


class ShiftedBatchNorm(nnx.BatchNorm):
  """A BatchNorm subclass whose call is not BatchNorm's: the fold's algebra does not apply."""

  def __call__(self, x, *args, **kwargs):
    return super().__call__(x, *args, **kwargs) + 0.5 * x


def _eager(model: nnx.Module) -> np.ndarray:
  model = nnx.clone(model)
  model.eval()
  return np.asarray(model(jnp.asarray(X)))


def _bn_count(model: nnx.Module) -> int:
  return sum(isinstance(n, nnx.BatchNorm) for _, n in nnx.iter_graph(model))


def test_skip_connection_output_is_not_folded(capsys):
  model = _randomise_bn(SkipNet(rngs=nnx.Rngs(0)))
  ref = _eager(model)
  fast = inference_graph.build_inference_model(model, policy="xla")
  out = np.asarray(fast(jnp.asarray(X)))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
  assert fast.inference_graph == "folded"
  assert isinstance(fast.bn, nnx.BatchNorm)  # the skip's BN stays: its conv has two consumers
  assert isinstance(fast.bn2, inference_graph.Identity)  # the plain pair still folds
  assert "note:" not in capsys.readouterr().err


def test_numeric_check_falls_back_to_the_plain_model(capsys):
  """The consumer check cannot see inside a BatchNorm subclass: the numeric check catches it."""
  model = _randomise_bn(SkipNet(ShiftedBatchNorm, rngs=nnx.Rngs(0)))
  ref = _eager(model)
  # What the fold alone would give (verify off): wrong by a good part of the logits.
  unchecked = inference_graph.build_inference_model(model, policy="xla", verify=False)
  wrong = np.asarray(unchecked(jnp.asarray(X)))
  assert np.abs(wrong - ref).max() > 0.05 * np.abs(ref).max()
  capsys.readouterr()

  fast = inference_graph.build_inference_model(model, policy="xla")
  assert fast.inference_graph == "plain"
  np.testing.assert_allclose(np.asarray(fast(jnp.asarray(X))), ref, rtol=1e-5,
                             atol=1e-5 * np.abs(ref).max())
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("note: inference graph off for SkipNet"), err


def test_plane_engine_agrees_with_the_eager_model(capsys):
  for bn_cls, graph in ((nnx.BatchNorm, "auto"), (ShiftedBatchNorm, "off")):
    model = _randomise_bn(SkipNet(bn_cls, rngs=nnx.Rngs(0)))
    ref = np.asarray(jax.nn.softmax(_eager(model), -1))
    engine = PlaneEngine(model, batch_size=2, graph="auto")
    assert engine.graph == graph
    probs = engine.infer(X[..., 0])
    np.testing.assert_allclose(probs, ref, atol=1e-5)
    assert (probs.argmax(-1) == ref.argmax(-1)).all()
    notes = [l for l in capsys.readouterr().err.splitlines() if l.startswith("note:")]
    assert len(notes) == (graph == "off")


def test_zoo_models_fold_without_the_numeric_check(monkeypatch):
  """The zoo is checked by tests/test_inference_graph.py, not at every build; it still folds."""
  model = _randomise_bn(models.fill_from_numpy(models.abstract_model(
      models.create, "unet", num_classes=3, depth=2, width=8)))
  assert inference_graph.in_zoo(model) and not inference_graph.in_zoo(SkipNet(rngs=nnx.Rngs(0)))
  calls = []
  monkeypatch.setattr(inference_graph, "fold_difference",
                      lambda *a: calls.append(a) or (0.0, 1.0))
  fast = inference_graph.build_inference_model(model, policy="xla")
  assert calls == [] and fast.inference_graph == "folded" and _bn_count(fast) == 0
  ref = _eager(model)
  np.testing.assert_allclose(np.asarray(fast(jnp.asarray(X))), ref,
                             atol=1e-5 * np.abs(ref).max())
