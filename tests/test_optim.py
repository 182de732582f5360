"""Optimisers, schedules and the reduce-on-plateau rule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bonejax.train import optim


def test_schedules():
  const = optim.make_schedule({"name": "constant"}, 3e-4, 100)
  assert float(const(0)) == pytest.approx(3e-4) and float(const(99)) == pytest.approx(3e-4)
  cos = optim.make_schedule({"name": "cosine", "warmup_steps": 10, "final_lr_fraction": 0.1},
                            1.0, 110)
  assert float(cos(0)) == 0.0
  assert float(cos(5)) == pytest.approx(0.5)
  assert float(cos(10)) == pytest.approx(1.0)
  assert float(cos(60)) == pytest.approx(0.55, abs=1e-6)  # half-way down the cosine
  assert float(cos(110)) == pytest.approx(0.1)
  warm = optim.make_schedule({"name": "plateau", "warmup_steps": 4}, 2.0, 100)
  assert [float(warm(s)) for s in (0, 2, 4, 50)] == pytest.approx([0.0, 1.0, 2.0, 2.0])
  with pytest.raises(ValueError, match="unknown schedule"):
    optim.make_schedule({"name": "step"}, 1.0, 10)


def test_plateau_halves_after_patience_bad_evaluations():
  p = optim.plateau_from_config({"name": "plateau", "plateau_patience": 3})
  assert p.enabled and p.scale == 1.0
  for v in (1.0, 0.9, 0.8):             # improving: no change
    assert not p.update(v)
  assert [p.update(v) for v in (0.85, 0.8, 0.9)] == [False, False, True]
  assert p.scale == 0.5
  assert [p.update(v) for v in (0.81, 0.82)] == [False, False]  # counter restarted after the cut
  assert not p.update(0.5) and p.bad == 0  # improvement resets
  assert [p.update(v) for v in (0.6, 0.6, 0.6)] == [False, False, True] and p.scale == 0.25
  state = p.get_state()
  q = optim.plateau_from_config({"name": "plateau", "plateau_patience": 3})
  q.set_state(state)
  assert q.get_state() == state
  assert not optim.plateau_from_config({"name": "constant"}).update(1.0)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_scaling_updates_equals_scaling_the_learning_rate(name):
  params = {"w": jnp.arange(6.0).reshape(2, 3) - 2.0}
  grads = [{"w": jnp.sin(jnp.arange(6.0) + k).reshape(2, 3)} for k in range(3)]
  cfg = {"name": name, "weight_decay": 0.1 if name == "adamw" else 0.0, "momentum": 0.9}
  full = optim.make_optimizer(cfg, optim.make_schedule({}, 0.1, 10))
  half = optim.make_optimizer(cfg, optim.make_schedule({}, 0.05, 10))
  p1, s1 = params, full.init(params)
  p2, s2 = params, half.init(params)
  for g in grads:
    u1, s1 = full.update(g, s1, p1)
    p1 = optax.apply_updates(p1, optim.scale_updates(u1, jnp.float32(0.5)))
    u2, s2 = half.update(g, s2, p2)
    p2 = optax.apply_updates(p2, u2)
  np.testing.assert_allclose(p1["w"], p2["w"], rtol=1e-6, atol=1e-7)


def test_adam_defaults_and_clipping():
  tx = optim.make_optimizer({"name": "adam", "clip_norm": 1.0}, optim.make_schedule({}, 3e-4, 1))
  params = {"w": jnp.zeros(4)}
  updates, _ = tx.update({"w": jnp.array([300.0, 400.0, 0.0, 0.0])}, tx.init(params), params)
  # Adam's first step is -lr * sign(g) whatever the clipping; clipping keeps it finite.
  np.testing.assert_allclose(updates["w"], [-3e-4, -3e-4, 0, 0], rtol=1e-4)
  clip = optax.clip_by_global_norm(1.0)
  g, _ = clip.update({"w": jnp.array([3.0, 4.0])}, clip.init(None))
  assert float(jnp.linalg.norm(g["w"])) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="unknown optimizer"):
    optim.make_optimizer({"name": "lion"}, optim.make_schedule({}, 1.0, 1))


def test_step_jits_once_for_any_plateau_scale():
  tx = optim.make_optimizer({"name": "adam"}, optim.make_schedule({}, 1e-2, 10))
  traces = []

  @jax.jit
  def step(p, s, scale):
    traces.append(1)
    u, s = tx.update(jax.tree.map(jnp.ones_like, p), s, p)
    return optax.apply_updates(p, optim.scale_updates(u, scale)), s

  p = {"w": jnp.zeros(3)}
  s = tx.init(p)
  for scale in (1.0, 0.5, 0.25):
    p, s = step(p, s, jnp.float32(scale))
  assert len(traces) == 1


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_weight_decay_is_refused_where_it_would_be_ignored(name):
  schedule = optim.make_schedule({}, 1e-3, 10)
  with pytest.raises(ValueError, match="adamw"):
    optim.make_optimizer({"name": name, "weight_decay": 1e-4}, schedule)
  optim.make_optimizer({"name": name, "weight_decay": 0.0}, schedule)


def test_adamw_decays_the_weights():
  # With zero gradients Adam's update is 0; AdamW's is -lr * wd * w.
  params = {"w": jnp.array([2.0, -4.0])}
  tx = optim.make_optimizer({"name": "adamw", "weight_decay": 0.1},
                            optim.make_schedule({}, 0.5, 10))
  updates, _ = tx.update({"w": jnp.zeros(2)}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], [-0.1, 0.2], rtol=1e-6)
