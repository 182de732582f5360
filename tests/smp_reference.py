"""The PyTorch originals the conversion tests compare against: torch and smp, or a skip.

The `dev` extra installs torch, torchvision and segmentation_models_pytorch. Where they are
missing, or broken (a torchvision built for another torch build raises RuntimeError, not
ImportError, at import), the tests that need them skip with the reason, except in CI (`CI` set),
where a broken install must fail loudly rather than skip every comparison.
"""

import importlib
import os

import numpy as np
import pytest


def require(*names):
  """The named modules, imported; skips the calling test module (or test) when one fails."""
  mods = []
  for name in names:
    try:
      mods.append(importlib.import_module(name))
    except Exception as e:  # pylint: disable=broad-except
      if os.environ.get("CI"):
        raise
      pytest.skip(f"{name} unavailable ({type(e).__name__}: {str(e)[:100]}); "
                  "pip install -e '.[dev]'", allow_module_level=True)
  return mods[0] if len(mods) == 1 else mods


def build_smp(name, **kwargs):
  """smp's model for a bonejax name, randomly initialised (no download)."""
  smp = require("segmentation_models_pytorch")
  from bonejax.convert import smp_layout  # pylint: disable=import-outside-toplevel
  smp_class, encoder = smp_layout.SMP_ARCHS[name]
  return getattr(smp, smp_class)(encoder_name=encoder, encoder_weights=None, **kwargs)


def random_smp(name, in_channels=1, classes=3, seed=0, side=64, **kwargs):
  """(smp model in eval mode with every weight and statistic random, an input, its logits).

  BatchNorm statistics and affines, LayerNorm affines and biases are random, as in a trained
  model (smp initialises them to 0 / 1). Deep random networks drift in scale, so the head is then
  rescaled to give logits of std 2, as a trained model's are O(1): that keeps an absolute
  tolerance meaningful. The head (and any bilinear up-sampling after it) is linear, so the logits
  rescale exactly with it.
  """
  torch = require("torch")
  torch.manual_seed(seed)
  net = build_smp(name, in_channels=in_channels, classes=classes, **kwargs)
  g = torch.Generator().manual_seed(seed)

  def uniform(t, lo, hi):
    t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)

  x = torch.from_numpy(np.random.default_rng(seed).normal(
      size=(1, in_channels, side, side)).astype(np.float32))
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        uniform(m.running_mean, -0.5, 0.5)
        uniform(m.running_var, 0.5, 2.0)
        uniform(m.weight, 0.5, 1.5)
        uniform(m.bias, -0.5, 0.5)
      elif isinstance(m, torch.nn.LayerNorm):
        uniform(m.weight, 0.5, 1.5)
        uniform(m.bias, -0.1, 0.1)
      elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
        uniform(m.bias, -0.1, 0.1)
    net.eval()
    logits = net(x).numpy()
    scale = 2.0 / float(logits.std())
    net.segmentation_head[0].weight.mul_(scale)
    net.segmentation_head[0].bias.mul_(scale)
  return net, x, logits * scale
