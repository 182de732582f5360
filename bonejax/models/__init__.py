"""The model zoo: segmentation networks by name (Flax NNX, NHWC).

    model = bonejax.models.create("unet_resnet18", num_classes=3, in_channels=1,
                                  rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    logits = model(x)          # x (B, H, W, in_channels), H and W multiples of STRIDE
    model.eval()               # BatchNorm uses running stats (and dropout is off) ...
    model.train()              # ... or batch stats, updating the running ones; same weights

Models are created in train mode (the NNX default). Logits are float32 whatever `dtype` (the
compute dtype) is; parameters are `param_dtype`. Every model accepts any H, W that are multiples of
STRIDE = 32; pad other planes with `pad_to_multiple` and cut the logits back with `crop_to`.

Layouts follow segmentation_models_pytorch (smp), which BONe trains, so parameter counts match it
exactly. BatchNorm uses PyTorch's momentum 0.1 (Flax momentum=0.9) and eps 1e-5. Two models are
stochastic in train mode, as in smp: DeepLabV3+ (ASPP dropout 0.5) and SegFormer (stochastic depth
up to 0.1). They draw from streams forked at construction from the `dropout` (else `default`)
stream of `rngs`, held in the model as `nnx.RngState`: a jitted train step that splits the model
must carry that state out along with `nnx.BatchStat` (orbax saves it like any other state).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import jax.numpy as jnp
from flax import nnx

from bonejax.models.utils import (abstract_model, count_params, crop_to, fill_from_numpy,
                                  forward_gflops, pad_to_multiple)

STRIDE = 32

# name -> (module, class, fixed arguments). Modules are imported on first use.
_REGISTRY: dict[str, tuple[str, str, dict[str, Any]]] = {
    "unet": ("unet", "UNet", {}),
    "unet_resnet18": ("unet_resnet", "UnetResNet", {"encoder": "resnet18"}),
    "unet_resnet34": ("unet_resnet", "UnetResNet", {"encoder": "resnet34"}),
    "unet_resnet50": ("unet_resnet", "UnetResNet", {"encoder": "resnet50"}),
    "unetpp_resnet18": ("unetpp", "UnetPlusPlusResNet", {"encoder": "resnet18"}),
    "unetpp_resnet34": ("unetpp", "UnetPlusPlusResNet", {"encoder": "resnet34"}),
    "unetpp_resnet50": ("unetpp", "UnetPlusPlusResNet", {"encoder": "resnet50"}),
    "deeplabv3plus_resnet18": ("deeplabv3plus", "DeepLabV3PlusResNet", {"encoder": "resnet18"}),
    "deeplabv3plus_resnet34": ("deeplabv3plus", "DeepLabV3PlusResNet", {"encoder": "resnet34"}),
    "deeplabv3plus_resnet50": ("deeplabv3plus", "DeepLabV3PlusResNet", {"encoder": "resnet50"}),
    "segformer_b0": ("segformer", "SegFormer", {}),
    "unet_mit_b0": ("unet_mit", "UnetMiT", {}),
    # 3D (NDHWC input, `spatial_dims(name) == 3`): segmentation_models_pytorch_3d's Unet and a
    # classic 3D U-Net.
    "unet3d": ("unet", "UNet3d", {}),
    "unet3d_resnet18": ("unet_resnet", "UnetResNet3d", {"encoder": "resnet18"}),
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)

__all__ = ["MODEL_NAMES", "STRIDE", "abstract_model", "count_params", "create", "crop_to",
           "fill_from_numpy",
           "forward_gflops", "model_class", "pad_to_multiple", "spatial_dims"]


def model_class(name: str) -> tuple[type, dict[str, Any]]:
  """The class behind `name` and the arguments the name fixes (e.g. the encoder)."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
  module, cls, fixed = _REGISTRY[name]
  return getattr(importlib.import_module(f"bonejax.models.{module}"), cls), dict(fixed)


def spatial_dims(name: str) -> int:
  """3 for volumetric models (input (B, D, H, W, C)), 2 for the plane models (B, H, W, C)."""
  return int(getattr(model_class(name)[0], "spatial_dims", 2))


def create(name: str, *, num_classes: int, in_channels: int = 1, rngs: nnx.Rngs,
           dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, **kwargs) -> nnx.Module:
  """Builds model `name`; `kwargs` are the model's own arguments (e.g. `depth`, `width`).

  Raises ValueError for an unknown name (listing the known ones), for an argument the model does
  not take (listing the ones it does), and for bad argument values.
  """
  cls, fixed = model_class(name)
  params = inspect.signature(cls.__init__).parameters
  allowed = sorted(p for p in params
                   if p not in ("self", "num_classes", "in_channels", "dtype", "param_dtype",
                                "rngs") and p not in fixed)
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise ValueError(f"model {name!r} does not take argument(s) {', '.join(unknown)}; "
                     f"it takes: {', '.join(allowed) or 'none'}")
  if int(num_classes) < 1 or int(in_channels) < 1:
    raise ValueError(f"num_classes and in_channels must be >= 1, got {num_classes}, "
                     f"{in_channels}")
  dtype, param_dtype = jnp.dtype(dtype).type, jnp.dtype(param_dtype).type
  return cls(int(num_classes), int(in_channels), dtype=dtype, param_dtype=param_dtype,
             rngs=rngs, **fixed, **kwargs)
