r"""Segments a micro-CT volume with a trained model bundle, voting over plane sets.

  python launch/predict.py --model=WORKDIR/model --input=DATA/scan_000 --output=pred.zarr \
      --planes=3 --vote=soft [--save_probs=probs.zarr] [--dtype=bfloat16]

Inputs: a scan directory, a multi-page TIFF, a folder of 2D slices, a .npy, a zarr or OME-Zarr
array, an HDF5 / NeXus (`--image_key`), MRC or Scanco .isq file (intensity statistics are read
from the scan or computed while reading). Outputs: zarr v3 uint8 labels (attributes: model,
planes, vote, classes), an OME-Zarr (PATH.ome.zarr: NGFF 0.5 multiscale labels with voxel size,
class names and colours) or a TIFF (BigTIFF over 4 GiB), written atomically. An input whose
voxel size differs from the one the bundle was trained at is resampled to it, predicted, and
mapped back (`--no_resample` to skip). `--save_uncertainty` adds entropy / disagreement maps and
lists the 10 most uncertain slices per axis in the result. `--planes`: 1 (one axis, `--axis`), 3 (orthogonal), 9 (plus 45-degree rotations),
12 (orthogonal x four 90-degree in-plane rotations). Volumes whose arrays exceed
`--memory_budget_gb` are processed out of core in a scratch directory next to the output.
Prints progress on stderr and, as the last stdout line, JSON with output, shape, seconds,
voxels_per_second, planes, vote, classes, devices, processes, ...

Many scans: --input may name a dataset, a folder of scans or volume files, a glob (quoted) or a
list file (.txt: one path a line); --output is then a directory with one NAME.zarr per scan
(--output_format=ome.zarr or tif for the others; --save_probs / --save_uncertainty directories
too). The bundle is loaded and compiled once. Completed outputs are kept and skipped, so the
same command resumes a killed run; a scan that cannot be read or predicted is recorded and the
others go on (exit 2 at the end; --fail_fast stops at once). OUTPUT/summary.json and
summary.csv hold a row per scan (status, seconds, voxels/s, error). With the multi-host flags
the processes share the scans, each scan whole on one process; independent runs of the same
command share them too.
  python launch/predict.py --model=WORKDIR/model --input=DATA --output=preds/

Every batch of planes is spread over all local devices (`--devices=N`: the first N). Several
hosts predict one volume together with the flags of train.py, the same command on every host:
  --coordinator_address=HOST0:PORT --num_processes=N --process_id=I
or --multihost on a cluster JAX detects by itself (SLURM, Open MPI, Kubernetes/GKE, Cloud TPU).
Each process predicts its own share of the planes; the output (and the scratch directory beside
it) must be on a filesystem every host sees at the same path. Process 0 claims the outputs and
marks them complete. A process that fails or dies makes the others fail with one line (at most
--heartbeat_timeout_s after a death; --barrier_timeout_s bounds every wait).
"""

import contextlib
import sys
from pathlib import Path


from absl import flags

from bonejax.cli import runner  # (jax is imported once the flags are good)
from bonejax.core import compile_cache, distributed, dtype_auto, errors, heap, outputs

PLANES = (1, 3, 9, 12)  # = bonejax.predict.PLANES, VOTES, DTYPES (+ auto)
VOTES = ("soft", "majority", "max")
DTYPES = ("auto", "float32", "bfloat16", "float16")

_MODEL = flags.DEFINE_string("model", None, "Model bundle directory (WORKDIR/model).",
                             required=True)
_INPUT = flags.DEFINE_string("input", None, "Scan directory, .tif, folder of 2D slices, .npy, "
                             "zarr / OME-Zarr, HDF5 / NeXus, MRC or .isq; or many scans: a "
                             "dataset, a folder of scans, a glob or a list file (.txt).",
                             required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Labels output: PATH.zarr, PATH.ome.zarr "
                              "(OME-NGFF 0.5 multiscale labels) or PATH.tif; a directory for "
                              "many scans.", required=True)
_FORMAT = flags.DEFINE_enum("output_format", "zarr", ["zarr", "ome.zarr", "tif"], "Many scans: "
                            "the format of each scan's labels in --output.")
