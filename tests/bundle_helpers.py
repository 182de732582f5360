"""What the prediction tests predict with and on: a tiny classic U-Net bundle and a smooth noisy
uint16 test volume."""

import numpy as np
from flax import nnx

from bonejax import models
from bonejax.models import bundle

CLASSES = ["background", "bone", "pore"]


def make_bundle(path, *, in_channels=1, normalization="percentile", depth=2, width=4, seed=0):
  """A small classic U-Net bundle, weights drawn by numpy (no slow eager initialisation)."""
  kwargs = {"depth": depth, "width": width}
  abstract = nnx.eval_shape(lambda: models.create("unet", num_classes=len(CLASSES),
                                                  in_channels=in_channels, rngs=nnx.Rngs(0),
                                                  **kwargs))
  meta = bundle.make_meta(model_name="unet", model_kwargs=kwargs, classes=CLASSES,
                          in_channels=in_channels, normalization=normalization, patch_size=32,
                          train_axes=[0, 1, 2])
  bundle.save_bundle(path, models.fill_from_numpy(abstract, seed), meta)
  return path


def phantom(shape, seed=0):
  """A (Z, Y, X) uint16 volume: smooth sines plus Gaussian noise (sigma 200)."""
  rng = np.random.default_rng(seed)
  z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
  smooth = 1500 + 1000 * np.sin(z / 3.0) * np.cos(y / 4.0) + 800 * np.sin(x / 2.5)
  return np.clip(smooth + rng.normal(0, 200, shape), 0, 65535).astype(np.uint16)
