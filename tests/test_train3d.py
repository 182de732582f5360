"""3D training end to end on the trainer's own pieces: train.input3d's feed (device sampler on 4
fake devices) and validation, augment3d, the trainer's train step and the evaluator. What the
trainer's 3D hook (models.spatial_dims(name) == 3) wires together."""

import functools
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from bonejax import models
from bonejax.train import configlib, input3d, losses, mesh as mesh_lib, steps
from bonejax.train.evaluators import planes

CONFIG = str(Path(__file__).resolve().parents[1] / "configs/unet3d.py") + ":smoke"


def test_3d_steps_lower_the_loss_and_evaluate(tiny_dataset):
  c = configlib.load_config_file(CONFIG)
  configlib.check(c)
  mesh = mesh_lib.make_mesh(jax.local_devices()[:4])
  sharding, repl = mesh_lib.data_sharding(mesh), mesh_lib.replicated(mesh)
  model_name, kwargs = c.model.name, dict(c.model.kwargs)
  stride = models.create(model_name, num_classes=3, rngs=nnx.Rngs(0), **kwargs).stride
  assert input3d.check_config_3d(c, stride) == (16, 16, 16)
  put = functools.partial(mesh_lib.put_batch, sharding=sharding, global_batch=4)
  inp = input3d.make_input_3d(c, tiny_dataset, ["scan_000", "scan_001"], ["scan_002"], mesh,
                              put, batch_size=4, val_batch=4)
  assert inp.feed.kind.startswith("device")

  create = functools.partial(models.create, model_name, num_classes=3, in_channels=1, **kwargs)
  tx = optax.adam(3e-3)
  loss_fn = losses.make_loss(dict(ce=1.0, dice=1.0))
  graphdef, _, _ = nnx.split(models.abstract_model(create), nnx.Param, ...)
  # Weights drawn by numpy (the trainer's compiled initialiser costs more than these steps).
  _, params, rest = nnx.split(models.fill_from_numpy(models.abstract_model(create)), nnx.Param,
                              ...)
  state = jax.device_put({"params": params, "rest": rest, "opt": tx.init(params),
                          "step": np.int32(0)}, repl)
  # The trainer's step with its 2D augmentation off; the 3D one in front, as the hook would.
  step = steps.make_train_step(graphdef, tx, loss_fn, {"enabled": False}, 0)
  aug = input3d.augment_fn(c)

  @jax.jit
  def train_step(state, batch):
    image, label = aug(jax.random.fold_in(jax.random.key(1), state["step"]), batch["image"],
                       batch["label"])
    return step(state, {"image": image, "label": label}, np.float32(1.0))

  lossv = []
  for _ in range(16):
    state, out = train_step(state, next(inp.feed))
    lossv.append(float(out["loss"]))
  assert np.isfinite(lossv).all()
  assert np.mean(lossv[-4:]) < np.mean(lossv[:4]), lossv

  graphdef_eval, _, _ = nnx.split(models.abstract_model(create), nnx.Param, ...)
  eval_step = jax.jit(planes.make_eval_step(graphdef_eval, loss_fn, 3))
  ev = planes.Evaluator(eval_step, inp.validation, put, nbytes=inp.val_nbytes,
                               max_device_bytes=1 << 30, classes=["bg", "bone", "pore"],
                               replicated=repl)(state)
  assert np.isfinite(ev["loss"]) and 0 <= ev["miou_all"] <= 1 and len(ev["iou"]) == 3
  inp.feed.close()
  _volume_evaluator_predicts_by_3d_windows(c, tiny_dataset, graphdef_eval, state)


def _volume_evaluator_predicts_by_3d_windows(c, dataset_path, graphdef, state):
  """The volume evaluator on a 3D model: the held-out scan predicted whole by 3D sliding windows
  (the config's predict_window), as predict.py predicts the bundle, and scored with its border
  band; planes and vote are refused."""
  import types

  import pytest

  from bonejax import predict
  from bonejax.core import errors
  from bonejax.data import store
  from bonejax.evaluate import border, metrics
  from bonejax.train.evaluators import volume

  classes = ["bg", "bone", "pore"]
  ctx = types.SimpleNamespace(config=c, dataset_path=dataset_path, val_scans=["scan_002"],
                              classes=classes, model_graphs=types.SimpleNamespace(view=graphdef),
                              input3d=object())
  ev = volume.Evaluator.from_config("volume", {"type": "volume", "every_steps": 2}, ctx)
  assert ev.window == 16 and ev.overlap == 0.5  # the config's predict_window, predict_overlap
  # Run with fewer, larger windows (4 on the 32 x 48 x 48 scan, not 75): seconds less.
  ev = volume.Evaluator.from_config("volume", {"type": "volume", "every_steps": 2,
                                               "window": 32, "overlap": 0.25,
                                               "batch_size": 1}, ctx)
  got = ev(state)
  engine = ev._engine
  assert ev._engine_for(state) is engine and engine.compilations == 1  # kept, new weights
  # The labels predict.py's function gives with that engine (its compiled call, the weights
  # of `state`: a fresh engine would only add a compilation), scored by numpy.
  scan = store.open_dataset(dataset_path).open_scan("scan_002")
  labels = predict.predict_volume_3d(engine, scan.image, stats=scan.stats,
                                     normalization=str(c.normalization), window=32,
                                     overlap=0.25, batch_size=1).labels
  assert engine.compilations == 1
  truth = np.asarray(scan.read_labels())
  want = metrics.scores(metrics.confusion_matrix(labels, truth, 3), classes)
  assert got["miou_fg"] == want["miou_fg"] and got["iou"] == want["iou"]
  m = border.band_mask(truth.shape, border.BAND)
  for key, where in (("border_miou_fg", m), ("interior_miou_fg", ~m)):
    s = metrics.scores(metrics.confusion_matrix(labels[where], truth[where], 3), classes)
    assert got[key] == pytest.approx(s["miou_fg"], abs=1e-12)
  with pytest.raises(errors.UserError, match="planes, vote are for 2D models"):
    volume.Evaluator.from_config("volume", {"type": "volume", "every_steps": 2, "planes": 3,
                                            "vote": "soft"}, ctx)
