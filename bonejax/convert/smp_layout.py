"""How bonejax's zoo lines up with segmentation_models_pytorch (smp) state dicts, both ways.

bonejax's ResNet, U-Net, UNet++, DeepLabV3+ and MiT modules follow smp's layout one to one, so
every parameter and BatchNorm statistic has exactly one smp key. The names differ and so do the
axis orders (flax conv kernels are (kh, kw, in, out), torch's (out, in, kh, kw); flax linear
kernels are (in, out), torch's (out, in)). A small table of path rules per architecture family
turns a bonejax state path into its smp key; the set of keys a checkpoint must have is derived
from the bonejax model itself, so nothing here needs torch or smp, and a checkpoint fits an
architecture exactly when the two key sets (and every shape) agree.

smp adds `num_batches_tracked` to each BatchNorm: ignored on import (eval mode does not use it),
written as int64 0 on export so `load_state_dict(strict=True)` finds every key.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable

import numpy as np

from bonejax.core import errors
from bonejax.convert import smp3d_layout

# bonejax model name -> (smp class, smp encoder_name)
SMP_ARCHS: dict[str, tuple[str, str]] = {
    **{f"unet_{e}": ("Unet", e) for e in ("resnet18", "resnet34", "resnet50")},
    **{f"unetpp_{e}": ("UnetPlusPlus", e) for e in ("resnet18", "resnet34", "resnet50")},
    **{f"deeplabv3plus_{e}": ("DeepLabV3Plus", e) for e in ("resnet18", "resnet34", "resnet50")},
    "segformer_b0": ("Segformer", "mit_b0"),
    "unet_mit_b0": ("Unet", "mit_b0"),
}
BY_SMP = {v: k for k, v in SMP_ARCHS.items()}
# Every convertible model: smp's (2D) and smp-3d's (3D, `smp3d_layout`: the same keys, 5-d kernels).
CONVERTIBLE: dict[str, tuple[str, str]] = {**SMP_ARCHS, **smp3d_layout.SMP3D_ARCHS}

_LEAVES = {"kernel": "weight", "bias": "bias", "scale": "weight", "mean": "running_mean",
           "var": "running_var"}
NUM_BATCHES = "num_batches_tracked"

Rule = tuple[re.Pattern, Callable[[re.Match], str]]


def _rule(pattern: str, fmt: Callable[[re.Match], str]) -> Rule:
  return re.compile(pattern), fmt


def _up(m: re.Match, i: int) -> int:
  return int(m[i]) + 1  # smp numbers stages from 1


_RESNET = [
    _rule(r"encoder\.stem\.conv", lambda m: "encoder.conv1"),
    _rule(r"encoder\.stem\.bn", lambda m: "encoder.bn1"),
    _rule(r"encoder\.stages\.(\d+)\.(\d+)\.downsample\.conv",
          lambda m: f"encoder.layer{_up(m, 1)}.{m[2]}.downsample.0"),
    _rule(r"encoder\.stages\.(\d+)\.(\d+)\.downsample\.bn",
          lambda m: f"encoder.layer{_up(m, 1)}.{m[2]}.downsample.1"),
    _rule(r"encoder\.stages\.(\d+)\.(\d+)\.((?:conv|bn)\d)",
          lambda m: f"encoder.layer{_up(m, 1)}.{m[2]}.{m[3]}"),
]


def _mit(prefix: str) -> list[Rule]:
  p = re.escape(prefix)
  return [
      _rule(p + r"stages\.(\d)\.embed", lambda m: f"encoder.patch_embed{_up(m, 1)}.proj"),
      _rule(p + r"stages\.(\d)\.embed_norm", lambda m: f"encoder.patch_embed{_up(m, 1)}.norm"),
      _rule(p + r"stages\.(\d)\.norm", lambda m: f"encoder.norm{_up(m, 1)}"),
      _rule(p + r"stages\.(\d)\.blocks\.(\d+)\.attn\.reduce",
            lambda m: f"encoder.block{_up(m, 1)}.{m[2]}.attn.sr"),
      _rule(p + r"stages\.(\d)\.blocks\.(\d+)\.mlp\.dwconv",
            lambda m: f"encoder.block{_up(m, 1)}.{m[2]}.mlp.dwconv.dwconv"),
      _rule(p + r"stages\.(\d)\.blocks\.(\d+)\.(norm1|norm2|attn\.(?:q|kv|proj|norm)|mlp\.fc[12])",
            lambda m: f"encoder.block{_up(m, 1)}.{m[2]}.{m[3]}"),
  ]


_UNET = [  # U-Net and UNet++ decoder blocks: Conv2dReLU = Sequential(conv, bn, relu)
    _rule(r"blocks\.(\w+)\.(conv[12])\.conv", lambda m: f"decoder.blocks.{m[1]}.{m[2]}.0"),
    _rule(r"blocks\.(\w+)\.(conv[12])\.bn", lambda m: f"decoder.blocks.{m[1]}.{m[2]}.1"),
]
_DEEPLAB = [
    _rule(r"aspp\.branch1x1\.conv", lambda m: "decoder.aspp.0.convs.0.0"),
    _rule(r"aspp\.branch1x1\.bn", lambda m: "decoder.aspp.0.convs.0.1"),
    _rule(r"aspp\.atrous\.(\d)\.conv\.depthwise", lambda m: f"decoder.aspp.0.convs.{_up(m, 1)}.0.0"),
    _rule(r"aspp\.atrous\.(\d)\.conv\.pointwise", lambda m: f"decoder.aspp.0.convs.{_up(m, 1)}.0.1"),
    _rule(r"aspp\.atrous\.(\d)\.bn", lambda m: f"decoder.aspp.0.convs.{_up(m, 1)}.1"),
    _rule(r"aspp\.pool\.conv", lambda m: "decoder.aspp.0.convs.4.1"),  # 0: avg pool
    _rule(r"aspp\.pool\.bn", lambda m: "decoder.aspp.0.convs.4.2"),
    _rule(r"aspp\.project\.conv", lambda m: "decoder.aspp.0.project.0"),
    _rule(r"aspp\.project\.bn", lambda m: "decoder.aspp.0.project.1"),
    _rule(r"aspp_conv\.conv\.depthwise", lambda m: "decoder.aspp.1.0"),
    _rule(r"aspp_conv\.conv\.pointwise", lambda m: "decoder.aspp.1.1"),
    _rule(r"aspp_conv\.bn", lambda m: "decoder.aspp.2"),
    _rule(r"skip\.conv", lambda m: "decoder.block1.0"),
    _rule(r"skip\.bn", lambda m: "decoder.block1.1"),
    _rule(r"fuse\.conv\.depthwise", lambda m: "decoder.block2.0.0"),
    _rule(r"fuse\.conv\.pointwise", lambda m: "decoder.block2.0.1"),
    _rule(r"fuse\.bn", lambda m: "decoder.block2.1"),
]
_SEGFORMER = [
    _rule(r"mlps\.(\d)", lambda m: f"decoder.mlp_stage.{m[1]}.linear"),
    _rule(r"fuse\.conv", lambda m: "decoder.fuse_stage.0"),
    _rule(r"fuse\.bn", lambda m: "decoder.fuse_stage.1"),
]
_HEAD = [_rule(r"head", lambda m: "segmentation_head.0")]


def rules(name: str) -> list[Rule]:
  smp_class, encoder = smp_arch(name)
  if encoder.startswith("mit"):
    enc = _mit("" if smp_class == "Segformer" else "encoder.")
  else:
    enc = _RESNET
  dec = {"Unet": _UNET, "UnetPlusPlus": _UNET, "DeepLabV3Plus": _DEEPLAB,
         "Segformer": _SEGFORMER}[smp_class]
  return enc + dec + _HEAD


def smp_arch(name: str) -> tuple[str, str]:
  if name not in CONVERTIBLE:
    raise errors.UserError(f"model {name!r} has no segmentation_models_pytorch counterpart; "
                        f"convertible models: {', '.join(CONVERTIBLE)}")
  return CONVERTIBLE[name]


def package(name: str) -> str:
  """The Python package whose class `smp_arch(name)` names."""
  return smp3d_layout.PACKAGE if name in smp3d_layout.SMP3D_ARCHS else \
      "segmentation_models_pytorch"


def kernel_ndim(name: str) -> int:
  """Rank of the model's conv kernels in torch: 5 for smp-3d (Conv3d), 4 for smp."""
  return 5 if name in smp3d_layout.SMP3D_ARCHS else 4


