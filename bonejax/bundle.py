"""The self-describing model bundle: `WORKDIR/model/` = orbax weights + model.json. No pickle.

model.json says everything needed to rebuild and use the model without the training config:
architecture name and arguments, classes, input channels, normalisation rule, patch size,
training axes and the bonejax version that wrote it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
import orbax.checkpoint as ocp

import bonejax
from bonejax import cli

FORMAT_VERSION = 1
MODEL_JSON = "model.json"
WEIGHTS = "weights"


@dataclasses.dataclass
class Bundle:
  model: nnx.Module  # in eval mode
  meta: dict[str, Any]

  @property
  def classes(self) -> list[str]:
    return list(self.meta["classes"])

  @property
  def num_classes(self) -> int:
    return len(self.meta["classes"])

  @property
  def in_channels(self) -> int:
    return int(self.meta.get("in_channels", 1))

  @property
  def normalization(self) -> str:
    return str(self.meta.get("normalization", "percentile"))


def make_meta(*, model_name: str, model_kwargs: dict[str, Any], classes: list[str],
              in_channels: int, normalization: str, patch_size: int,
              train_axes: list[int], **extra: Any) -> dict[str, Any]:
  return {"format_version": FORMAT_VERSION, "bonejax_version": bonejax.__version__,
          "model": model_name, "model_kwargs": dict(model_kwargs), "classes": list(classes),
          "in_channels": int(in_channels), "normalization": normalization,
          "patch_size": int(patch_size), "train_axes": [int(a) for a in train_axes], **extra}


def build_model(meta: dict[str, Any], dtype=jnp.float32, seed: int = 0) -> nnx.Module:
  from bonejax import models
  try:
    return models.create(meta["model"], num_classes=len(meta["classes"]),
                         in_channels=int(meta.get("in_channels", 1)), rngs=nnx.Rngs(seed),
                         dtype=dtype, **meta.get("model_kwargs", {}))
  except (ValueError, TypeError) as e:
    raise cli.UserError(f"cannot build model {meta.get('model')!r}: {e}") from None


def _this_process_only() -> ocp.options.MultiprocessingOptions:
  # A bundle is written (or read) by the calling process alone, e.g. process 0 of a multi-host
  # training job: orbax must not wait at barriers for processes that never call it.
  i = jax.process_index()
  return ocp.options.MultiprocessingOptions(primary_host=i, active_processes={i})


def save_bundle(path: str | os.PathLike, model: nnx.Module, meta: dict[str, Any]) -> Path:
  """Writes a frozen copy of `model` atomically (a crash never leaves a half bundle)."""
  final = Path(path)
  state = jax.device_get(nnx.state(model))  # a host copy: later training steps cannot alter it
  with cli.atomic_output(final, overwrite=True) as tmp:
    tmp.mkdir(parents=True)
    with ocp.StandardCheckpointer(multiprocessing_options=_this_process_only()) as ckptr:
      ckptr.save((tmp / WEIGHTS).absolute(), state)
      ckptr.wait_until_finished()
    cli.atomic_write_json(tmp / MODEL_JSON, meta)
  return final


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
  p = Path(path)
  if not p.exists():
    raise cli.UserError(f"model bundle {str(p)!r} does not exist")
  f = p / MODEL_JSON
  if not f.exists():
    raise cli.UserError(f"{str(p)!r} is not a model bundle (no {MODEL_JSON})")
  try:
    meta = json.loads(f.read_text())
  except json.JSONDecodeError as e:
    raise cli.UserError(f"{str(f)!r} is not valid JSON: {e}") from None
  version = meta.get("format_version")
  if version != FORMAT_VERSION:
    raise cli.UserError(f"model bundle {str(p)!r} has format version {version}; this bonejax "
                        f"({bonejax.__version__}) reads version {FORMAT_VERSION}")
  for key in ("model", "classes"):
    if key not in meta:
      raise cli.UserError(f"model bundle {str(p)!r} lacks {key!r} in {MODEL_JSON}")
  return meta


def load_bundle(path: str | os.PathLike, dtype=jnp.float32) -> Bundle:
  """Rebuilds the architecture from model.json and restores the weights into it (eval mode)."""
  p = Path(path)
  meta = read_meta(p)
  abstract = nnx.eval_shape(lambda: build_model(meta, dtype))
  graphdef, abstract_state = nnx.split(abstract)
  if not (p / WEIGHTS).exists():
    raise cli.UserError(f"model bundle {str(p)!r} has no weights")
  try:
    with ocp.StandardCheckpointer(multiprocessing_options=_this_process_only()) as ckptr:
      state = ckptr.restore((p / WEIGHTS).absolute(), abstract_state)
  except Exception as e:  # pylint: disable=broad-except
    raise cli.UserError(f"cannot restore weights of {str(p)!r}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
  model = nnx.merge(graphdef, state)
  model.eval()
  return Bundle(model, meta)