_FAIL_FAST = flags.DEFINE_bool("fail_fast", False, "Many scans: stop at the first scan that "
                               "fails (default: record it and go on).")
# Shown after the everyday flags in --help (tuning and debugging).
EXPERT_FLAGS = ("batch_size", "device_memory_gb", "inference_graph", "tile_size", "tile_overlap",
                "out_of_core", "devices", "image_key", "no_resample", "memory_budget_gb")
_POSTPROCESS = flags.DEFINE_string(
    "postprocess", None, "Clean-up of the labels, rules applied in order, comma-separated "
    "CLASS:OP[=SIZE] (CLASS a name or index): min_size=N voxels or =Vum3 (smaller components "
    "take their neighbours' label), largest (keep the largest component), fill_holes (fill "
    "what the class encloses). E.g. bone:min_size=500,pore:fill_holes. Out of core.")
_PLANES = flags.DEFINE_string("planes", "3", "Plane sets voted over: 1, 3, 9 or 12.")
_VOTE = flags.DEFINE_string("vote", "soft", "soft (mean probabilities), majority, or max "
                            "(class of the highest single-set probability).")
_FACE_TAPER = flags.DEFINE_integer(
    "face_taper", 4, "Soft vote near the volume's faces: a plane set whose planes cut a face "
    "sees the voxels there with context on one side only, so its weight rises from 1/N at that "
    "face to 1 at N voxels from it (the set parallel to the face keeps its full weight). 0: "
    "every set weighs the same everywhere.")
_AXIS = flags.DEFINE_string("axis", None, "Slicing axis for --planes=1: 0 (Z), 1 (Y), 2 (X); "
                            "default 0.")
_SAVE_PROBS = flags.DEFINE_string("save_probs", None, "Also write the mean probabilities "
                                  "(Z, Y, X, C) float32 to this .zarr.")
_SAVE_UNC = flags.DEFINE_string("save_uncertainty", None, "Also write per-voxel uncertainty "
                                "(entropy of the fused probabilities, fraction of plane sets "
                                "disagreeing with the vote; uint8) to this .zarr, .ome.zarr or "
                                ".tif.")
_NO_RESAMPLE = flags.DEFINE_bool("no_resample", False, "Predict on the input grid even when its "
                                 "voxel size differs from the one the model was trained at.")
_IMAGE_KEY = flags.DEFINE_string("image_key", None, "Dataset inside an HDF5 / NeXus --input.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Planes per device call (shrunk per plane shape "
                              "to fit the device memory).")
_BUDGET = flags.DEFINE_float("memory_budget_gb", 4.0, "Host memory for volume and "
                             "accumulators; beyond it the run goes out of core.")
_DEVICE_GB = flags.DEFINE_float("device_memory_gb", None, "Memory one call may use on each "
                                "device (default: 70% of the accelerator's, or on CPU a quarter "
                                "of --memory_budget_gb shared by the devices).")
_DTYPE = flags.DEFINE_string(
    "dtype", "auto", "Compute dtype: auto (bfloat16 on a GPU or a CPU with AMX / AVX512-BF16, "
    "else float32), float32, bfloat16 or float16.")
_GRAPH = flags.DEFINE_enum("inference_graph", "auto", ["auto", "measure", "xla", "off"],
                           "BatchNorm folded into the convolutions, each convolution lowered "
                           "by a fixed rule (auto: bf16 dot products where the CPU has them "
                           "and they pay), by timing each layer once per machine (measure), "
                           "as XLA's convolutions (xla); or off (the model as it is).")
_TILE = flags.DEFINE_integer("tile_size", None, "Force tiling of planes larger than this "
                             "(pixels); default: only when a plane does not fit the device.")
_OVERLAP = flags.DEFINE_integer("tile_overlap", None, "Tile overlap in pixels (default tile/4).")
_OOC = flags.DEFINE_enum("out_of_core", "auto", ["auto", "yes", "no"],
                         "Force (yes) or forbid (no) out-of-core processing.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing outputs.")
