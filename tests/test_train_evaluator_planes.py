"""Validation (bonejax/train/evaluators/planes.py): its loss is the loss of the whole validation set.

A region loss over several batches is the loss of the set's pooled soft counts (a dataset
Jaccard), computed here in one call on all the batches at once; the confusion matrix is checked
against numpy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bonejax.train import losses
from bonejax.train.evaluators import planes as evaluator

K = 3


def _batches():
  rng = np.random.default_rng(0)
  out = []
  for i in range(3):
    image = rng.normal(size=(2, 8, 8, 1)).astype(np.float32)
    label = rng.integers(0, K if i else 2, size=(2, 8, 8)).astype(np.int32)  # class 2 absent once
    mask = (rng.random((2, 8, 8)) > 0.2).astype(np.float32)
    if i == 2:
      mask[1] = 0  # a padded example
    out.append({"image": image, "label": label, "mask": mask})
  return out


@pytest.mark.parametrize("spec", [{"jaccard": 1.0}, {"ce": 1.0, "dice": 1.0}])
def test_validation_loss_is_the_loss_of_the_whole_set(spec):
  model = nnx.Conv(1, K, (1, 1), rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  state = {"params": params, "rest": rest}
  loss_fn = losses.make_loss(spec)
  step = jax.jit(evaluator.make_eval_step(graphdef, loss_fn, K))
  batches = _batches()
  ev = evaluator.Evaluator(step, lambda: iter(batches), lambda b: jax.tree.map(jnp.asarray, b),
                           nbytes=1, max_device_bytes=1 << 20, classes=["a", "b", "c"],
                           replicated=None)
  got = ev(state)

  cat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  logits = np.asarray(model(jnp.asarray(cat["image"])))
  want = float(loss_fn(logits, cat["label"], cat["mask"])[0])
  np.testing.assert_allclose(got["loss"], want, rtol=1e-5)
  if "jaccard" in spec:  # the old pixel-weighted mean of per-batch values is another number
    old = sum(float(loss_fn(np.asarray(model(jnp.asarray(b["image"]))), b["label"],
                            b["mask"])[0]) * b["mask"].sum() for b in batches) / cat["mask"].sum()
    assert abs(old - want) > 1e-3
  pred = logits.argmax(-1)
  m = cat["mask"] > 0
  cm = np.zeros((K, K), np.int64)
  np.add.at(cm, (cat["label"][m], pred[m]), 1)
  inter = np.diag(cm)
  union = cm.sum(0) + cm.sum(1) - inter
  np.testing.assert_allclose(got["iou"], inter / union, rtol=1e-12)