def recognise_name(sd: dict[str, np.ndarray]) -> str:
  """The bonejax model of an smp or smp-3d state dict; `errors.UserError` when none fits."""
  family, encoder = recognise(sd)
  if not smp3d_layout.is_3d(sd):
    return BY_SMP[(family, encoder)]
  if (family, encoder) not in smp3d_layout.BY_SMP3D:
    known = ", ".join(f"{c}({e})" for c, e in smp3d_layout.BY_SMP3D)
    raise errors.UserError(f"the weights are an smp-3d {family} with {encoder} (5-d kernels), "
                           f"which bonejax does not have; convertible 3D: {known}")
  return smp3d_layout.BY_SMP3D[(family, encoder)]


@dataclasses.dataclass(frozen=True)
class Entry:
  path: tuple[Any, ...]  # bonejax state path
  key: str  # smp state-dict key
  flax_shape: tuple[int, ...]

  @property
  def torch_shape(self) -> tuple[int, ...]:
    s = self.flax_shape
    if len(s) == 5:
      return (s[4], s[3], s[0], s[1], s[2])
    if len(s) == 4:
      return (s[3], s[2], s[0], s[1])
    if len(s) == 2:
      return (s[1], s[0])
    return s


def to_torch(a: np.ndarray) -> np.ndarray:
  if a.ndim == 5:  # (kd, kh, kw, in, out) -> (out, in, kd, kh, kw)
    return np.ascontiguousarray(a.transpose(4, 3, 0, 1, 2))
  if a.ndim == 4:  # (kh, kw, in, out) -> (out, in, kh, kw)
    return np.ascontiguousarray(a.transpose(3, 2, 0, 1))
  if a.ndim == 2:  # (in, out) -> (out, in)
    return np.ascontiguousarray(a.T)
  return np.asarray(a)


