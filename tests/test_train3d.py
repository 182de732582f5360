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
