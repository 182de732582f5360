"""bonejax's zoo against segmentation_models_pytorch itself: for every architecture BONe trains,
random smp weights (BatchNorm statistics and LayerNorms randomised too) -> bonejax gives smp's
logits (eval mode, float32) within 1e-4, and bonejax -> smp gives the very same state dict."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bonejax import models
from bonejax.convert import smp_layout, weights
from smp_reference import random_smp, require

torch, smp = require("torch", "segmentation_models_pytorch")

ATOL = 1e-4


def _numpy_sd(net):
  return {k: v.detach().numpy() for k, v in net.state_dict().items()}


def _forward(model, x_nchw):
  graphdef, state = nnx.split(model)
  out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(
      x_nchw.numpy().transpose(0, 2, 3, 1)))
  return np.asarray(out).transpose(0, 3, 1, 2)


def _check(name, net, x, ref, model_kwargs=None):
  sd = _numpy_sd(net)
  model = weights.model_from_state_dict(name, sd, num_classes=ref.shape[1],
                                        in_channels=x.shape[1], model_kwargs=model_kwargs)
  entries, bns = smp_layout.layout(name, model)
  # The layout derived from the bonejax model is smp's state dict, key for key, shape for shape.
  assert {e.key for e in entries} | {f"{b}.num_batches_tracked" for b in bns} == set(sd)
  for e in entries:
    assert e.torch_shape == sd[e.key].shape, e.key
  assert models.count_params(model) == sum(p.numel() for p in net.parameters())

  out = _forward(model, x)
  assert out.shape == ref.shape
  err = float(np.abs(out - ref).max())
  assert err < ATOL, f"{name}: max abs logit difference {err:.2e} (logit std {ref.std():.2f})"

  back = weights.state_dict_from_model(name, model)
  assert set(back) == set(sd)
  for k, v in sd.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in back.items()}, strict=True)


@pytest.mark.parametrize("name", list(smp_layout.SMP_ARCHS))
def test_smp_weights_give_smp_logits_and_round_trip(name):
  _check(name, *random_smp(name))


def test_channels_classes_and_decoder_widths_are_read_from_the_weights():
  """A 2.5D-style 5-channel input, 2 classes and a narrower decoder, as DLFit may train."""
  name, channels = "unet_resnet18", (64, 32, 16, 16, 8)
  net, x, ref = random_smp(name, in_channels=5, classes=2, decoder_channels=channels)
  kwargs = smp_layout.infer_kwargs(name, _numpy_sd(net))
  assert kwargs == {"decoder_channels": list(channels)}
  _check(name, net, x, ref, kwargs)
