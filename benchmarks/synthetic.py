"""Inputs for prediction benchmarks, made in seconds: a random-weight bundle and a smooth scan.

A 512^3 phantom takes minutes to make; the predictor's speed does not depend on what the voxels
show, so `synthetic_scan` writes smooth sinusoids with noise (uint16, statistics computed at
import) instead. The bundle's weights are drawn by numpy into an abstract model (eager
initialisation of a large model costs far more on a CPU).
"""

from __future__ import annotations

from pathlib import Path


def synthetic_scan(path: Path, shape) -> Path:
  """A smooth uint16 volume with noise, stored as a scan (statistics computed at import)."""
  import numpy as np
  from bonejax.data import store
  rng = np.random.default_rng(0)
  z = np.arange(shape[0], dtype=np.float32)[:, None, None]
  y = np.arange(shape[1], dtype=np.float32)[None, :, None]
  x = np.arange(shape[2], dtype=np.float32)[None, None, :]
  v = 20000 + 15000 * np.sin(z / 7.0) * np.cos(y / 9.0) + 8000 * np.sin(x / 5.0)
  v = v + rng.normal(0, 2000, shape).astype(np.float32)
  store.write_scan(path, np.clip(v, 0, 65535).astype(np.uint16))
  return path


def make_bundle(path: Path, model: str, **kwargs) -> Path:
  """A bundle of `model` (its own arguments `kwargs`) with random weights, 3 classes."""
  from flax import nnx
  from bonejax import models
  from bonejax.models import bundle
  abstract = nnx.eval_shape(lambda: models.create(model, num_classes=3, in_channels=1,
                                                  rngs=nnx.Rngs(0), **kwargs))
  meta = bundle.make_meta(model_name=model, model_kwargs=kwargs,
                          classes=["background", "bone", "pore"], in_channels=1,
                          normalization="percentile", patch_size=256, train_axes=[0, 1, 2])
  bundle.save_bundle(path, models.fill_from_numpy(abstract, 0), meta)
  return path