_WITH_IMAGE = flags.DEFINE_bool("with_image", False, "With an .ome.zarr --output (or "
                                "--output_format=ome.zarr): write the input image too, the "
                                "labels under its labels/ group (one "
                                "OME-Zarr that napari-ome-zarr and MoBIE open as image + labels).")
_DEVICES = flags.DEFINE_integer("devices", None, "Local devices to spread batches over (default: "
                                "all); each takes --batch_size planes per call.")
_MULTI = distributed.define_flags()  # --coordinator_address --num_processes --process_id
_COMPILATION_CACHE = compile_cache.define_flag()
                                     # --multihost, as train.py's
_BARRIER_S = flags.DEFINE_float("barrier_timeout_s", 1800.0, "Multi-host: the longest one "
                                "process waits for the others (at the start and between passes).")
_HEARTBEAT_S = flags.DEFINE_integer("heartbeat_timeout_s", 60, "Multi-host: a process silent this "
                                    "long is taken for dead and the others fail.")


def _int_flag(name: str, text: str | None, choices=None) -> int | None:
  if text is None:
    return None
  try:
    value = int(str(text).strip())
  except ValueError:
    raise errors.UserError(f"--{name}={text!r} is not an integer") from None
  if choices is not None and value not in choices:
    raise errors.UserError(f"--{name}={value} must be one of {', '.join(map(str, choices))}")
  return value


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  planes = _int_flag("planes", _PLANES.value, PLANES)
  axis = _int_flag("axis", _AXIS.value, (0, 1, 2))
  if axis is not None and planes != 1:
    raise errors.UserError(f"--axis goes with --planes=1 only (got --planes={planes})")
  if _VOTE.value not in VOTES:
    raise errors.UserError(f"--vote={_VOTE.value!r} must be soft, majority or max")
  if _DTYPE.value not in DTYPES:
    raise errors.UserError(f"--dtype={_DTYPE.value!r} must be one of {', '.join(DTYPES)}")
  heap.setup()  # XLA's per-step buffers reused, not page-faulted (off: env 0)
  compile_cache.setup(_COMPILATION_CACHE.value)  # before anything compiles
  if not _BUDGET.value > 0:
    raise errors.UserError(f"--memory_budget_gb={_BUDGET.value} must be positive")
  if _BATCH.value < 1:
    raise errors.UserError(f"--batch_size={_BATCH.value} must be positive")
  if _DEVICE_GB.value is not None and not _DEVICE_GB.value > 0:
    raise errors.UserError(f"--device_memory_gb={_DEVICE_GB.value} must be positive")
  if _TILE.value is not None and _TILE.value < 1:
    raise errors.UserError(f"--tile_size={_TILE.value} must be positive")
  if _OVERLAP.value is not None and _OVERLAP.value < 0:
    raise errors.UserError(f"--tile_overlap={_OVERLAP.value} must be >= 0")
  if _OVERLAP.value is not None and _TILE.value is not None and _OVERLAP.value >= _TILE.value:
    raise errors.UserError(f"--tile_overlap={_OVERLAP.value} must be smaller than "
                        f"--tile_size={_TILE.value}")
  if _DEVICES.value is not None and _DEVICES.value < 1:
    raise errors.UserError(f"--devices={_DEVICES.value} must be at least 1")
  if not _BARRIER_S.value > 0:
    raise errors.UserError(f"--barrier_timeout_s={_BARRIER_S.value} must be positive")
  if _HEARTBEAT_S.value < 1:
    raise errors.UserError(f"--heartbeat_timeout_s={_HEARTBEAT_S.value} must be positive")
  multihost = _MULTI.requested()
  ooc = {"auto": None, "yes": True, "no": False}[_OOC.value]
  bundle = Path(_MODEL.value)
  if not (bundle / "model.json").exists() and (bundle / "model" / "model.json").exists():
    bundle = bundle / "model"  # a training workdir: its bundle is the input, not the workdir
  from bonejax.predict import study  # no JAX backend is touched before initialize
  many = study.is_study(_INPUT.value)
  group = distributed.SINGLE
  if multihost:
    # Recoverable: a process that dies must not take the others down with JAX's fatal log;
    # they notice it themselves and fail with one line.
    _MULTI.initialize(recoverable=True, heartbeat_timeout_s=_HEARTBEAT_S.value,
                      init_timeout_s=_BARRIER_S.value)
    group = distributed.Group.from_jax(_BARRIER_S.value, namespace="bonejax/predict")
  # After initialize: `auto` asks JAX for its backend. The result records the dtype it chose.
  settings = dict(planes=planes, axis=axis, vote=_VOTE.value, face_taper=_FACE_TAPER.value,
                  batch_size=_BATCH.value,
                  memory_budget_gb=_BUDGET.value, device_memory_gb=_DEVICE_GB.value,
                  dtype=dtype_auto.resolve(_DTYPE.value), tile_size=_TILE.value,
                  tile_overlap=_OVERLAP.value,
                  out_of_core=ooc, resample=not _NO_RESAMPLE.value, image_key=_IMAGE_KEY.value,
                  devices=_DEVICES.value, graph=_GRAPH.value)
  with group.guard():  # SIGTERM is Ctrl-C here too (cli.runner): the same clean-up
    errors.require_exists(_MODEL.value, "model bundle")
    if len(set(group.allgather("input kind", str(many)))) > 1:
      raise errors.UserError(f"--input {_INPUT.value!r} is a study of scans on some processes "
                             f"and one volume on others: is it on a filesystem all share?")
    if many:
      return _predict_study(study, bundle, settings, group)
    return _predict_one(bundle, settings, group)


