"""The trainer and the inference graph (issue 17): validation runs the folded graph predict.py
runs (config.eval_graph, default auto), and the training step computes its convolutions on a CPU
as config.conv_lowering says (default auto: oneDNN's, where its extension is built) with the same
state tree, checkpoints and bundles; older runs resume on the lowering they were trained with."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from bonejax.core import errors
from bonejax.train import setup as train_setup
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


def test_lowered_convolutions_train_with_the_same_state_tree(tiny_dataset, tmp_path, capsys):
  xla = trainer.train(smoke_config(tiny_dataset, dtype="bfloat16", conv_lowering="xla"),
                      tmp_path / "xla")
  dots = trainer.train(smoke_config(tiny_dataset, dtype="bfloat16"), tmp_path / "dots")  # auto
  _, a = load_state(tmp_path / "xla")
  _, b = load_state(tmp_path / "dots")
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype
  assert np.isfinite(dots["final_val"]["loss"])
  assert dots["final_val"]["loss"] == pytest.approx(xla["final_val"]["loss"], rel=0.1)
  assert (tmp_path / "dots" / "model" / "model.json").exists()
  # A run from before auto was the default trained on XLA's convolutions; its checkpoints'
  # fingerprint has no conv_lowering (as an explicit xla's has none). Under today's default it
  # resumes on XLA, step for step, and its record says so.
  trainer.train(smoke_config(tiny_dataset, dtype="bfloat16", conv_lowering="xla", stop_after=2),
                tmp_path / "old")
  host = json.loads((tmp_path / "old" / "checkpoints" / "2" / "host" / "metadata").read_text())
  assert "conv_lowering" not in host["fingerprint"]
  capsys.readouterr()
  resumed = trainer.train(smoke_config(tiny_dataset, dtype="bfloat16"), tmp_path / "old")
  assert resumed["resumed_from"] == 2
  assert "trained with conv_lowering=xla; it resumes so" in capsys.readouterr().err
  _, c = load_state(tmp_path / "old")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)):
    np.testing.assert_array_equal(x, y)
  assert json.loads((tmp_path / "old" / "config.json").read_text())["conv_lowering"] == "xla"


def test_the_default_lowers_on_cpus_and_keeps_the_models_convolutions_on_gpus(tiny_dataset,
                                                                               monkeypatch):
  c = smoke_config(tiny_dataset, eval_graph="off")
  assert c.conv_lowering == "auto"
  s = train_setup.check_settings(c)
  assert "FastConv" in str(train_setup.build_graphs(c, s, 3).train)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  graphs = train_setup.build_graphs(c, s, 3)
  assert "FastConv" not in str(graphs.train)
  assert graphs.train == nnx.split(graphs.abstract, nnx.Param, ...)[0]


def test_bad_values_are_one_line(tiny_dataset, tmp_path):
  for field, value in (("conv_lowering", "fast"), ("eval_graph", "maybe")):
    with pytest.raises(errors.UserError, match=f"config.{field}"):
      trainer.train(smoke_config(tiny_dataset, **{field: value}), tmp_path / field)
