"""The trainer and the inference graph (issue 17): validation runs the folded graph predict.py
runs (config.eval_graph, default auto), and the training step may compute its convolutions as
bf16 dot products (config.conv_lowering) with the same state tree, checkpoints and bundles."""

import jax
import numpy as np
import pytest

from bonejax.core import errors
from bonejax.train import trainer
from bonejax.train.checkpoint import load_state
from train_helpers import smoke_config


def test_validation_through_the_graph_equals_the_eval_view(tiny_dataset, tmp_path):
  on = trainer.train(smoke_config(tiny_dataset), tmp_path / "graph")  # eval_graph="auto"
  off = trainer.train(smoke_config(tiny_dataset, eval_graph="off"), tmp_path / "view")
  # The same training (eval_graph is not part of it), validation computed two ways.
  _, a = load_state(tmp_path / "graph")
  _, b = load_state(tmp_path / "view")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert on["best_step"] == off["best_step"]
  assert on["best_val"]["miou_all"] == pytest.approx(off["best_val"]["miou_all"], abs=1e-3)
  assert on["best_val"]["loss"] == pytest.approx(off["best_val"]["loss"], rel=1e-4)


def test_lowered_convolutions_train_with_the_same_state_tree(tiny_dataset, tmp_path):
  xla = trainer.train(smoke_config(tiny_dataset, dtype="bfloat16"), tmp_path / "xla")
  dots = trainer.train(smoke_config(tiny_dataset, dtype="bfloat16", conv_lowering="auto"),
                       tmp_path / "dots")
  _, a = load_state(tmp_path / "xla")
  _, b = load_state(tmp_path / "dots")
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype
  assert np.isfinite(dots["final_val"]["loss"])
  assert dots["final_val"]["loss"] == pytest.approx(xla["final_val"]["loss"], rel=0.1)
  assert (tmp_path / "dots" / "model" / "model.json").exists()


def test_bad_values_are_one_line(tiny_dataset, tmp_path):
  for field, value in (("conv_lowering", "fast"), ("eval_graph", "maybe")):
    with pytest.raises(errors.UserError, match=f"config.{field}"):
      trainer.train(smoke_config(tiny_dataset, **{field: value}), tmp_path / field)
