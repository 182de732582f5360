"""Data parallelism: 4 devices == 1 device, and 2 processes (jax.distributed, gloo) == 1 process.

Tolerances: float32 sums reduced in another order (per-device partial sums, then an all-reduce)
differ in the last bits; after one step the loss agrees to 1e-6 relative and the parameters to
1e-6 absolute (Adam's first update is +-lr = 1e-3 per weight, so an error in its sign would
show as 2e-3). The two-process run is compared after 3 steps with atol 1e-5.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bonejax import models
from bonejax.train import configlib, losses, optim, trainer
from bonejax.train import mesh as mesh_lib
from bonejax.train.checkpoint import load_state

REPO = Path(__file__).resolve().parents[1]


def _one_step(devices, batch, seed=0):
  mesh = mesh_lib.make_mesh(devices)
  repl, data = mesh_lib.replicated(mesh), mesh_lib.data_sharding(mesh)
  create = lambda rngs: models.create("unet", num_classes=3, rngs=rngs, depth=2, width=4)
  graphdef, _, _ = nnx.split(nnx.eval_shape(lambda: create(nnx.Rngs(0))), nnx.Param, ...)
  tx = optim.make_optimizer({"name": "adam"}, optim.make_schedule({}, 1e-3, 10))
  state = jax.jit(trainer.make_init(create, tx, seed), out_shardings=repl)()
  step = jax.jit(trainer.make_train_step(graphdef, tx, losses.make_loss({"ce": 1, "dice": 1}),
                                         configlib.default_config().augment, seed),
                 in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                 donate_argnums=(0,))
  placed = mesh_lib.put_batch(batch, data, len(batch["image"]))
  assert len(placed["image"].sharding.device_set) == len(devices)
  state, out = step(state, placed, jax.device_put(np.float32(1.0), repl))
  return jax.device_get(out["loss"]), jax.device_get(state)


def test_sharded_step_equals_single_device():
  assert jax.device_count() >= 4, "conftest sets jax_num_cpu_devices=4"
  rng = np.random.default_rng(0)
  batch = {"image": rng.random((8, 32, 32, 1), np.float32),
           "label": rng.integers(0, 3, (8, 32, 32)).astype(np.int32)}
  loss1, state1 = _one_step(jax.devices()[:1], batch)
  loss4, state4 = _one_step(jax.devices()[:4], batch)
  np.testing.assert_allclose(loss4, loss1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(state4), jax.tree.leaves(state1)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)
  # BatchNorm statistics saw the global batch on 4 devices too.
  assert not np.allclose(jax.tree.leaves(state4["rest"])[0], 0.0)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(tiny_dataset, tmp_path):
  overrides = [f"--config.dataset={tiny_dataset}", "--config.num_steps=3",
               "--config.batch_size=4", "--config.val_batch_size=2", "--config.eval_every=3",
               "--config.checkpoint_every=3", "--config.log_every=1",
               "--config.augment.enabled=False"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", PYTHONPATH=str(REPO))
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, str(REPO / "launch/train.py"), "--config=configs/demo.py:smoke",
       f"--workdir={tmp_path / 'multi'}", f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}", *overrides],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  result = json.loads(outs[0][0].strip().splitlines()[-1])
  assert result["processes"] == 2 and result["devices"] == 2 and result["steps"] == 3

  # One process over 2 devices, same global batch.
  config = configlib.load_config_file(str(REPO / "configs/demo.py") + ":smoke")
  config.dataset, config.num_steps, config.batch_size = str(tiny_dataset), 3, 4
  config.val_batch_size, config.eval_every, config.checkpoint_every = 2, 3, 3
  config.augment.enabled = False
  single = trainer.train(config, tmp_path / "single", devices=jax.devices()[:2])
  assert single["best_val_miou"] == pytest.approx(result["best_val_miou"], abs=1e-5)
  _, multi_state = load_state(tmp_path / "multi")
  _, single_state = load_state(tmp_path / "single")
  for a, b in zip(jax.tree.leaves(multi_state), jax.tree.leaves(single_state)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  assert (tmp_path / "multi" / "model" / "model.json").exists()
