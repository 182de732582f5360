"""Pretrained starts (model.init_from, model.encoder_weights) and the encoder freeze.

- init_from a bundle is exactly the state at step 0 (every parameter and BatchNorm statistic);
  in the trainer, with freeze_encoder_steps=2, the encoder (and its Adam moments) still holds
  the bundle's values at step 2 while the decoder moved; stopped there and resumed WITHOUT the
  bundle on disk, the run ends in the uninterrupted run's state, bit for bit;
- init_from a .pth (a random smp U-Net/ResNet-18, torch.save) gives what convert_weights gives;
- encoder_weights from a torchvision ResNet-18 or a MiT-B0 state dict (random, torch.save; no
  download) lands in the encoder as smp's own `set_in_channels` puts it (the 3-channel stem
  summed for 1 channel, tiled and scaled for 5);
- mismatches (architecture, arguments, classes, channels, wrong encoder, ...) are one line.
The PyTorch parts need the `dev` extra (skipped without it, except in CI).
"""

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from bonejax import models
from bonejax.core import errors
from bonejax.models import bundle
from bonejax.train import pretrained, trainer
from bonejax.train.checkpoint import load_state
from train_helpers import smoke_config

CLASSES = ["background", "bone", "pore"]
TINY = dict(depth=2, width=4)


@functools.lru_cache(maxsize=None)
def _abstract(name, in_channels=1, classes=3, **kwargs):
  return nnx.eval_shape(lambda: models.create(name, num_classes=classes, in_channels=in_channels,
                                              rngs=nnx.Rngs(0), **kwargs))


def _weights(model_cfg, name="unet", kwargs=None, in_channels=1, context=0, classes=CLASSES,
             normalization="percentile"):
  kwargs = TINY if kwargs is None and name == "unet" else (kwargs or {})
  return pretrained.initial_weights(
      ml_collections.ConfigDict(model_cfg), abstract=_abstract(name, in_channels, **kwargs),
      model_name=name, model_kwargs=kwargs, classes=list(classes), in_channels=in_channels,
      context_slices=context, normalization=normalization)


def _flat(model):
  return {pretrained.path_key(p): np.asarray(v[...])
          for p, v in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))}


def _random_bundle(path, seed=7, classes=CLASSES, kwargs=TINY, in_channels=1, context=0):
  """A bundle with random weights and random BatchNorm statistics (a trained model's are not
  the initial 0 / 1)."""
  model = models.create("unet", num_classes=len(classes), in_channels=in_channels,
                        rngs=nnx.Rngs(seed), **kwargs)
  rng = np.random.default_rng(seed)
  for _, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat)):
    v[...] = jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype)
  meta = bundle.make_meta(model_name="unet", model_kwargs=kwargs, classes=list(classes),
                          in_channels=in_channels, normalization="percentile", patch_size=32,
                          train_axes=[0], context_slices=context)
  bundle.save_bundle(path, model, meta)
  return path


