"""Model bundles: weights only (no RNG state), eval views, model.json checked before any weight
is read (types, and the architecture's shapes against the stored ones)."""

import json
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from bonejax import models
from bonejax.core import errors
from bonejax.models import bundle

CLASSES = ["background", "bone", "pore"]


def _meta(name, kwargs):
  return bundle.make_meta(model_name=name, model_kwargs=kwargs, classes=CLASSES, in_channels=1,
                          normalization="percentile", patch_size=32, train_axes=[0, 1, 2])


def _model(name, **kwargs):
  # Abstract, then numpy-filled weights: a real initialisation compiles for tens of seconds.
  abstract = nnx.eval_shape(lambda: models.create(name, num_classes=3, rngs=nnx.Rngs(0),
                                                  **kwargs))
  return models.fill_from_numpy(abstract, seed=1)


@pytest.fixture(scope="module")
def unet_bundle(tmp_path_factory):
  path = tmp_path_factory.mktemp("bundle") / "model"
  bundle.save_bundle(path, _model("unet", depth=2, width=4),
                     _meta("unet", {"depth": 2, "width": 4}))
  return path


@pytest.fixture(scope="module")
def segformer():
  # SegFormer carries RNG state (stochastic depth): the model for the weights-only tests.
  return _model("segformer_b0")


def _assert_same_weights(a, b):
  wa, wb = nnx.state(a, bundle.WEIGHT_FILTER), nnx.state(b, bundle.WEIGHT_FILTER)
  assert jax.tree.structure(wa) == jax.tree.structure(wb)
  for x, y in zip(jax.tree.leaves(wa), jax.tree.leaves(wb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _modes(model):
  return {(type(m).__name__, k): getattr(m, k) for _, m in nnx.iter_modules(model)
          for k in ("use_running_average", "deterministic") if hasattr(m, k)}


def test_weights_only_and_loaded_as_an_eval_view(segformer, tmp_path):
  net = segformer
  assert any("rngs" in k for k in bundle.tree_shapes(nnx.state(net)))
  bundle.save_bundle(tmp_path / "m", net, _meta("segformer_b0", {}))
  stored = bundle.tree_shapes(bundle.stored_arrays(tmp_path / "m" / bundle.WEIGHTS))
  assert stored == bundle.tree_shapes(nnx.state(net, bundle.WEIGHT_FILTER))
  assert not any("rngs" in k for k in stored)
  b = bundle.load_bundle(tmp_path / "m")
  _assert_same_weights(b.model, net)
  modes = _modes(b.model)
  assert modes and all(modes.values()), modes  # BatchNorm on running stats, no dropout/drop-path
  assert not any(_modes(net).values())          # the view left the trained model alone


def test_bundles_written_with_rng_state_still_load(segformer, tmp_path):
  net = segformer
  (tmp_path / "m").mkdir()
  with ocp.StandardCheckpointer() as ckptr:  # what save_bundle wrote before: the whole state
    ckptr.save((tmp_path / "m" / bundle.WEIGHTS).absolute(), jax.device_get(nnx.state(net)))
  (tmp_path / "m" / bundle.MODEL_JSON).write_text(json.dumps(_meta("segformer_b0", {})))
  _assert_same_weights(bundle.load_bundle(tmp_path / "m").model, net)


@pytest.mark.parametrize("edit, message", [
    (lambda m: [m], "holds a JSON list, not an object"),
    (lambda m: {**m, "in_channels": "abc"}, "'in_channels' must be a positive integer"),
    (lambda m: {**m, "in_channels": 0}, "'in_channels' must be a positive integer"),
    (lambda m: {**m, "classes": "bone"}, "'classes' must be a non-empty list"),
    (lambda m: {**m, "model_kwargs": [4]}, "'model_kwargs' must be an object"),
    (lambda m: {**m, "normalization": "minmax"}, "'normalization' must be one of"),
    (lambda m: {**m, "model": 3}, "'model' must be a model name"),
])
def test_bad_model_json_is_one_line(unet_bundle, tmp_path, edit, message):
  bad = tmp_path / "model"
  shutil.copytree(unet_bundle, bad)
  meta = json.loads((bad / bundle.MODEL_JSON).read_text())
  (bad / bundle.MODEL_JSON).write_text(json.dumps(edit(meta)))
  for read in (bundle.read_meta, bundle.load_bundle):
    with pytest.raises(errors.UserError, match=message) as e:
      read(bad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"depth": 2, "width": 10**9}, r"does not fit its weights: .*bias has shape \(4,\) in "
                                   r"the weights, \(1000000000,\) in the model"),
    ({"depth": 2, "width": 8}, "in the weights"),
    ({"depth": 3, "width": 4}, "the weights lack"),
    ({"depth": 2, "width": 1e9}, "cannot build model|does not fit"),
])
def test_model_json_must_fit_the_weights(unet_bundle, tmp_path, kwargs, message):
  # Built abstractly: a 1e9-wide U-Net is never allocated.
  bad = tmp_path / "model"
  shutil.copytree(unet_bundle, bad)
  meta = json.loads((bad / bundle.MODEL_JSON).read_text())
  (bad / bundle.MODEL_JSON).write_text(json.dumps({**meta, "model_kwargs": kwargs}))
  with pytest.raises(errors.UserError, match=message):
    bundle.load_bundle(bad)


def test_the_right_model_json_loads(unet_bundle):
  b = bundle.load_bundle(unet_bundle)
  assert b.classes == CLASSES and b.in_channels == 1 and b.normalization == "percentile"
  _assert_same_weights(b.model, _model("unet", depth=2, width=4))
