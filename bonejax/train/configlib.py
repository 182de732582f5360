"""Training configs: the full default config, argument parsing for `configs/x.py:arg`, checks.

Every `configs/*.py` starts from `default_config()`, so every config has every field a user may
override from the command line (`--config.dataset=DATA --config.num_steps=2000`). Lists of scan
names are tuples (ml_collections cannot override lists): `--config.val_scans="('s3','s4')"` or
`--config.val_scans=s3,s4`.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from bonejax.core import errors, jsonable

# Fields that define the trajectory of a run: a resumed run must have the same values.
TRAJECTORY_KEYS = ("dataset", "train_scans", "val_scans", "val_fraction", "model", "in_channels",
                   "patch_size", "batch_size", "seed", "dtype", "axes", "patches_per_plane",
                   "oversample_rare", "normalization", "loss", "optimizer", "schedule", "augment",
                   "phantom", "context_slices", "conv_lowering", "edge_margin")
# Fields added after runs were already written, with the value that means "as before": a
# fingerprint leaves them out at that value, so older runs still resume.
_ADDED_FIELDS = {("context_slices",): 0, ("model", "init_from"): "",
                 ("model", "encoder_weights"): "", ("model", "freeze_encoder_steps"): 0,
                 ("conv_lowering",): "xla",
                 # runs before the key drew crops with the then fixed margin of half a patch
                 ("edge_margin",): 0.5}


def default_config() -> ml_collections.ConfigDict:
  from bonejax.train.augment import default_augment_config

  c = ml_collections.ConfigDict()
  # Data.
  c.dataset = ""                 # dataset directory; "" with phantom.num_scans > 0: WORKDIR/data
  c.train_scans = ()             # scan names; empty: split by val_fraction
  c.val_scans = ()
  c.val_fraction = 0.2
  c.phantom = ml_collections.ConfigDict(dict(num_scans=0, shape=(96, 128, 128), kind="bone",
                                             seed=0))
  c.normalization = "percentile"  # percentile | zscore | zscore_nonzero (voxels > 0, as BONe)
  c.axes = (0, 1, 2)             # training planes perpendicular to these axes
  c.context_slices = 0           # 2.5D: k planes each side, 2k + 1 input channels; 0: 2D
  c.patch_size = 256
  c.patches_per_plane = 4
  c.oversample_rare = 0.0
  # Crop origins reach this fraction of the patch past each border, clamped back onto it: the
  # planes' border rows are trained at the network's input edge, as whole-plane prediction
  # sees them (0: crops uniform inside the plane, border rows trained 1/patch as often; 0..1).
  c.edge_margin = 0.5
  c.augment = default_augment_config()
  # Who cuts the patches (the batches are the same): auto | device | host. device: the training
  # scans in device memory, crops cut there; host: read and normalised on the CPU (~1,000
  # patches/s per core); auto: device when the scans fit the budget, else host (one warning).
  c.sampler = "auto"
  c.sampler_device_mb = 0        # per-device budget for the scans; 0: half the device memory
                                 # (CPU devices: a quarter of the RAM, shared)
  # Model.
  # init_from: a bundle or an smp/DLFit .pth/.safetensors to fine-tune (the same network);
  # encoder_weights: an ImageNet ResNet/MiT state dict for the encoder; freeze_encoder_steps:
  # the encoder's parameters held still for this many steps (see bonejax/train/pretrained.py).
  c.model = ml_collections.ConfigDict(dict(name="unet_resnet18", kwargs={}, init_from="",
                                           encoder_weights="", freeze_encoder_steps=0))
  c.in_channels = 1              # channels per plane; with context_slices = k: 1 or 2k + 1
  c.dtype = "bfloat16"           # compute dtype; parameters, BN statistics and the loss are fp32
  # How the training step computes its convolutions on a CPU (bonejax.models.conv_lowering;
  # GPUs always keep XLA's cuDNN convolutions): auto (oneDNN's convolutions where its extension
  # is built, with a `note:` line where it is not; else bf16 dot products on CPUs with native
  # bf16 dots such as AMX, else XLA's) | xla (XLA's own) | measure (each layer timed once).
  # A resumed run under auto keeps what it was trained with (runs from before auto was the
  # default: xla).
  c.conv_lowering = "auto"
  # Optimisation.
  c.batch_size = 32              # global, over all devices and hosts
  c.num_steps = 10_000
  c.seed = 0
  c.loss = ml_collections.ConfigDict({"ce": 1.0, "dice": 1.0})
  # weight_decay: decoupled (AdamW); adam and sgd refuse a non-zero value (see optim.py).
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam", lr=3e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, momentum=0.9,
      nesterov=False, clip_norm=0.0))
  c.schedule = ml_collections.ConfigDict(dict(
      name="constant", warmup_steps=0, final_lr_fraction=0.0, plateau_patience=10,
      plateau_factor=0.5, plateau_min_scale=0.0, plateau_rtol=0.0))
  # Validation, model selection, stopping.
  c.eval_every = 500             # steps; 0: only at the end
  c.val_axes = (0,)
  c.val_crop = 0                 # centre crop of each validation plane; 0: whole planes
  c.val_stride = 1               # every k-th plane
  c.val_batch_size = 0           # 0: batch_size
  c.val_device_limit_mb = 2048   # validation set kept on the device up to this size, else
                                 # streamed from the host at each evaluation (0: always stream)
  c.eval_graph = "auto"          # validation through the inference graph (BatchNorm folded,
                                 # as predict.py runs the bundle): auto | measure | xla | off
  # Evaluators (bonejax/train/evaluators/): name -> {type, every_steps (default eval_every),
  # ...}. "val" is the plane-wise one the val_* fields above configure; add e.g.
  # c.evaluators.volume = dict(type="volume", every_steps=5000, planes=3, vote="soft") for the
  # voted whole-scan IoU of the papers.
  c.evaluators = ml_collections.ConfigDict({"val": {"type": "planes"}})
  # NAME/METRIC of an evaluator (a bare METRIC: the "val" evaluator's): miou_fg | miou_all
  # (higher is better) | loss (lower); e.g. volume/miou_fg.
  c.best_metric = "miou_fg"
  c.early_stopping_patience = 0  # evaluations without improvement; 0: off
  # Bookkeeping.
  c.log_every = 50               # steps; 0: every step
  c.checkpoint_every = 1000      # steps; 0: only at the end, when stopped, and at a new best
  c.keep_checkpoints = 2
  c.stop_after = 0               # stop (resumably) after this step, as a preemption would
  c.profile_steps = ""           # 'A:B': a jax.profiler trace of steps A+1..B in WORKDIR/profile
  return c


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """'smoke' or 'depth=4,width=64,patch=384' -> ConfigDict over `defaults` (typed by them).

  A bare word sets a boolean default to True; unknown names are an error.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  for item in [s for s in (arg or "").split(",") if s.strip()]:
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise errors.UserError(f"unknown config argument {key!r}; known: {', '.join(defaults)}")
    default = defaults[key]
    if not eq:
      if not isinstance(default, bool):
        raise errors.UserError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
      continue
    try:
      if isinstance(default, bool):
        out[key] = value.strip().lower() in ("1", "true", "yes")
      else:
        out[key] = type(default)(value.strip())
    except ValueError:
      raise errors.UserError(f"config argument {key}={value!r} is not a {type(default).__name__}") \
          from None
  return out