def to_flax(t: np.ndarray) -> np.ndarray:
  if t.ndim == 5:
    return np.ascontiguousarray(t.transpose(2, 3, 4, 1, 0))
  if t.ndim == 4:
    return np.ascontiguousarray(t.transpose(2, 3, 1, 0))
  if t.ndim == 2:
    return np.ascontiguousarray(t.T)
  return np.asarray(t)


def _path_str(path: Iterable[Any]) -> str:
  return ".".join(str(getattr(k, "key", k)) for k in path)


def weight_paths(model: Any) -> list[tuple[tuple[Any, ...], Any]]:
  """(path, variable) of every parameter and BatchNorm statistic (what a checkpoint holds)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel  # keeps `import` light for the CLI
  state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
  return [(tuple(path), var) for path, var in nnx.to_flat_state(state)]


def layout(name: str, model: Any) -> tuple[list[Entry], list[str]]:
  """Entries for every weight of `model` (abstract or concrete) and the smp BatchNorm modules."""
  table = rules(name)
  entries, bns = [], []
  for path, leaf in weight_paths(model):
    module, leafname = _path_str(path[:-1]), str(path[-1])
    key = None
    for rx, fmt in table:
      m = rx.fullmatch(module)
      if m:
        key = f"{fmt(m)}.{_LEAVES[leafname]}"
        break
    if key is None:
      raise RuntimeError(f"{name}: no smp name for bonejax weight {module}.{leafname}")
    entries.append(Entry(path, key, tuple(int(s) for s in leaf.shape)))
    if leafname == "mean":
      bns.append(key.rsplit(".", 1)[0])
  keys = [e.key for e in entries]
  if len(set(keys)) != len(keys):
    raise RuntimeError(f"{name}: two bonejax weights map to one smp key")
  return entries, bns


# ---------------------------------------------------------------------------------------------
# Recognising an architecture from the keys of a state dict.
# ---------------------------------------------------------------------------------------------

_PREFIXES = ("module.", "_orig_mod.", "model.", "net.")  # DataParallel/DDP, torch.compile, wrappers


def strip_prefixes(sd: dict[str, Any]) -> dict[str, Any]:
  """Drops a wrapper prefix that every key carries (e.g. `module.` from DistributedDataParallel)."""
  changed = True
  while changed and sd:
    changed = False
    for p in _PREFIXES:
      if all(k.startswith(p) for k in sd):
        sd = {k[len(p):]: v for k, v in sd.items()}
        changed = True
  return sd


def _count(keys: set[str], pattern: str) -> int:
  rx = re.compile(pattern)
  return len({m[1] for k in keys for m in [rx.match(k)] if m})


def recognise(sd: dict[str, np.ndarray]) -> tuple[str, str]:
  """(smp class, encoder name) from the keys; `errors.UserError` when they look like neither."""
  keys = set(sd)
  if any(k.startswith("decoder.mlp_stage.") for k in keys):
    family = "Segformer"
  elif any(k.startswith("decoder.aspp.") for k in keys):
    family = "DeepLabV3Plus"
  elif any(k.startswith("decoder.blocks.x_0_0.") for k in keys):
    family = "UnetPlusPlus"
  elif any(k.startswith("decoder.blocks.0.") for k in keys):
    family = "Unet"
  else:
    sample = ", ".join(sorted(keys)[:3])
    raise errors.UserError(f"the weights are not a segmentation_models_pytorch Unet, UnetPlusPlus, "
                        f"DeepLabV3Plus or Segformer (keys such as {sample}); give --arch")
  if "encoder.patch_embed1.proj.weight" in keys:
    dim = int(np.shape(sd["encoder.patch_embed1.proj.weight"])[0])
    depth = _count(keys, r"encoder\.block3\.(\d+)\.")
    encoder = "mit_b0" if (dim, depth) == (32, 2) else f"mit (dim {dim}, {depth} blocks)"
  elif "encoder.conv1.weight" in keys:
    bottleneck = "encoder.layer1.0.conv3.weight" in keys
    blocks = _count(keys, r"encoder\.layer3\.(\d+)\.")
    encoder = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50"}.get(
        (bottleneck, blocks), f"a ResNet with {blocks} blocks in layer3")
  else:
    encoder = "an unknown encoder"
  if (family, encoder) not in BY_SMP:
    known = ", ".join(f"{c}({e})" for c, e in BY_SMP)
    raise errors.UserError(f"the weights are an smp {family} with {encoder}, which bonejax does not "
                        f"have; convertible: {known}")
  return family, encoder


def infer_kwargs(name: str, sd: dict[str, np.ndarray]) -> dict[str, Any]:
  """Model arguments visible in the weights that differ from the defaults (decoder widths)."""
  family, _ = smp_arch(name)

  def out(key: str) -> int | None:
    return int(np.shape(sd[key])[0]) if key in sd else None

  if family in ("Unet", "UnetPlusPlus"):
    node = (lambda i: f"decoder.blocks.{i}.conv2.0.weight") if family == "Unet" else (
        lambda i: f"decoder.blocks.x_0_{i}.conv2.0.weight")
    chans = [out(node(i)) for i in range(5)]
    if None not in chans and tuple(chans) != (256, 128, 64, 32, 16):
      return {"decoder_channels": chans}
  elif family == "DeepLabV3Plus":
    c = out("decoder.aspp.0.project.0.weight")
    if c is not None and c != 256:
      return {"decoder_channels": c}
  elif family == "Segformer":
    c = out("decoder.mlp_stage.0.linear.weight")
    if c is not None and c != 256:
      return {"decoder_channels": c}
  return {}


def head_key(name: str) -> str:
  del name  # every smp model in the zoo names its head alike
  return "segmentation_head.0.weight"


def stem_key(name: str) -> str:
  return "encoder.patch_embed1.proj.weight" if smp_arch(name)[1].startswith("mit") \
      else "encoder.conv1.weight"
