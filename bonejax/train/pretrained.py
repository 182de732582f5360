"""Pretrained starts: a whole trained model, or an ImageNet encoder; and the encoder's freeze.

- `model.init_from`: a bonejax bundle, or a `.pth` / `.safetensors` smp or DLFit file (e.g.
  BONe's BP-2D-03), gives every parameter and BatchNorm statistic of the model: fine-tuning on
  new scans. The file must be the configured network: the same architecture and model
  arguments (the layout of every tensor is checked), as many classes as the dataset and as many
  input channels as the run feeds (2k + 1 for 2.5D); each mismatch is one line.
- `model.encoder_weights`: a torchvision / timm ResNet or a MiT (SegFormer) state dict, the
  ImageNet-pretrained encoders BONe and volume-segmantics start from, fills the encoder only
  (an smp model's file gives its encoder too). Their classifier (`fc.*`, `head.*`) is ignored.
  A 3-channel stem is adapted to the run's input channels exactly as smp's `patch_first_conv`
  does: summed over the colours for 1 channel, else channel i = colour (i mod 3) scaled by
  3 / in_channels.
- `model.freeze_encoder_steps`: the encoder's parameters (`is_encoder`) get no update and their
  optimiser state does not move for the first N steps (volume-segmantics trains the decoder on
  a frozen pretrained encoder first). Their BatchNorm statistics still follow the data, as in
  PyTorch with `requires_grad=False` in train mode. Adam's step count is shared by all
  parameters, so once unfrozen the encoder's moments start from zero under a bias correction
  for step N (its first updates are larger than a fresh Adam's would be).

Files are read with bonejax.convert's allow-list reader: never a pickle executed, no torch.
All of this is the initial state of a run: a resumed run continues from its checkpoint and
never reads these files again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bonejax.core import errors, jsonable

# The top-level attribute holding each zoo model's encoder: ResNet / MiT encoders ("encoder"),
# SegFormer's MiT stages ("stages"), the classic U-Net's contracting path ("down").
ENCODER_ROOTS = ("encoder", "stages", "down")
CLASSIFIER_PREFIXES = ("fc.", "head.")  # ImageNet heads of torchvision/timm ResNets and MiT
_SHOW = 3


def path_key(path) -> str:
  """'a/b/0/c' for a state path: tuples of names (nnx flat state) or jax tree paths."""
  keys = [getattr(k, "key", k) for k in path
          if not isinstance(k, (jax.tree_util.GetAttrKey, jax.tree_util.SequenceKey))]
  return "/".join(str(k) for k in keys)


def is_encoder(path) -> bool:
  keys = path_key(path).split("/")
  return keys[0] in ENCODER_ROOTS


def overlay(tree: Any, values: dict[str, Any]) -> Any:
  """`tree` (params or the rest of a model's state) with the leaves `values` names replaced."""

  def put(path, leaf):
    v = values.get(path_key(path))
    return leaf if v is None else jax.numpy.asarray(v, leaf.dtype).reshape(leaf.shape)

  return jax.tree_util.tree_map_with_path(put, tree)


def freeze(new: Any, old: Any, frozen: jax.Array) -> Any:
  """`new` with every encoder leaf replaced by `old`'s while `frozen` (a traced bool). Works on
  the parameters and on any optimiser state that mirrors them (Adam's moments, SGD's trace):
  a leaf belongs to the encoder by its path below the optimiser's own structure."""

  def pick(path, n, o):
    return jax.numpy.where(frozen, o, n) if is_encoder(path) else n

  return jax.tree_util.tree_map_with_path(pick, new, old)


def _some(keys) -> str:
  keys = sorted(keys)
  return ", ".join(keys[:_SHOW]) + (f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else "")


def _flat_weights(model) -> dict[str, np.ndarray]:
  from bonejax.convert import smp_layout
  return {path_key(p): np.asarray(jax.device_get(v[...]), np.float32)
          for p, v in smp_layout.weight_paths(model)}


def _expected(abstract) -> dict[str, tuple]:
  from bonejax.convert import smp_layout
  return {path_key(p): tuple(v.shape) for p, v in smp_layout.weight_paths(abstract)}


def _same_kwargs(a: dict[str, Any], b: dict[str, Any]) -> bool:
  norm = lambda d: json.dumps(jsonable.to_jsonable(dict(d or {})), sort_keys=True)  # noqa: E731
  return norm(a) == norm(b)


def _family(rule: str | None) -> str | None:
  return None if rule is None else str(rule).split("_")[0]


# ---------------------------------------------------------------------------------------------
# The configured start.
# ---------------------------------------------------------------------------------------------


def check_config(model_cfg: Any) -> None:
  """One line for what can be refused before anything is read: both starts at once, a
  negative freeze. (The files are checked when a run starts from step 0: a resumed run does
  not need them.)"""
  init_from = str(model_cfg.get("init_from", "") or "")
  encoder = str(model_cfg.get("encoder_weights", "") or "")
  if init_from and encoder:
    raise errors.UserError("model.init_from and model.encoder_weights both given: init_from "
                        "already sets the encoder; give one of them")
  steps = model_cfg.get("freeze_encoder_steps", 0)
  if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
    raise errors.UserError(f"config.model.freeze_encoder_steps={steps!r} must be an integer >= 0")


def initial_weights(model_cfg: Any, *, abstract, model_name: str, model_kwargs: dict[str, Any],
                    classes: list[str], in_channels: int, context_slices: int,
                    normalization: str) -> dict[str, np.ndarray] | None:
  """{state path: array} to overlay on the freshly initialised model; None when the config
  names no pretrained start."""
  check_config(model_cfg)
  init_from = str(model_cfg.get("init_from", "") or "")
  encoder = str(model_cfg.get("encoder_weights", "") or "")
  for key, value in (("init_from", init_from), ("encoder_weights", encoder)):
    if value and not Path(value).exists():
      raise errors.UserError(f"model.{key}={value!r} does not exist")
  if init_from:
    return _whole_model(init_from, abstract=abstract, model_name=model_name,
                        model_kwargs=model_kwargs, classes=classes, in_channels=in_channels,
                        context_slices=context_slices, normalization=normalization)
  if encoder:
    return encoder_weights(encoder, abstract=abstract, model_name=model_name,
                           in_channels=in_channels)
  return None


def _whole_model(path: str, *, abstract, model_name, model_kwargs, classes, in_channels,
                 context_slices, normalization) -> dict[str, np.ndarray]:
  where = f"model.init_from={path!r}"
  p = Path(path)
  if p.is_dir():
    from bonejax.models import bundle
    meta = bundle.read_meta(p)
    name, kwargs = meta["model"], meta.get("model_kwargs", {})
    n_classes, n_in = len(meta["classes"]), int(meta.get("in_channels", 1))
    k, rule = int(meta.get("context_slices", 0) or 0), meta.get("normalization")
  else:
    from bonejax.convert import checkpoint, metadata, smp_layout
    ckpt = checkpoint.read(p)
    sd, info = ckpt.state_dict, metadata.interpret(ckpt.metadata)
    if model_name not in smp_layout.SMP_ARCHS:
      raise errors.UserError(f"{where} is a PyTorch file, and model {model_name!r} has no "
                          "segmentation_models_pytorch counterpart: init_from a bonejax bundle "
                          f"instead (smp models: {', '.join(smp_layout.SMP_ARCHS)})")
    try:
      name = smp_layout.BY_SMP[smp_layout.recognise(sd)]
    except errors.UserError as e:  # its "give --arch" is convert_weights.py's remedy, not ours
      raise errors.UserError(f"{where}: {str(e).removesuffix('; give --arch')}") from None
    kwargs = None  # the tensors' shapes below say whether the arguments fit
    for key in (smp_layout.head_key(name), smp_layout.stem_key(name)):
      if len(np.shape(sd.get(key))) != 4:
        raise errors.UserError(f"{where}: no 4-d {key} in the weights")
    n_classes = int(sd[smp_layout.head_key(name)].shape[0])
    n_in = int(sd[smp_layout.stem_key(name)].shape[1])
    k, rule = info.get("context_slices"), info.get("normalization")
  if name != model_name:
    raise errors.UserError(f"{where} is a {name} model; the config trains {model_name} "
                        "(set model.name and model.kwargs to the file's)")
  if kwargs is not None and not _same_kwargs(kwargs, model_kwargs):
    raise errors.UserError(f"{where} was built with model arguments {json.dumps(kwargs)}; the "
                        f"config has {json.dumps(jsonable.to_jsonable(dict(model_kwargs)))}")
  if n_classes != len(classes):
    raise errors.UserError(f"{where} has {n_classes} classes; the dataset has {len(classes)} "
                        f"({', '.join(classes)})")
  if n_in != in_channels:
    raise errors.UserError(f"{where} takes {n_in} input channel(s); this run feeds {in_channels} "
                        f"(context_slices={context_slices}: 2k + 1 planes for 2.5D)")
  if k is not None and int(k) != context_slices:
    raise errors.UserError(f"{where} is a {'2.5D' if k else '2D'} model (context_slices={k}); "
                        f"the config has context_slices={context_slices}")
  if rule is not None and _family(rule) != _family(normalization):
    errors.warn(f"{where} was trained with {rule} normalisation; this config normalises with "
             f"{normalization}")

  if p.is_dir():
    from bonejax.models import bundle
    values = _flat_weights(bundle.load_bundle(p).model)
  else:
    from bonejax.convert import weights
    try:
      model = weights.model_from_state_dict(name, sd, num_classes=n_classes,
                                            in_channels=n_in, model_kwargs=model_kwargs)
    except errors.UserError as e:
      raise errors.UserError(f"{where}: {e}") from None
    values = _flat_weights(model)
  want, got = _expected(abstract), {k: v.shape for k, v in values.items()}
  from bonejax.models import bundle
  why = bundle.shape_mismatch(got, want)
  if why:
    raise errors.UserError(f"{where} does not fit the configured {model_name}: {why}")
  return values


# ---------------------------------------------------------------------------------------------
# ImageNet encoders.
# ---------------------------------------------------------------------------------------------


def adapt_stem(weight: np.ndarray, in_channels: int) -> np.ndarray:
  """A 3-channel first convolution (out, 3, kh, kw) for `in_channels` inputs, as smp's
  `patch_first_conv` does with pretrained weights."""
  if in_channels == weight.shape[1]:
    return weight
  if in_channels == 1:
    return weight.sum(1, keepdims=True)
  idx = np.arange(in_channels) % weight.shape[1]
  return weight[:, idx] * (weight.shape[1] / in_channels)


def encoder_weights(path: str, *, abstract, model_name: str,
                    in_channels: int) -> dict[str, np.ndarray]:
  """{state path: array} of the encoder, from a torchvision / timm / MiT state dict."""
  from bonejax.convert import checkpoint, smp_layout
  where = f"model.encoder_weights={path!r}"
  if model_name not in smp_layout.SMP_ARCHS:
    raise errors.UserError(f"{where}: model {model_name!r} has no ResNet or MiT encoder "
                        f"(models with one: {', '.join(smp_layout.SMP_ARCHS)})")
  sd = checkpoint.read(path).state_dict
  if any(k.startswith("encoder.") for k in sd):  # an smp model (or its encoder): the encoder
    sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
  entries, _ = smp_layout.layout(model_name, abstract)
  want = {e.key[len("encoder."):]: e for e in entries if e.key.startswith("encoder.")}
  stem = smp_layout.stem_key(model_name)[len("encoder."):]
  ignored = lambda k: k.endswith(smp_layout.NUM_BATCHES) or k.startswith(  # noqa: E731
      CLASSIFIER_PREFIXES)
  missing = sorted(set(want) - set(sd))
  extra = sorted(k for k in set(sd) - set(want) if not ignored(k))
  smp_class, encoder = smp_layout.smp_arch(model_name)
  if missing or extra:
    parts = ([f"{len(missing)} missing key(s): {_some(missing)}"] if missing else []) + \
        ([f"{len(extra)} unexpected key(s): {_some(extra)}"] if extra else [])
    raise errors.UserError(f"{where} is not a {encoder} encoder's state dict ({'; '.join(parts)})")
  values = {}
  for key, e in want.items():
    t = np.asarray(sd[key], np.float32)
    if key == stem and t.ndim == 4 and t.shape[1] != in_channels:
      if t.shape[1] != 3:
        raise errors.UserError(f"{where}: its stem {key} takes {t.shape[1]} channels; a "
                            f"3-channel (ImageNet) stem or a {in_channels}-channel one is "
                            "needed")
      t = adapt_stem(t, in_channels)
    if tuple(t.shape) != e.torch_shape:
      raise errors.UserError(f"{where} is not a {encoder} encoder's state dict: {key} has shape "
                          f"{tuple(t.shape)}, {e.torch_shape} expected")
    values[path_key(e.path)] = smp_layout.to_flax(t)
  return values
