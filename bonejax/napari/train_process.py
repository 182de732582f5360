"""`bonejax train` (bonejax/cli/train.py) as a child process: its command line, the
widget's settings, its progress.

Training runs in its own process (the viewer stays responsive, and JAX, the data stream and
orbax live and die with it), started exactly as a user would start it from a shell:
`python launch/train.py --config=C --workdir=W --config.KEY=VALUE ...`. Stop is Ctrl-C: SIGINT,
which the trainer answers by ending its loop and waiting for its checkpoint writes; the run
resumes from the newest checkpoint in WORKDIR when started again (same command). Progress is
read from the files the trainer writes anyway: WORKDIR/metrics.csv (crash-safe appends) and
WORKDIR/checkpoints/STEP/.

Settings (config, workdir and the `--config.KEY` overrides) load from and save to a JSON file:
  {"config": "configs/demo.py", "workdir": "/tmp/run",
   "overrides": {"num_steps": 400, "batch_size": 16, "patch_size": 64, "dataset": "/data"}}
A JSON object of overrides alone loads too.

Layers (the widget's "image + labels layers"): the pair becomes a two-scan dataset in
WORKDIR/layers-data. Sparse labels, where a user paints a few slices and leaves the rest: the
widget's "unlabelled value" names the layer value of unlabelled voxels (0: napari's unpainted
ones; background is then painted as 1, class k as k + 1); they are stored as the dataset's
unlabelled value 255 and training ignores them (layer_labels).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import bonejax
from bonejax.core import errors, outputs
from bonejax.data import store

REPO = Path(bonejax.__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.py"
STDOUT, STDERR = "napari-train.out", "napari-train.log"
LAYERS_DATASET = "layers-data"  # WORKDIR/layers-data: image and labels layers imported
VAL_FRACTION = 0.2              # of the slices of a layer pair, the last ones: validation


# ---------------------------------------------------------------------------------------------
# Settings.
# ---------------------------------------------------------------------------------------------


def config_file(spec: str) -> Path:
  """The file of a `configs/x.py[:arg]` spec (relative to the repository when not found)."""
  path = spec.partition(":")[0]
  p = Path(path)
  if not p.is_absolute() and not p.exists() and (REPO / p).exists():
    p = REPO / p
  return p


def check_settings(config: str, workdir: str, overrides: dict[str, Any]) -> None:
  if not config:
    raise errors.UserError("choose a config file (configs/demo.py is the demo)")
  if not config_file(config).is_file():
    raise errors.UserError(f"config file {config.partition(':')[0]!r} does not exist")
  if not workdir:
    raise errors.UserError("choose a run directory (workdir)")
  if Path(workdir).exists() and not Path(workdir).is_dir():
    raise errors.UserError(f"workdir {workdir!r} exists and is not a directory")
  dataset = overrides.get("dataset")
  if dataset:
    check_dataset(dataset)


def check_dataset(path: str | os.PathLike) -> store.Dataset:
  p = Path(path)
  if not p.is_dir():
    raise errors.UserError(f"dataset {str(p)!r} is not a directory")
  if not (p / store.DATASET_JSON).exists():
    raise errors.UserError(f"{str(p)!r} is not a dataset (no {store.DATASET_JSON}); import scans "
                        f"with launch/import_volume.py, or train on layers")
  return store.open_dataset(p)


def command(config: str, workdir: str, overrides: dict[str, Any]) -> list[str]:
  cfg = config_file(config)
  arg = config.partition(":")[2]
  argv = [sys.executable, "-u", "-m", "bonejax.cli.train",
          f"--config={cfg}{':' + arg if arg else ''}",
          f"--workdir={workdir}"]
  for key, value in overrides.items():
    if isinstance(value, (list, tuple)):
      value = ",".join(str(v) for v in value)
    argv.append(f"--config.{key}={value}")
  return argv


def save_settings(path: str | os.PathLike, config: str, workdir: str,
                  overrides: dict[str, Any]) -> None:
  outputs.atomic_write_json(path, {"config": config, "workdir": workdir,
                               "overrides": dict(overrides)})


def load_settings(path: str | os.PathLike) -> dict[str, Any]:
  """{"config", "workdir", "overrides"} (missing ones None / {}) from a settings JSON."""
  p = errors.require_exists(path, "settings file")
  try:
    data = json.loads(p.read_text())
  except (OSError, ValueError) as e:
    raise errors.UserError(f"{str(p)!r} is not a JSON settings file: {errors.one_line(e)}") from None
  if not isinstance(data, dict):
    raise errors.UserError(f"{str(p)!r} must hold a JSON object")
  if "overrides" in data or "config" in data or "workdir" in data:
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
      raise errors.UserError(f"{str(p)!r}: overrides must be a JSON object")
    return {"config": data.get("config"), "workdir": data.get("workdir"),
            "overrides": overrides}
  return {"config": None, "workdir": None, "overrides": data}


# ---------------------------------------------------------------------------------------------
# A dataset from layers.
# ---------------------------------------------------------------------------------------------


def check_layer_pair(image: np.ndarray, labels: np.ndarray, classes: Sequence[str] | None,
                     unlabelled: int | None = None) -> list[str]:
  """The class names of an image / labels layer pair to train on (bad input: UserError).

  `unlabelled` (sparse labels): the layer value of voxels nobody labelled (see layer_labels)."""
  return layer_labels(image, labels, classes, unlabelled)[1]


def layer_labels(image: np.ndarray, labels: np.ndarray, classes: Sequence[str] | None,
                 unlabelled: int | None = None) -> tuple[np.ndarray, list[str], int | None]:
  """(dataset labels uint8, class names, the dataset's unlabelled value or None) of a layer pair.

  Dense (`unlabelled` None): a layer value is a class id, 0 background. Sparse: the layer value
  `unlabelled` (0: napari's unpainted voxels) means "nobody labelled this voxel"; it becomes the
  dataset's unlabelled value (store.UNLABELLED, 255), which training ignores, and the layer
  values above it shift down by one, so the classes stay 0, 1, 2, ... With 0 unlabelled, a user
  paints background as 1, class k as k + 1. The layer's class names, if it has any, are by layer
  value; the unlabelled value's name is dropped.
  """
  if image.ndim != 3:
    raise errors.UserError(f"the image layer must be 3D (Z, Y, X), got shape {image.shape}")
  if labels.shape != image.shape:
    raise errors.UserError(f"labels shape {labels.shape} != image shape {image.shape}")
  if image.shape[0] < 2:
    raise errors.UserError("the volume needs at least 2 slices (training and validation parts)")
  if not np.issubdtype(labels.dtype, np.integer):
    raise errors.UserError(f"labels must be integers, got {labels.dtype}")
  if unlabelled is None:
    hi = int(labels.max()) if labels.size else 0
    if classes is None:
      classes = ["background"] + [f"class_{k}" for k in range(1, max(hi, 1) + 1)]
    store.validate_labels(labels, image.shape, len(classes))
    return labels.astype(np.uint8), list(classes), None
  u = int(unlabelled)
  if not 0 <= u <= 255:
    raise errors.UserError(f"unlabelled value {u} must be in 0..255 (0: napari's unpainted "
                           "voxels)")
  lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
  if lo < 0 or hi > 255:
    raise errors.UserError(f"label value {lo if lo < 0 else hi} is outside 0..255")
  painted = labels != u
  if not painted.any():
    raise errors.UserError(f"the labels layer has no labelled voxel (every voxel is the "
                           f"unlabelled value {u}): paint a few slices")
  out = (labels.astype(np.int16) - (labels > u)).astype(np.uint8)  # values 0..255 checked
  out[~painted] = store.UNLABELLED
  present = np.unique(out[painted])
  if present.size < 2:
    raise errors.UserError(f"sparse labels need at least 2 classes besides the unlabelled value "
                           f"{u} (with 0 unlabelled: paint background as 1, bone as 2)")
  top = int(present[-1])
  if classes is None:
    classes = ["background"] + [f"class_{k}" for k in range(1, top + 1)]
  else:
    classes = [c for v, c in enumerate(classes) if v != u]
  if len(classes) > store.UNLABELLED:
    raise errors.UserError(f"{len(classes)} classes collide with the unlabelled value "
                           f"{store.UNLABELLED}")
  if top >= len(classes):
    raise errors.UserError(f"label value {top + (top >= u)} has no class: the layer names "
                           f"{len(classes)} classes besides the unlabelled value {u}")
  return out, list(classes), store.UNLABELLED


def _val_slices(labels: np.ndarray, unlabelled: int | None) -> int:
  """How many of the last Z slices validate: ~VAL_FRACTION of the slices (dense labels), or
  of the labelled voxels (sparse), each part keeping a labelled voxel."""
  z = labels.shape[0]
  if unlabelled is None:
    return min(max(1, int(round(VAL_FRACTION * z))), z - 1)
  per_slice = (labels != unlabelled).reshape(z, -1).sum(1)
  tail = np.cumsum(per_slice[::-1])  # labelled voxels in the last k + 1 slices
  n_val = int(np.searchsorted(tail, VAL_FRACTION * tail[-1])) + 1
  n_val = min(max(1, n_val), z - 1)
  if not per_slice[:z - n_val].any() or not per_slice[z - n_val:].any():
    raise errors.UserError("sparse labels: paint at least two Z slices (or planes of another "
                           "axis): the last labelled slices validate, the others train")
  return n_val


def import_layers(out: str | os.PathLike, name: str, image: np.ndarray, labels: np.ndarray,
                  classes: Sequence[str], voxel_size_um: Any,
                  unlabelled: int | None = None) -> Path:
  """Writes the pair as a two-scan dataset: the first slices train, the last validate.

  One volume cannot be split by scan, and a split by interleaved slices leaks near-copies into
  validation; a contiguous block of the last ~20 % of slices (sparse labels: holding ~20 % of
  the labelled voxels) is the least leaky split of one volume (it touches training only at one
  face). `labels` are the dataset's (layer_labels); `unlabelled` is recorded in dataset.json.
  """
  z = image.shape[0]
  store.validate_labels(labels, image.shape, len(classes), unlabelled)
  n_val = _val_slices(labels, unlabelled)
  from bonejax.io import voxel as voxel_lib
  from bonejax.napari import layers
  zyx = layers.zyx(voxel_size_um)
  # (Z, Y, X) kept; a layer with no voxel size is recorded as assumed (1 um), as import does.
  attrs = {"source": f"napari layer {name}", **voxel_lib.voxel_attrs(zyx or (1.0, 1.0, 1.0)),
           "voxel_size_source": "given" if zyx else "assumed", "classes": list(classes)}
  with outputs.atomic_output(out, overwrite=False) as tmp:
    tmp.mkdir(parents=True)
    for scan, sl in (("train", slice(0, z - n_val)), ("val", slice(z - n_val, z))):
      store.write_scan(tmp / scan, image[sl], labels[sl].astype(np.uint8), attrs)  # checked
    store.write_dataset_json(tmp, classes, ["train", "val"], unlabelled)
  return Path(out)


def check_imported(dataset: str | os.PathLike, unlabelled: int | None) -> None:
  """A layers dataset kept from an earlier Start must be of the same kind (dense or sparse)."""
  ds = store.open_dataset(dataset)
  if ds.unlabelled != unlabelled:
    kind = lambda v: "dense labels" if v is None else f"sparse labels (unlabelled {v})"  # noqa: E731
    raise errors.UserError(f"{str(dataset)!r} holds layers imported with {kind(ds.unlabelled)}, "
                           f"not {kind(unlabelled)}: choose another workdir (or delete it)")


# ---------------------------------------------------------------------------------------------
# The process and what it leaves in WORKDIR.
# ---------------------------------------------------------------------------------------------

_LIVE: "weakref.WeakSet[subprocess.Popen]" = weakref.WeakSet()


def start(argv: list[str], workdir: str | os.PathLike) -> subprocess.Popen:
  """Starts the run with stdout and stderr in WORKDIR files (a pipe nobody drains would block
  the trainer)."""
  w = Path(workdir)
  w.mkdir(parents=True, exist_ok=True)
  with open(w / STDOUT, "w") as out, open(w / STDERR, "w") as err:
    proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
  _LIVE.add(proc)
  return proc


def interrupt(proc: subprocess.Popen) -> None:
  """Ctrl-C: the trainer stops its loop and waits for its checkpoint writes."""
  if proc.poll() is None:
    proc.send_signal(signal.SIGINT)


@atexit.register
def _stop_all() -> None:
  # Closing napari stops its training runs as Ctrl-C would (they resume later).
  for proc in list(_LIVE):
    interrupt(proc)


def metrics_rows(workdir: str | os.PathLike) -> list[dict[str, str]]:
  from bonejax.train import curves
  path = Path(workdir) / "metrics.csv"
  if not path.exists():
    return []
  try:
    return curves.read_rows(path)
  except OSError:
    return []


def series(rows: list[dict[str, str]], key: str) -> tuple[list[int], list[float]]:
  xs, ys = [], []
  for r in rows:
    try:
      x, y = int(r["step"]), float(r[key])
    except (KeyError, TypeError, ValueError):
      continue
    xs.append(x)
    ys.append(y)
  return xs, ys


def latest_checkpoint(workdir: str | os.PathLike) -> int | None:
  """The newest complete checkpoint step (orbax renames a step into place when written)."""
  d = Path(workdir) / "checkpoints"
  if not d.is_dir():
    return None
  steps = [int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir()]
  return max(steps) if steps else None


def outcome(workdir: str | os.PathLike, returncode: int) -> tuple[dict[str, Any] | None, str]:
  """(result JSON or None, one line for the status) of a finished run."""
  w = Path(workdir)
  out = (w / STDOUT).read_text() if (w / STDOUT).exists() else ""
  err = (w / STDERR).read_text() if (w / STDERR).exists() else ""
  result = None
  lines = [ln for ln in out.splitlines() if ln.strip()]
  if returncode == 0 and lines:
    try:
      result = json.loads(lines[-1])
    except ValueError:
      result = None
  if result is not None:
    best = result.get("best_val_miou")
    best = f"{best:.4f}" if isinstance(best, (int, float)) else "n/a"
    return result, (f"finished at step {result.get('steps')} ({result.get('stopped')}); best "
                    f"validation miou_fg {best} at step {result.get('best_step')}; model: "
                    f"{result.get('model_dir')}")
  errors = [ln[len("error:"):].strip() for ln in err.splitlines() if ln.startswith("error:")]
  return None, errors[-1] if errors else f"launch/train.py exited with status {returncode}"