def _stored(tree):
  """{'a/b/c': array} of a stored (plain dict) pytree, without orbax's trailing 'value'."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    out["/".join(keys[:-1] if keys[-1] == "value" else keys)] = np.asarray(leaf)
  return out


# ---------------------------------------------------------------------------------------------
# init_from a bundle; the freeze; resume.
# ---------------------------------------------------------------------------------------------


def test_init_from_bundle_is_the_state_at_step_0(tmp_path):
  b = _random_bundle(tmp_path / "b")
  weights = _weights({"init_from": str(b)})
  create = functools.partial(models.create, "unet", num_classes=3, in_channels=1, **TINY)
  state = jax.jit(trainer.make_init(create, optax.adam(1e-3), 0))(weights)
  want = _flat(bundle.load_bundle(b).model)
  got = {**_stored(state["params"]), **_stored(nnx.filter_state(state["rest"], nnx.BatchStat))}
  assert sorted(got) == sorted(want) and len(want) > 20
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _config(dataset, **overrides):
  # A checkpoint at every evaluation (every 2 steps).
  return smoke_config(dataset, **{"checkpoint_every": 2, **overrides})


def test_fine_tune_freezes_the_encoder_then_resumes_exactly(tiny_dataset, tmp_path):
  b = _random_bundle(tmp_path / "b")
  start = _flat(bundle.load_bundle(b).model)
  ft = {"model.init_from": str(b), "model.freeze_encoder_steps": 2}
  ref = trainer.train(_config(tiny_dataset, **ft), tmp_path / "ref")
  first = trainer.train(_config(tiny_dataset, stop_after=2, **ft), tmp_path / "run")
  assert first["steps"] == 2 and ref["steps"] == 4
  _, at2 = load_state(tmp_path / "run")
  params, opt = _stored(at2["params"]), _stored(at2["opt"])
  moments = {k: v for k, v in opt.items() if k.split("/")[0] in ("mu", "nu")}
  enc = [k for k in params if pretrained.is_encoder(k.split("/"))]
  dec = [k for k in params if not pretrained.is_encoder(k.split("/"))]
  assert enc and dec and any(k.startswith("down/") for k in enc)
  for k in enc:  # frozen: the bundle's values, Adam's moments untouched (still 0)
    np.testing.assert_array_equal(params[k], start[k], err_msg=k)
    assert not moments[f"mu/{k}"].any() and not moments[f"nu/{k}"].any(), k
  assert all(not np.array_equal(params[k], start[k]) for k in dec)
  assert all(moments[f"nu/{k}"].any() for k in dec)
  # The start is read at step 0 only: the resumed run does not need the bundle any more.
  shutil.move(b, tmp_path / "gone")
  second = trainer.train(_config(tiny_dataset, **ft), tmp_path / "run")
  assert second["resumed_from"] == 2 and second["steps"] == 4
  _, final = load_state(tmp_path / "run")
  _, want = load_state(tmp_path / "ref")
  for x, y in zip(jax.tree.leaves(final), jax.tree.leaves(want)):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(_stored(final["params"])[k], start[k]) for k in enc)
  meta = json.loads((tmp_path / "run/model/model.json").read_text())
  assert meta["model"] == "unet" and meta["in_channels"] == 1 and meta["context_slices"] == 0


@pytest.mark.parametrize("model_cfg, kw, message", [
    ({"init_from": "/nonexistent/bundle"}, {}, "model.init_from='/nonexistent/bundle' does not "
     "exist"),
    ({"init_from": "B", "encoder_weights": "B"}, {}, "both given"),
    ({"freeze_encoder_steps": -1}, {}, "freeze_encoder_steps=-1 must be an integer >= 0"),
    ({"init_from": "B"}, {"name": "unet_resnet18", "kwargs": {}},
     "is a unet model; the config trains unet_resnet18"),
    ({"init_from": "B"}, {"kwargs": dict(depth=2, width=8)}, r"model arguments \{.*\}; the "
     r"config has \{.*\"width\": 8\}"),
    ({"init_from": "B"}, {"classes": ["background", "bone"]}, "has 3 classes; the dataset has "
     "2 .background, bone."),
    ({"init_from": "B"}, {"in_channels": 3, "context": 1}, r"takes 1 input channel\(s\); this run "
     "feeds 3"),
    ({"encoder_weights": "B"}, {}, "model 'unet' has no ResNet or MiT encoder"),
])
def test_mismatches_are_one_line(tmp_path, model_cfg, kw, message):
  b = str(_random_bundle(tmp_path / "b"))
  model_cfg = {k: (b if v == "B" else v) for k, v in model_cfg.items()}
  with pytest.raises(errors.UserError, match=message) as e:
    _weights(model_cfg, **kw)
  assert "\n" not in str(e.value)


def test_trainer_refuses_a_bad_start_leaving_nothing(tiny_dataset, tmp_path):
  b = _random_bundle(tmp_path / "b", classes=["background", "bone"])
  with pytest.raises(errors.UserError, match="has 2 classes; the dataset has 3"):
    trainer.train(_config(tiny_dataset, **{"model.init_from": str(b)}), tmp_path / "new/run")
  assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------------
# PyTorch files: a whole smp model, ImageNet encoders.
# ---------------------------------------------------------------------------------------------


def test_init_from_pth_equals_convert_weights(tmp_path):
  from smp_reference import random_smp, require
  torch = require("torch")
  from bonejax import convert
  net, _, _ = random_smp("unet_resnet18")
  torch.save(net.state_dict(), tmp_path / "m.pth")
  got = _weights({"init_from": str(tmp_path / "m.pth")}, name="unet_resnet18",
                 normalization="zscore")
  convert.import_weights(tmp_path / "m.pth", tmp_path / "converted")
  want = _flat(bundle.load_bundle(tmp_path / "converted").model)
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # Mismatches, one line each.
  with pytest.raises(errors.UserError, match="has no segmentation_models_pytorch counterpart"):
    _weights({"init_from": str(tmp_path / "m.pth")})
  with pytest.raises(errors.UserError, match="has 3 classes; the dataset has 4"):
    _weights({"init_from": str(tmp_path / "m.pth")}, name="unet_resnet18",
             classes=CLASSES + ["implant"])
  narrow, _, _ = random_smp("unet_resnet18", decoder_channels=(128, 64, 32, 16, 8))
  torch.save(narrow.state_dict(), tmp_path / "narrow.pth")
  with pytest.raises(errors.UserError, match=r"do not fit unet_resnet18 .*decoder.*has shape"):
    _weights({"init_from": str(tmp_path / "narrow.pth")}, name="unet_resnet18")


def _randomise(torch, net, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for t in net.state_dict().values():
      if t.is_floating_point():
        t.copy_(torch.rand(t.shape, generator=g) + 0.5)
  return net


@pytest.mark.parametrize("name, in_channels", [("unet_resnet18", 1), ("unet_resnet18", 5),
                                               ("segformer_b0", 1)])
def test_encoder_weights_land_as_smp_puts_them(tmp_path, name, in_channels):
  from smp_reference import build_smp, require
  torch = require("torch")
  from bonejax.convert import smp_layout
  if name == "unet_resnet18":  # torchvision's ImageNet ResNet-18 layout, classifier included
    torchvision = require("torchvision")
    source = _randomise(torch, torchvision.models.resnet18(weights=None), 1).state_dict()
  else:  # MiT-B0 as published for SegFormer, with its ImageNet classifier
    source = dict(_randomise(torch, build_smp(name, in_channels=3).encoder, 1).state_dict())
    source["head.weight"], source["head.bias"] = torch.zeros(1000, 256), torch.zeros(1000)
  torch.save(source, tmp_path / "enc.pth")
  got = pretrained.encoder_weights(str(tmp_path / "enc.pth"), abstract=_abstract(
      name, in_channels), model_name=name, in_channels=in_channels)
  # smp's own path: pretrained weights into a 3-channel encoder, then set_in_channels.
  ref = build_smp(name, in_channels=3)
  ref.encoder.load_state_dict({k: v for k, v in source.items()
                               if not k.startswith(("fc.", "head."))})
  ref.encoder.set_in_channels(in_channels, pretrained=True)
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  entries, _ = smp_layout.layout(name, _abstract(name, in_channels))
  enc = [e for e in entries if e.key.startswith("encoder.")]
  assert sorted(got) == sorted(pretrained.path_key(e.path) for e in enc)
  assert all(pretrained.is_encoder(e.path) for e in enc)
  for e in enc:
    np.testing.assert_allclose(got[pretrained.path_key(e.path)], smp_layout.to_flax(sd[e.key]),
                               rtol=1e-6, atol=1e-7, err_msg=e.key)
  stem = smp_layout.stem_key(name)
  if in_channels == 1:  # the ImageNet stem summed over its three colours
    summed = source[stem[len("encoder."):]].numpy().sum(1, keepdims=True)
    entry = next(e for e in enc if e.key == stem)
    np.testing.assert_allclose(got[pretrained.path_key(entry.path)],
                               smp_layout.to_flax(summed), rtol=1e-6)


def test_a_wrong_encoder_is_one_line(tmp_path):
  from smp_reference import require
  torch = require("torch")
  torchvision = require("torchvision")
  torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
  with pytest.raises(errors.UserError, match=r"is not a resnet18 encoder's state dict \(\d+ "
                     r"unexpected key\(s\): layer1.2"):
    pretrained.encoder_weights(str(tmp_path / "r34.pth"), abstract=_abstract("unet_resnet18"),
                               model_name="unet_resnet18", in_channels=1)