def names(value: Any) -> list[str]:
  """A tuple/list of names, or one comma-separated string, as a list."""
  if value is None:
    return []
  if isinstance(value, str):
    return [v.strip() for v in value.split(",") if v.strip()]
  out = []
  for v in value:
    out.extend(names(v) if isinstance(v, str) else [str(v)])
  return out


# The optimiser fields each optimiser reads; the others cannot change a run.
_OPTIMIZER_FIELDS = {"adam": ("lr", "b1", "b2", "eps", "clip_norm"),
                     "adamw": ("lr", "b1", "b2", "eps", "weight_decay", "clip_norm"),
                     "sgd": ("lr", "momentum", "nesterov", "clip_norm")}


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The trajectory-defining values, compared when a run resumes."""
  d = config.to_dict()
  out = {k: jsonable.to_jsonable(d.get(k)) for k in TRAJECTORY_KEYS}
  return normalize_fingerprint(out)


def normalize_fingerprint(fp: dict[str, Any]) -> dict[str, Any]:
  """Drops optimiser fields the named optimiser never reads, and fields added since older runs
  were written while they hold the value that keeps the old behaviour.

  Runs written before adam refused `weight_decay` carried weight_decay=1e-4 that adam ignored;
  they resume under configs that now say 0.
  """
  from bonejax.train.augment import ADDED_DEFAULTS
  fp = {k: (dict(v) if isinstance(v, dict) else v) for k, v in fp.items()}
  added = {**_ADDED_FIELDS, **{("augment", k): v for k, v in ADDED_DEFAULTS.items()}}
  for path, default in added.items():
    node = fp
    for part in path[:-1]:
      node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and path[-1] in node and \
        jsonable.to_jsonable(node[path[-1]]) == jsonable.to_jsonable(default):
      del node[path[-1]]
  opt = fp.get("optimizer")
  if isinstance(opt, dict) and opt.get("name") in _OPTIMIZER_FIELDS:
    keep = ("name",) + _OPTIMIZER_FIELDS[opt["name"]]
    fp["optimizer"] = {k: v for k, v in opt.items() if k in keep}
  return fp


# ---------------------------------------------------------------------------------------------
# Checks: one line naming the field, before anything is read or written.
# ---------------------------------------------------------------------------------------------

# field: (lowest, highest) allowed, inclusive; None: unbounded. All are integers.
_INT_RANGES = {
    "seed": (0, 2**32 - 1), "num_steps": (1, None), "batch_size": (1, None),
    "val_batch_size": (0, None), "patch_size": (1, None), "patches_per_plane": (1, None),
    "in_channels": (1, None), "eval_every": (0, None), "log_every": (0, None),
    "checkpoint_every": (0, None), "keep_checkpoints": (1, None), "stop_after": (0, None),
    "val_crop": (0, None), "val_stride": (1, None), "early_stopping_patience": (0, None),
    "context_slices": (0, 64), "model.freeze_encoder_steps": (0, None),
    "val_device_limit_mb": (0, None), "sampler_device_mb": (0, None),
    "phantom.num_scans": (0, None),
    "phantom.seed": (0, 2**32 - 1), "schedule.warmup_steps": (0, None),
}
# field: (lowest, highest, lowest allowed?, highest allowed?) for real numbers.
_FLOAT_RANGES = {
    "val_fraction": (0.0, 1.0, False, False), "oversample_rare": (0.0, 1.0, True, False),
    "optimizer.lr": (0.0, None, False, None), "optimizer.weight_decay": (0.0, None, True, None),
    "optimizer.clip_norm": (0.0, None, True, None), "optimizer.b1": (0.0, 1.0, True, False),
    "optimizer.b2": (0.0, 1.0, True, False), "optimizer.eps": (0.0, None, False, None),
    "optimizer.momentum": (0.0, 1.0, True, False),
    "schedule.final_lr_fraction": (0.0, None, True, None),
    "edge_margin": (0.0, 1.0, True, True),
}
_MISSING = object()


def _lookup(config, key: str):
  node = config
  for part in key.split("."):
    if not hasattr(node, "get") or part not in node:
      return _MISSING
    node = node[part]
  return node


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check(config: ml_collections.ConfigDict) -> None:
  """Refuses (one line naming the field) values no run can use: negative intervals, a zero
  batch, a negative seed, a fraction outside its range, axes other than 0/1/2."""
  missing = [k for k in default_config() if k not in config]
  if "optimizer" in config and _lookup(config, "optimizer.lr") is _MISSING:
    missing.append("optimizer.lr")  # the one optimiser field without a default
  if missing:
    raise errors.UserError(f"config lacks field(s) {', '.join(missing)} (build configs on "
                        "bonejax.train.configlib.default_config())")
  for key, (lo, hi) in _INT_RANGES.items():
    v = _lookup(config, key)
    if v is _MISSING:
      continue
    if not _is_int(v):
      raise errors.UserError(f"config.{key}={v!r} must be an integer")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
      what = (f">= {lo}" if hi is None else f"in [{lo}, {hi}]")
      raise errors.UserError(f"config.{key}={v} must be {what}")
  for key, (lo, hi, lo_ok, hi_ok) in _FLOAT_RANGES.items():
    v = _lookup(config, key)
    if v is _MISSING:
      continue
    if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v):
      raise errors.UserError(f"config.{key}={v!r} must be a finite number")
    low = lo is not None and (v < lo or (v == lo and not lo_ok))
    high = hi is not None and (v > hi or (v == hi and not hi_ok))
    if low or high:
      left, right = ("[" if lo_ok else "("), ("]" if hi_ok else ")")
      what = (f"{'>=' if lo_ok else '>'} {lo}" if hi is None else f"in {left}{lo}, {hi}{right}")
      raise errors.UserError(f"config.{key}={v} must be {what}")
  if config.sampler not in ("auto", "device", "host"):
    raise errors.UserError(f"config.sampler={config.sampler!r} must be auto, device or host")
  if _lookup(config, "conv_lowering") not in (_MISSING, "xla", "auto", "measure"):
    raise errors.UserError(f"config.conv_lowering={config.conv_lowering!r} must be xla, auto or "
                        "measure")
  if _lookup(config, "eval_graph") not in (_MISSING, "auto", "measure", "xla", "off"):
    raise errors.UserError(f"config.eval_graph={config.eval_graph!r} must be auto, measure, xla "
                        "or off")
  k = _lookup(config, "context_slices")
  if k and config.in_channels not in (1, 2 * k + 1):
    raise errors.UserError(f"config.in_channels={config.in_channels} does not fit "
                        f"context_slices={k}: a 2.5D model takes 2k + 1 = {2 * k + 1} planes "
                        "(leave in_channels at 1)")
  for key in ("axes", "val_axes"):
    v = tuple(config[key]) if isinstance(config[key], (tuple, list)) else (config[key],)
    if not v or any(not _is_int(a) or a not in (0, 1, 2) for a in v) or len(set(v)) != len(v):
      raise errors.UserError(f"config.{key}={config[key]!r} must be distinct axes from 0, 1, 2")
  shape = _lookup(config, "phantom.shape")
  if shape is not _MISSING and int(_lookup(config, "phantom.num_scans") or 0) > 0 and (
      not isinstance(shape, (tuple, list)) or len(shape) != 3 or
      any(not _is_int(s) or s < 1 for s in shape)):
    raise errors.UserError(f"config.phantom.shape={shape!r} must be 3 positive integers (Z, Y, X)")


# ---------------------------------------------------------------------------------------------
# The command line: one-line errors for what ml_collections reports with a traceback.
# ---------------------------------------------------------------------------------------------


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """'configs/x.py[:arg]' -> get_config(arg), as config_flags does it."""
  path, _, arg = spec.partition(":")
  p = Path(path)
  if not p.is_file():
    raise errors.UserError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location(f"_bonejax_config_{p.stem}", p)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except errors.UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise errors.UserError(f"cannot load config {path!r}: {type(e).__name__}: {e}") from None
  if not hasattr(module, "get_config"):
    raise errors.UserError(f"config {path!r} has no get_config()")
  return module.get_config(arg) if arg else module.get_config()


def check_run_flags(argv: Sequence[str], config: Any, workdir: str | None) -> None:
  """What launch/train.py and launch/crossval.py check before a run, as one `error:` line: no
  stray arguments, --workdir and --config given, --workdir a directory where it exists."""
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not workdir:
    raise errors.UserError("--workdir is required")
  if config is None:
    raise errors.UserError("--config is required (e.g. --config=configs/demo.py)")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.UserError(f"--workdir={workdir!r} exists and is not a directory")


def check_argv(argv: Sequence[str], flag: str = "config", default: str | None = None) -> None:
  """Fails with one `error:` line on a missing config file or an unknown `--config.KEY`.

  Call before absl parses the flags: config_flags raises these as plain exceptions, which would
  otherwise surface as tracebacks.
  """
  spec, overrides = default, []
  for a in argv[1:]:
    if a.startswith(f"--{flag}="):
      spec = a.split("=", 1)[1]
    elif a.startswith(f"--{flag}."):
      overrides.append(a[len(flag) + 3:].split("=", 1)[0])
  if spec is None:
    return
  try:
    config = load_config_file(spec)
    for key in overrides:
      node = config
      parts = key.split(".")
      for i, part in enumerate(parts):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
          where = ".".join(parts[:i]) or "the config"
          known = sorted(node.keys()) if hasattr(node, "keys") else []
          raise errors.UserError(f"unknown config key {key!r} (--{flag}.{key}): {where} has "
                              f"{', '.join(known) or 'no fields'}")
        node = node[part]
  except errors.UserError as e:
    print(f"error: {errors.one_line(e)}", file=sys.stderr)
    sys.exit(errors.EXIT_BAD_INPUT)
