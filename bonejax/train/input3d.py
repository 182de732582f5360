"""The trainer's input for a 3D model (models.spatial_dims(name) == 3), in one call.

`make_input_3d` gives what the trainer's "Input" and "Evaluator" sections build for a 2D model:
the training feed (host `PatchStream3d` or `DeviceSampler3d`, as `config.sampler` says, with
the same auto rule: the device path when the scans fit the per-device budget), the validation
batches (a grid of crops, `validation_batches_3d`) and their size. `augment_fn(config)` is the
3D augmentation with the trainer's `augment(key, image, label)` call. The trainer then runs
unchanged: losses, the evaluator and the metrics take any number of spatial axes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from bonejax.core import errors
from bonejax.data import device_sampler, device_sampler3d, feed as feed_lib, patches3d
from bonejax.train import augment3d

DEFAULTS = {"patches_per_scan": 64, "foreground": 1 / 3, "val_max_crops": 0}


def _get(c: Any, key: str) -> Any:
  return c[key] if key in c else DEFAULTS[key]


def check_config_3d(c: Any, stride: int) -> tuple[int, int, int]:
  """The patch (D, H, W); one error line when a side is not a multiple of the model's stride."""
  patch = patches3d.patch_shape(c.patch_size)
  if any(p % stride for p in patch):
    raise errors.UserError(f"patch_size={c.patch_size} must be a multiple of {stride} (the 3D "
                           "model's stride) on every axis")
  augment3d.resolve_config(c.augment)
  return patch


def augment_fn(c: Any) -> Callable:
  cfg = augment3d.resolve_config(c.augment)
  return functools.partial(_augment, cfg=cfg)


def _augment(key, image, label, cfg):
  return augment3d.augment(key, image, label, cfg)


@dataclasses.dataclass
class Input3d:
  feed: Any  # next() -> device batch; get_state / set_state / close; kind
  validation: Callable[[], Any]  # () -> a fresh iterator of host validation batches
  val_nbytes: int


def make_input_3d(c: Any, dataset_path, train_scans: Sequence[str], val_scans: Sequence[str],
                  mesh: Mesh, put: Callable[[Mapping[str, np.ndarray]], dict[str, jax.Array]],
                  *, batch_size: int, val_batch: int) -> Input3d:
  patch = patches3d.patch_shape(c.patch_size)
  stream = patches3d.PatchStream3d(
      dataset_path, train_scans, patch_size=patch, global_batch_size=batch_size,
      patches_per_scan=int(_get(c, "patches_per_scan")),
      foreground=float(_get(c, "foreground")), seed=int(c.seed),
      normalization=str(c.normalization), process_index=jax.process_index(),
      process_count=jax.process_count(), edge_margin=c.get("edge_margin"))
  sampler = str(c.sampler)
  feed: Any
  if sampler == "host":
    feed = feed_lib.HostFeed(stream, put)
  else:
    budget = device_sampler.device_budget(list(mesh.devices.flat),
                                          int(c.get("sampler_device_mb", 0)))
    need = device_sampler3d.resident_bytes(stream)
    if need <= budget:
      feed = device_sampler3d.DeviceSampler3d(stream, mesh)
    elif sampler == "device":
      stream.close()
      raise errors.UserError(f"sampler=device: the 3D training scans need "
                             f"{need / 2**20:.0f} MiB per device, over the budget of "
                             f"{budget / 2**20:.0f} MiB; set sampler=host or auto")
    else:
      errors.warn(f"sampler=auto: the 3D training scans need {need / 2**20:.0f} MiB per "
                  f"device, over {budget / 2**20:.0f} MiB; training from the host stream")
      feed = feed_lib.HostFeed(stream, put)
  max_crops = int(_get(c, "val_max_crops"))

  def validation():
    return patches3d.validation_batches_3d(dataset_path, val_scans, patch_size=patch,
                                           batch_size=val_batch,
                                           normalization=str(c.normalization),
                                           max_crops=max_crops)

  n = sum(1 for _ in _val_items(dataset_path, val_scans, patch, max_crops))
  nbytes = -(-n // val_batch) * val_batch * int(np.prod(patch)) * 12  # image, label, mask
  return Input3d(feed, validation, nbytes)


def _val_items(dataset_path, scans, patch, max_crops):
  from bonejax.data import store  # pylint: disable=import-outside-toplevel
  ds = store.open_dataset(dataset_path)
  for name in scans:
    crops = patches3d.validation_crops(ds.open_scan(name).shape, patch)
    yield from crops[:max_crops] if max_crops else crops
