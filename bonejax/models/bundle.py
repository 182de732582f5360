"""The self-describing model bundle: `WORKDIR/model/` = orbax weights + model.json. No pickle.

model.json says everything needed to rebuild and use the model without the training config:
architecture name and arguments, classes, input channels, normalisation rule, patch size,
training axes and the bonejax version that wrote it; `context_slices` = k for a 2.5D model (it
takes the 2k + 1 planes around each plane as channels: in_channels = 2k + 1, and the predictor
stacks them from a plain 1-channel volume).

The weights are the model's parameters and BatchNorm statistics only. Random-number state
(dropout and stochastic-depth streams) is no part of a trained model: it is rebuilt when a
bundle is loaded (bundles written before this rule carry it; reading skips it). Loading checks
model.json against the stored weights first, from their metadata (paths and shapes; the
architecture is built abstractly, so an absurd `width` allocates nothing), and returns the
model as an eval view (`nnx.view`: BatchNorm on running statistics, dropout off).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
import orbax.checkpoint as ocp

import bonejax
from bonejax.core import errors, outputs

FORMAT_VERSION = 1
MODEL_JSON = "model.json"
WEIGHTS = "weights"
# What a bundle stores: a trained model's parameters and BatchNorm statistics, nothing else.
WEIGHT_FILTER = (nnx.Param, nnx.BatchStat)


@dataclasses.dataclass
class Bundle:
  model: nnx.Module  # an eval view (eval_view)
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
  def context_slices(self) -> int:
    """2.5D: planes each side of the predicted one (0: a 2D model)."""
    return int(self.meta.get("context_slices", 0) or 0)

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
  except (ValueError, TypeError, OverflowError) as e:
    raise errors.UserError(f"cannot build model {meta.get('model')!r}: {e}") from None


def eval_view(model: nnx.Module) -> nnx.Module:
  """The model in eval mode, sharing its weights: BatchNorm on running statistics, no dropout."""
  return nnx.view(model, use_running_average=True, deterministic=True, raise_if_not_found=False)


# ---------------------------------------------------------------------------------------------
# model.json.
# ---------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def check_meta(meta: Any, where: str) -> None:
  """One line for a model.json that is not what make_meta writes (its types, not its values)."""
  if not isinstance(meta, dict):
    raise errors.UserError(f"{where} holds a JSON {type(meta).__name__}, not an object")
  from bonejax.io import intensity
  classes, axes = meta.get("classes"), meta.get("train_axes", [0])
  problems = [
      (not isinstance(meta.get("model"), str), "model", "a model name"),
      (not isinstance(classes, list) or not classes or
       not all(isinstance(c, str) for c in classes), "classes", "a non-empty list of names"),
      ("in_channels" in meta and (not _is_int(meta["in_channels"]) or meta["in_channels"] < 1),
       "in_channels", "a positive integer"),
      ("model_kwargs" in meta and not isinstance(meta["model_kwargs"], dict), "model_kwargs",
       "an object"),
      ("context_slices" in meta and (not _is_int(meta["context_slices"]) or
                                     meta["context_slices"] < 0), "context_slices",
       "an integer >= 0"),
      (_is_int(meta.get("context_slices")) and meta["context_slices"] > 0 and
       meta.get("in_channels", 1) != 2 * meta["context_slices"] + 1, "in_channels",
       "2 * context_slices + 1 for a 2.5D model"),
      ("normalization" in meta and meta["normalization"] not in intensity.RULES,
       "normalization", f"one of {', '.join(intensity.RULES)}"),
      ("patch_size" in meta and (not _is_int(meta["patch_size"]) or meta["patch_size"] < 1),
       "patch_size", "a positive integer"),
      (not isinstance(axes, list) or not all(_is_int(a) and a in (0, 1, 2) for a in axes),
       "train_axes", "a list of axes 0, 1, 2"),
  ]
  for bad, key, want in problems:
    if bad:
      got = errors.one_line(repr(meta.get(key)))[:80]
      raise errors.UserError(f"{where}: {key!r} must be {want}, got {got}")


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
  p = Path(path)
  if not p.exists():
    raise errors.UserError(f"model bundle {str(p)!r} does not exist")
  f = p / MODEL_JSON
  if not f.exists():
    raise errors.UserError(f"{str(p)!r} is not a model bundle (no {MODEL_JSON})")
  try:
    meta = json.loads(f.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.UserError(f"{str(f)!r} is not valid JSON: {e}") from None
  if not isinstance(meta, dict):
    raise errors.UserError(f"{str(f)!r} holds a JSON {type(meta).__name__}, not an object")
  version = meta.get("format_version")
  if version != FORMAT_VERSION:
    raise errors.UserError(f"model bundle {str(p)!r} has format version {version}; this bonejax "
                        f"({bonejax.__version__}) reads version {FORMAT_VERSION}")
  for key in ("model", "classes"):
    if key not in meta:
      raise errors.UserError(f"model bundle {str(p)!r} lacks {key!r} in {MODEL_JSON}")
  check_meta(meta, str(f))
  return meta


# ---------------------------------------------------------------------------------------------
# Weights on disk (orbax trees; shared with the training checkpoints).
# ---------------------------------------------------------------------------------------------


def this_process_only() -> ocp.options.MultiprocessingOptions:
  # A bundle is written (or read) by the calling process alone, e.g. process 0 of a multi-host
  # training job: orbax must not wait at barriers for processes that never call it.
  i = jax.process_index()
  return ocp.options.MultiprocessingOptions(primary_host=i, active_processes={i})


def quiet_closed_loop_noise() -> None:
  """Drops the echo of a failed orbax read: tensorstore callbacks aimed at the event loop
  orbax has closed print one unraisable "RuntimeError: Event loop is closed" traceback each
  (dozens) on stderr. The failure itself is raised and reported."""
  previous = sys.unraisablehook
  if getattr(previous, "_bonejax_quiet", False):
    return

  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and \
        "Event loop is closed" in str(unraisable.exc_value):
      return
    previous(unraisable)

  hook._bonejax_quiet = True
  sys.unraisablehook = hook


def reason(e: BaseException) -> str:
  """An orbax/tensorstore exception as a short line (no tensorstore spec)."""
  text = str(e).split(" [tensorstore_spec=")[0]
  return errors.one_line(f"{type(e).__name__}: {text}")[:300]


def stored_arrays(path: str | os.PathLike):
  """The tree of array metadata (shape, dtype) of a saved orbax tree; no array is read."""
  handler = ocp.StandardCheckpointHandler(multiprocessing_options=this_process_only())
  try:
    return handler.metadata(Path(path).absolute()).tree
  finally:
    handler.close()


def tree_shapes(tree) -> dict[str, tuple]:
  """{'a/b/c': shape} of a pytree of arrays, ShapeDtypeStructs or orbax array metadata."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    if keys and keys[-1] == "value":  # nnx Variables flatten to .../value
      keys = keys[:-1]
    shape = tuple(getattr(leaf, "shape", ()))
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
      # orbax stores a typed PRNG key (a dropout stream) as its raw key data: compare that.
      shape = jax.eval_shape(jax.random.key_data,
                             jax.ShapeDtypeStruct(shape, dtype)).shape
    out["/".join(keys)] = shape
  return out