def _predict_one(bundle: Path, settings: dict, group) -> dict:
  """One volume (several processes: each predicts its share of its planes)."""
  with contextlib.ExitStack() as claims:
    # Claim the outputs for the whole run (a second run writing them is refused), then fail on
    # an existing, foreign or input-overlapping output before any work. Several processes:
    # process 0 holds the claims for all of them.
    for out in (_OUTPUT.value, _SAVE_PROBS.value, _SAVE_UNC.value):
      if out:
        if group.is_main:
          claims.enter_context(outputs.claim_output(out))
        outputs.check_output(out, _OVERWRITE.value, inputs=(_INPUT.value, bundle))
    errors.require_exists(_INPUT.value, "input")
    _quiet_orbax()
    from bonejax import predict
    predictor = predict.Predictor(bundle, progress=True, group=group, **settings)
    return predictor.predict(_INPUT.value, _OUTPUT.value, save_probs=_SAVE_PROBS.value,
                             save_uncertainty=_SAVE_UNC.value, overwrite=_OVERWRITE.value,
                             keep_labels=False, with_image=_WITH_IMAGE.value,
                             postprocess=_POSTPROCESS.value)


def _predict_study(study, bundle: Path, settings: dict, group) -> dict:
  """Many scans, each whole on one process (see bonejax/predict/study.py)."""
  if _WITH_IMAGE.value and _FORMAT.value != "ome.zarr":
    raise errors.UserError("--with_image needs --output_format=ome.zarr for a study of scans")
  items = study.list_scans(_INPUT.value)
  layout = study.Layout(Path(_OUTPUT.value), study.FORMATS[_FORMAT.value],
                        Path(_SAVE_PROBS.value) if _SAVE_PROBS.value else None,
                        Path(_SAVE_UNC.value) if _SAVE_UNC.value else None,
                        with_image=_WITH_IMAGE.value, postprocess=_POSTPROCESS.value)
  inputs = [bundle] + ([_INPUT.value] if Path(_INPUT.value).is_dir() else [])
  layout.check(inputs)
  _quiet_orbax()
  from bonejax import predict
  # Each scan whole on one process: the predictor itself works alone.
  predictor = predict.Predictor(bundle, progress=True, **settings)
  record = {"model": str(bundle.resolve()), "output_format": _FORMAT.value,
            "postprocess": _POSTPROCESS.value,
            **{k: settings[k] for k in ("planes", "axis", "vote", "face_taper", "dtype",
                                        "resample")}}
  return study.run_study(predictor, items, layout, overwrite=_OVERWRITE.value,
                         fail_fast=_FAIL_FAST.value, group=group, settings=record)


def _quiet_orbax() -> None:
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore step at INFO

def run() -> None:
  runner.run(main)


if __name__ == "__main__":
  run()
