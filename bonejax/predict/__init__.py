"""Predicting whole volumes: plane sets, multi-axis voting, in memory or out of core.

The volume is cut into stacks of 2D planes along 1, 3, 9 or 12 plane sets (`planesets`); every
plane goes whole through the model in one compiled call per plane shape (`engine`); the 45-degree sets rotate the volume first and the probabilities
back (`rotate`). A `runner` streams slabs of planes through the engine on reader and writer
threads into accumulators (`volumes`: numpy arrays, or scratch zarr arrays out of core, as
`memory` plans from the host budget). Each set gives probabilities (Z, Y, X, K); they are voted
soft (mean) or by majority.

Modules, one job each:
  planesets  which planes (PlaneSet, plane_sets) and voting (fuse, majority_labels)
  engine     PlaneEngine: raw planes -> probabilities, batching over devices, tiling, budget
  rotate     45-degree rotations of volumes and back
  volumes    slab volumes in memory or on disk; accumulators and sinks
  memory     host and device budgets, resident sizes, device-memory estimates
  runner     the threaded run of plane sets for one volume
  hosts      several processes on one volume: shares, shared scratch and outputs
  api        predict_planes / predict_volume / make_engine: arrays in, arrays out
  source     the input and the bundle found, opened and read once
  plan       settings, bundle metadata, outputs and the per-input plan, checked before work
  writers    the output arrays of one prediction and their finishing touches
  predictor  Predictor: bundle loaded and compiled once, inputs to files (predict_scan)
  study      many scans: one output each, resumable, shared by processes, a summary table

Python API (for the demo, cross-validation and notebooks):
    probs = predict_planes(model, vol, stats=stats, planes=3)   # one (Z,Y,X,K) per plane set
    labels, mean = fuse(probs, "soft", plane_sets(3), DEFAULT_FACE_TAPER)  # as predict_volume
    labels = predict_volume(model, vol, stats=stats, planes=3, vote="soft")
    result = predict_scan("WORKDIR/model", "DATA/scan_000", output="pred.zarr")
    predictor = Predictor("WORKDIR/model", planes=3)             # load and compile once
    for name in scans:
      predictor.predict(f"DATA/{name}", f"pred/{name}.zarr")
Every batch is spread over all local devices (`devices=N`: the first N). Several processes
predict one volume with `predict_scan(..., group=distributed.Group.from_jax())` in each.
`model` may be an nnx module, a `bundle.Bundle` or a prepared `PlaneEngine` (which keeps its
compiled functions across calls).
"""

from bonejax.predict import rotate
from bonejax.predict.api import (Prediction, as_volume, axis_probabilities, bundle_model,
                                 make_engine, predict_planes, predict_volume, run_prediction)
from bonejax.predict.engine import (DEFAULT_BATCH, DTYPES, STRIDE, Plan, PlaneEngine,
                                    background_value, blend_window, compute_dtype, tile_starts,
                                    with_compute_dtype)
from bonejax.predict.memory import (DEFAULT_BUDGET_GB, device_budget_bytes, resident_bytes,
                                    resident_limit)
from bonejax.predict.planesets import (AXES, DEFAULT_FACE_TAPER, PLANES, VOTES, PlaneSet,
                                       check_vote, face_weights, fuse, majority_labels,
                                       one_hot_argmax, plane_sets, run_order)
from bonejax.predict.predictor import Predictor, predict_scan
from bonejax.predict.source import find_bundle
from bonejax.predict.windows3d import WindowEngine, make_window_engine, predict_volume_3d

__all__ = [
    "AXES", "DEFAULT_BATCH", "DEFAULT_BUDGET_GB", "DEFAULT_FACE_TAPER", "face_weights", "DTYPES", "PLANES", "STRIDE", "VOTES", "Plan",
    "PlaneEngine", "PlaneSet", "Predictor", "Prediction", "as_volume", "axis_probabilities",
    "background_value", "blend_window", "bundle_model", "check_vote", "compute_dtype",
    "device_budget_bytes", "find_bundle", "fuse", "majority_labels", "make_engine",
    "one_hot_argmax", "plane_sets", "predict_planes", "predict_scan", "predict_volume",
    "resident_bytes", "resident_limit", "rotate", "run_order", "run_prediction",
    "tile_starts", "with_compute_dtype", "WindowEngine",
    "make_window_engine", "predict_volume_3d",
]
