"""The predictor runs the inference graph by default (BatchNorm folded, convolutions lowered):
the same labels and, in float32, probabilities within 1e-5 of the model as it is."""

import numpy as np
import pytest
from flax import nnx

from bonejax import models, predict
from bonejax.predict import engine as engine_lib


def _model(name, **kw):
  abstract = models.abstract_model(
      lambda **k: models.create(name, num_classes=3, in_channels=1, **kw, **k))
  model = models.fill_from_numpy(abstract, seed=1)
  # Random BatchNorm statistics, so folding has something to fold.
  rng = np.random.default_rng(2)
  for _, bn in nnx.iter_modules(model):
    if isinstance(bn, nnx.BatchNorm):
      n = bn.mean.shape[0]
      bn.mean.value = rng.normal(0, 0.2, n).astype(np.float32)
      bn.var.value = rng.uniform(0.5, 1.5, n).astype(np.float32)
      bn.scale.value = rng.uniform(0.8, 1.2, n).astype(np.float32)
      bn.bias.value = rng.normal(0, 0.1, n).astype(np.float32)
  return model


@pytest.mark.parametrize("name,kw", [("unet", {"depth": 2, "width": 4}),
                                     ("unet_resnet18", {})])
def test_graph_equals_the_model_in_float32(name, kw):
  model = _model(name, **kw)
  vol = np.random.default_rng(0).integers(0, 4000, (6, 40, 36)).astype(np.uint16)
  common = dict(planes=3, return_probs=True, batch_size=4, devices=1)
  lab_off, p_off = predict.predict_volume(model, vol, graph="off", **common)
  lab_on, p_on = predict.predict_volume(model, vol, **common)  # the default: the graph
  np.testing.assert_allclose(p_on, p_off, atol=1e-5)
  assert (lab_on == lab_off).mean() > 0.999


def test_engine_reports_its_graph_and_refuses_unknown_policies():
  model = _model("unet", depth=2, width=4)
  assert predict.make_engine(model).graph == "auto"
  assert predict.make_engine(model, graph="off").graph == "off"
  with pytest.raises(ValueError, match="graph="):
    engine_lib.PlaneEngine(model, graph="fast")
