"""Training configs: the full default config, argument parsing for `configs/x.py:arg`, checks.

Every `configs/*.py` starts from `default_config()`, so every config has every field a user may
override from the command line (`--config.dataset=DATA --config.num_steps=2000`). Lists of scan
names are tuples (ml_collections cannot override lists): `--config.val_scans="('s3','s4')"` or
`--config.val_scans=s3,s4`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from bonejax import cli

# Fields that define the trajectory of a run: a resumed run must have the same values.
TRAJECTORY_KEYS = ("dataset", "train_scans", "val_scans", "val_fraction", "model", "in_channels",
                   "patch_size", "batch_size", "seed", "dtype", "axes", "patches_per_plane",
                   "oversample_rare", "normalization", "loss", "optimizer", "schedule", "augment",
                   "phantom")


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
  c.normalization = "percentile"  # percentile | zscore
  c.axes = (0, 1, 2)             # training planes perpendicular to these axes
  c.patch_size = 256
  c.patches_per_plane = 4
  c.oversample_rare = 0.0
  c.augment = default_augment_config()
  # Model.
  c.model = ml_collections.ConfigDict(dict(name="unet_resnet18", kwargs={}))
  c.in_channels = 1
  c.dtype = "bfloat16"           # compute dtype; parameters, BN statistics and the loss are fp32
  # Optimisation.
  c.batch_size = 32              # global, over all devices and hosts
  c.num_steps = 10_000
  c.seed = 0
  c.loss = ml_collections.ConfigDict({"ce": 1.0, "dice": 1.0})
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam", lr=3e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4, momentum=0.9,
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
  c.best_metric = "miou_fg"      # miou_fg | miou_all (higher is better) | loss (lower)
  c.early_stopping_patience = 0  # evaluations without improvement; 0: off
  # Bookkeeping.
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 2
  c.stop_after = 0               # stop (resumably) after this step, as a preemption would
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
      raise cli.UserError(f"unknown config argument {key!r}; known: {', '.join(defaults)}")
    default = defaults[key]
    if not eq:
      if not isinstance(default, bool):
        raise cli.UserError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
      continue
    try:
      if isinstance(default, bool):
        out[key] = value.strip().lower() in ("1", "true", "yes")
      else:
        out[key] = type(default)(value.strip())
    except ValueError:
      raise cli.UserError(f"config argument {key}={value!r} is not a {type(default).__name__}") \
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


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  d = config.to_dict()
  return {k: cli.to_jsonable(d.get(k)) for k in TRAJECTORY_KEYS}


# ---------------------------------------------------------------------------------------------
# The command line: one-line errors for what ml_collections reports with a traceback.
# ---------------------------------------------------------------------------------------------


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """'configs/x.py[:arg]' -> get_config(arg), as config_flags does it."""
  path, _, arg = spec.partition(":")
  p = Path(path)
  if not p.is_file():
    raise cli.UserError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location(f"_bonejax_config_{p.stem}", p)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except cli.UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise cli.UserError(f"cannot load config {path!r}: {type(e).__name__}: {e}") from None
  if not hasattr(module, "get_config"):
    raise cli.UserError(f"config {path!r} has no get_config()")
  return module.get_config(arg) if arg else module.get_config()


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
          raise cli.UserError(f"unknown config key {key!r} (--{flag}.{key}): {where} has "
                              f"{', '.join(known) or 'no fields'}")
        node = node[part]
  except cli.UserError as e:
    print(f"error: {cli._one_line(e)}", file=sys.stderr)
    sys.exit(cli.EXIT_BAD_INPUT)