def shape_mismatch(stored: dict[str, tuple], expected: dict[str, tuple]) -> str | None:
  """How two {path: shape} maps differ, in a few words; None when they agree."""

  def few(keys):
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

  missing = sorted(set(expected) - set(stored))
  extra = sorted(set(stored) - set(expected))
  if missing:
    return f"the weights lack {few(missing)}"
  if extra:
    return f"the weights hold {few(extra)}, which the model does not have"
  for k in sorted(expected):
    if stored[k] != expected[k]:
      return f"{k} has shape {stored[k]} in the weights, {expected[k]} in the model"
  return None


# ---------------------------------------------------------------------------------------------
# Bundles.
# ---------------------------------------------------------------------------------------------


def save_bundle(path: str | os.PathLike, model: nnx.Module, meta: dict[str, Any]) -> Path:
  """Writes a frozen copy of `model`'s weights atomically (a crash never leaves a half bundle)."""
  return save_weights(path, nnx.state(model, WEIGHT_FILTER), meta)


def save_weights(path: str | os.PathLike, weights: Any, meta: dict[str, Any]) -> Path:
  """Writes a bundle from a weights state (`nnx.state(model, WEIGHT_FILTER)`) and model.json."""
  final = Path(path)
  check_meta(meta, f"model.json for {str(final)!r}")
  weights = jax.device_get(weights)  # a host copy: later training steps cannot alter it
  with outputs.atomic_output(final, overwrite=True) as tmp:
    tmp.mkdir(parents=True)
    with ocp.StandardCheckpointer(multiprocessing_options=this_process_only()) as ckptr:
      ckptr.save((tmp / WEIGHTS).absolute(), weights)
      ckptr.wait_until_finished()
    outputs.atomic_write_json(tmp / MODEL_JSON, meta)
  return final


def _fresh_rng_state(abstract_rest: Any, seed: int = 0) -> Any:
  """Concrete values for an abstract model's RNG variables: keys from `seed`, counts 0."""

  def fill(a):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      key = jax.random.key(seed)  # build_model's nnx.Rngs(seed) uses the default key type
      return jax.random.split(key, a.shape) if a.shape else key
    return jnp.zeros(a.shape, a.dtype)

  return jax.tree.map(fill, abstract_rest)


def load_bundle(path: str | os.PathLike, dtype=jnp.float32) -> Bundle:
  """Rebuilds the architecture from model.json and restores the weights into it (eval view)."""
  p = Path(path)
  meta = read_meta(p)
  abstract = nnx.eval_shape(lambda: build_model(meta, dtype))
  graphdef, weights_abs, rest_abs = nnx.split(abstract, WEIGHT_FILTER, ...)
  if not (p / WEIGHTS).exists():
    raise errors.UserError(f"model bundle {str(p)!r} has no weights")
  quiet_closed_loop_noise()
  try:
    stored = tree_shapes(stored_arrays(p / WEIGHTS))
  except Exception as e:  # pylint: disable=broad-except
    raise errors.UserError(f"cannot read the weights of {str(p)!r}: {reason(e)}") from None
  for k in tree_shapes(rest_abs):  # RNG state, in bundles written before it was left out
    stored.pop(k, None)
  why = shape_mismatch(stored, tree_shapes(weights_abs))
  if why:
    raise errors.UserError(f"{MODEL_JSON} of {str(p)!r} does not fit its weights: {why}")
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=local),
                        weights_abs)
  handler = ocp.PyTreeCheckpointHandler(multiprocessing_options=this_process_only())
  try:
    weights = handler.restore((p / WEIGHTS).absolute(), args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except
    raise errors.UserError(f"cannot restore weights of {str(p)!r}: {reason(e)}") from None
  finally:
    handler.close()
  model = nnx.merge(graphdef, weights, _fresh_rng_state(rest_abs))
  return Bundle(eval_view(model), meta)
