"""segmentation_models_pytorch_3d (smp-3d) in the converter: the 3D models BONe's DLFit trains.

smp-3d 1.0.2 builds its networks as smp does, with Conv3d / BatchNorm3d in place of the 2D
layers, so its state-dict keys are smp's keys, one for one (`encoder.conv1.weight`,
`decoder.blocks.0.conv1.0.weight`, `segmentation_head.0.weight`, ...). Only the conv kernels
differ: 5-d, torch (out, in, kd, kh, kw) against flax (kd, kh, kw, in, out). bonejax's 3D models
keep the 2D modules' attribute names, so `smp_layout`'s path rules serve them unchanged; this
module names which bonejax models are smp-3d ones and tells a 3D state dict from a 2D one (the
rank of the stem kernel: the keys alone cannot).
"""

from __future__ import annotations

import numpy as np

PACKAGE = "segmentation_models_pytorch_3d"

# bonejax model name -> (smp-3d class, encoder_name)
SMP3D_ARCHS: dict[str, tuple[str, str]] = {
    "unet3d_resnet18": ("Unet", "resnet18"),
}
BY_SMP3D = {v: k for k, v in SMP3D_ARCHS.items()}

# Keys whose rank tells the network's dimensionality: the stems of every smp encoder family.
_STEMS = ("encoder.conv1.weight", "encoder.patch_embed1.proj.weight")


def is_3d(sd: dict) -> bool:
  """True when the state dict's stem kernel is 5-d (Conv3d)."""
  for key in _STEMS:
    if key in sd:
      return len(np.shape(sd[key])) == 5
  return False
