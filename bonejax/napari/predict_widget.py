"""The Predict widget: a model bundle on an image layer, in a worker thread, cancellable.

What launch/predict.py does, on the volume already open: the same `Predictor` (plane
sets, voting, memory budget, compute dtype) with the bundle's normalisation rule and, for a
layer read from a scan, the scan's stored intensity statistics. The labels come back as a
labels layer (class names and colours from the bundle, the image's scale), optionally with one
probability layer per class and an uncertainty (entropy) layer. An optional output (.zarr labels
with attributes, .ome.zarr, or .tif) is claimed at the start and written under a temporary
name, renamed when complete: Cancel, or a failure, leaves nothing at that path. A `.pth` /
`.safetensors` model is first converted to a bundle (cached under the temp directory) by
launch/convert_weights.py, when this bonejax has it.

As predict.py: when the bundle records the voxel size it was trained at and the layer's (Z, Y,
X) voxel size differs, the layer is resampled to the model's grid, predicted there, and every
plane set's probabilities are mapped back to the layer's grid before the vote (`resample`);
untick "resample" to predict on the layer's grid. The bar is busy (moving, with the phase's
name) while the model loads and compiles, then counts planes with rate and ETA as the command
line does. Every layer added has the image's (Z, Y, X) scale in micrometres, and a saved
output records the voxel size (zarr attributes, OME-Zarr scale, TIFF ImageJ calibration).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QHBoxLayout,
                            QProgressBar, QPushButton, QVBoxLayout, QWidget)

import bonejax
from bonejax.models import bundle as bundle_lib
from bonejax.core import compile_cache, errors, outputs
from bonejax.data import store
from bonejax.io import resample as resample_lib, tiff, voxel as voxel_lib
from bonejax.napari import jobs, layers, qt
from bonejax.predict import DEFAULT_BUDGET_GB, DTYPES, PLANES, VOTES, Predictor

REPO = Path(bonejax.__file__).resolve().parents[1]
CONVERTER = REPO / "launch" / "convert_weights.py"
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")
# Offered when this bonejax has them: uncertainty maps from the mean probabilities
# (bonejax.evaluate.uncertainty) and OME-Zarr label outputs (bonejax.io.ome_zarr).
HAS_UNCERTAINTY = importlib.util.find_spec("bonejax.evaluate.uncertainty") is not None
HAS_OME_ZARR = importlib.util.find_spec("bonejax.io.ome_zarr") is not None
OUTPUT_SUFFIXES = (".zarr", ".tif", ".tiff")


# ---------------------------------------------------------------------------------------------
# The job (worker thread; no Qt).
# ---------------------------------------------------------------------------------------------


def check_layer(layer, meta: dict[str, Any]) -> None:
  """Bad input before any work: no layer, not 3D, channels the bundle does not take."""
  if layer is None:
    raise errors.UserError("choose an image layer")
  shape = tuple(layers.data_of(layer).shape)
  rgb = bool(getattr(layer, "rgb", False))
  spatial = len(shape) - (1 if rgb else 0)
  if spatial == 2:
    raise errors.UserError(f"layer {layer.name!r} is 2D {shape}; bonejax predicts 3D volumes "
                        f"(Z, Y, X)")
  if not (spatial == 3 or (spatial == 4 and not rgb and shape[-1] <= 16)):
    raise errors.UserError(f"layer {layer.name!r} has shape {shape}; bonejax predicts (Z, Y, X) "
                        f"or (Z, Y, X, C) volumes")
  channels = shape[-1] if len(shape) == 4 else 1
  want = int(meta.get("in_channels", 1))
  if channels != want:
    raise errors.UserError(f"layer {layer.name!r} has {channels} channel(s) (shape {shape}); the "
                        f"model expects {want}")


def check_output(output: str, overwrite: bool) -> None:
  if not output:
    return
  if is_ome_zarr(output) and not HAS_OME_ZARR:
    raise errors.UserError(f"{output!r}: this bonejax cannot write OME-Zarr; save the labels as "
                        f".zarr or .tif")
  if Path(output).suffix.lower() not in OUTPUT_SUFFIXES:
    raise errors.UserError(f"output {output!r} must end in .zarr (zarr v3 labels), .ome.zarr or "
                        f".tif/.tiff")
  if (Path(output).exists() or Path(output).is_symlink()) and not overwrite:
    raise errors.UserError(f"output {output!r} exists; tick overwrite to replace it")


def convert_weights(path: Path) -> Path:
  """A bundle made from a .pth/.safetensors by launch/convert_weights.py (cached by content)."""
  if not CONVERTER.exists():
    raise errors.UserError(f"{path.name}: reading {path.suffix} weights needs "
                        f"launch/convert_weights.py, which this bonejax ({bonejax.__version__}) "
                        f"does not have; convert them to a bundle first")
  st = path.stat()
  key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
  out = Path(tempfile.gettempdir()) / "bonejax-napari-bundles" / f"{path.stem}-{key}"
  if (out / bundle_lib.MODEL_JSON).exists():
    return out
  run = subprocess.run([sys.executable, str(CONVERTER), f"--pth={path}", f"--out={out}"],
                       cwd=REPO, capture_output=True, text=True)
  if run.returncode != 0:
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("error:")]
    raise errors.UserError(lines[-1][len("error:"):].strip() if lines else
                        f"converting {path.name} failed (exit {run.returncode})")
  return out


def model_meta(path: str) -> tuple[Path, dict[str, Any] | None]:
  """(bundle or weights path, model.json or None for weights still to convert)."""
  if not path:
    raise errors.UserError("choose a model bundle (a training WORKDIR/model directory)")
  p = errors.require_exists(path, "model")
  if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES:
    if not CONVERTER.exists():
      convert_weights(p)  # raises the message
    return p, None
  from bonejax.predict import find_bundle
  p = find_bundle(p)
  return p, bundle_lib.read_meta(p)


def as_array(data: Any):
  """What Predictor.predict_volume reads: the tensorstore behind a lazy layer, else a numpy
  array."""
  ts_array = layers.tensorstore_of(data)
  return ts_array if ts_array is not None else np.asarray(data)


class ArraySource:
  """An in-memory (Z, Y, X[, C]) array as the VolumeSource `resample.ResampledSource` reads."""

  kind = "napari layer"
  array = "image"

  def __init__(self, arr: np.ndarray, voxel_size_um: Any, name: str = "layer"):
    self.arr = arr
    self.path = Path(name)
    self.shape = tuple(arr.shape)
    self.channels = self.shape[3] if len(self.shape) == 4 else 1
    self.dtype = self.source_dtype = np.dtype(arr.dtype)
    self.voxel_size_um = layers.zyx(voxel_size_um)

  def read_slab(self, z0: int, z1: int) -> np.ndarray:
    return np.asarray(self.arr[z0:z1])

  def close(self) -> None:
    pass


def model_voxel_size(b: Any) -> tuple[float, float, float] | None:
  """The voxel size the bundle was trained at (model.json `voxel_size_um`), or None."""
  return layers.zyx((getattr(b, "meta", None) or {}).get("voxel_size_um"))


def needs_resampling(layer_um: Any, model_um: Any) -> bool:
  a, b = layers.zyx(layer_um), layers.zyx(model_um)
  return a is not None and b is not None and not resample_lib.same_size(a, b)


def predict_resampled(predictor: Any, volume: Any, *, layer_um: Any, model_um: Any,
                      stats: dict[str, Any] | None, probs: bool,
                      progress: jobs.JobProgress) -> tuple[np.ndarray, np.ndarray | None]:
  """predict.py's path for another voxel size: the layer resampled (linearly) to the model's
  grid, each plane set predicted there and mapped back to the layer's grid before the vote
  (`resample.Regrid`, as `Predictor` does for files)."""
  from bonejax.predict import api
  progress.set_phase("resampling to the model's voxel size")
  src = resample_lib.ResampledSource(ArraySource(np.asarray(volume), layer_um), model_um,
                                     order=1)
  model_arr = src.read_slab(0, src.shape[0])
  progress.set_phase("compiling")
  engine, s = predictor.engine, predictor.settings
  vol = api.as_volume(model_arr)
  api.check_channels(vol, engine)
  # A scan's stored statistics still describe the resampled intensities (as predict.py keeps).
  engine.set_normalization(api.stats_for(vol, stats), predictor.info.rule)
  regrid = resample_lib.Regrid(tuple(np.shape(volume))[:3], model_arr.shape[:3])
  pred = api.run_prediction(engine, vol, predictor.sets, s.vote, budget_bytes=s.budget_bytes,
                            out_of_core=False, scratch_dir=None, keep_labels=True,
                            keep_probs=probs, progress=progress, regrid=regrid,
                            face_taper=s.face_taper)
  return pred.labels, pred.probs


def run_job(*, model: Path, volume: Any, stats: dict[str, Any] | None, planes: int,
            axis: int | None, vote: str, dtype: str, memory_budget_gb: float, probs: bool,
            uncertainty: bool, output: str, overwrite: bool, attrs: dict[str, Any],
            progress: jobs.JobProgress, resample: bool = True) -> dict[str, Any]:
  """Loads the bundle, predicts, writes the optional output; returns arrays and timings."""
  start = time.perf_counter()
  compile_cache.setup()  # the next prediction of a same-shaped image skips XLA (off: env 0)
  if model.is_file():
    progress.set_phase("converting the weights")
    model = convert_weights(model)
  progress.set_phase("loading the model")
  b = bundle_lib.load_bundle(model)
  uncertainty = uncertainty and HAS_UNCERTAINTY
  layer_um = layers.zyx(attrs.get("voxel_size_um"))
  model_um = model_voxel_size(b)
  regrid = resample and needs_resampling(layer_um, model_um)
  with contextlib.ExitStack() as stack:
    # Claimed before the work, written under a temporary name: Cancel leaves nothing there.
    # The file a layer was read from is an input: never overwritten.
    inputs = [attrs["source"]] if Path(str(attrs.get("source"))).exists() else []
    tmp = stack.enter_context(outputs.atomic_output(output, overwrite, inputs)) if output else None
    t0 = time.perf_counter()
    want_probs = probs or uncertainty
    progress.set_phase("compiling")
    predictor = Predictor(b, planes=planes, axis=axis, vote=vote, dtype=dtype,
                          memory_budget_gb=memory_budget_gb, progress=False, resample=False)
    if regrid:
      labels, mean = predict_resampled(predictor, volume, layer_um=layer_um, model_um=model_um,
                                       stats=stats, probs=want_probs, progress=progress)
    else:
      labels, mean, _ = predictor.predict_volume(volume, stats=stats, return_probs=want_probs,
                                                 progress=progress)
    seconds = time.perf_counter() - t0
    unc = None
    if uncertainty:
      from bonejax.evaluate import uncertainty as uncertainty_lib
      unc = uncertainty_lib.maps(mean, None, labels, 1)[..., 0]  # entropy, 0..255
    progress.check()
    if tmp is not None:
      progress.set_phase("writing")
      out_attrs = {k: v for k, v in attrs.items() if k != "voxel_size_um"}
      if layer_um is not None:
        out_attrs.update(voxel_lib.voxel_attrs(layer_um))
      if regrid:
        out_attrs["predicted_at_voxel_size_um"] = list(model_um)
      write_labels(tmp, Path(output), labels, dict(out_attrs, classes=b.classes,
                                                   model=str(model),
                                                   architecture=b.meta.get("model"),
                                                   planes=planes, vote=vote))
  voxels = math.prod(labels.shape)
  return {"labels": labels, "probs": mean if probs else None, "uncertainty": unc,
          "classes": b.classes, "resampled_to_um": list(model_um) if regrid else None,
          "seconds": seconds, "total_seconds": time.perf_counter() - start,
          "voxels_per_second": voxels / max(seconds, 1e-9), "output": output or None}


def is_ome_zarr(path: str | os.PathLike) -> bool:
  return str(path).lower().rstrip("/").endswith(".ome.zarr")


def write_labels(tmp: Path, final: Path, labels: np.ndarray, attrs: dict[str, Any]) -> None:
  """The labels as zarr v3 (with `attrs`), OME-Zarr or TIFF, each with the (Z, Y, X) voxel size
  (`voxel_size_zyx_um`, else `voxel_size_um`, in `attrs`) where the format keeps one."""
  v = layers.zyx(attrs.get("voxel_size_zyx_um", attrs.get("voxel_size_um")))
  if is_ome_zarr(final):
    from bonejax.io import ome_zarr
    w = ome_zarr.OmeZarrWriter(tmp, labels.shape, np.uint8, kind="labels",
                               classes=attrs["classes"], voxel_size_um=v, name=final.name)
    w.view[...].write(labels).result()
    w.finish(attrs)
  elif final.suffix.lower() == ".zarr":
    arr = store.create_array(tmp, labels.shape, np.uint8)
    arr.write(labels).result()
    store.set_array_attrs(tmp, attrs)
  else:
    # ImageJ spacing, unit and resolution: Fiji and BoneJ open it in micrometres.
    tiff.export_tiff(labels, tmp, overwrite=True, voxel_size_um=v)


# ---------------------------------------------------------------------------------------------
# The widget.
# ---------------------------------------------------------------------------------------------


class PredictWidget(QWidget):

  def __init__(self, napari_viewer):
    super().__init__()
    self.viewer = napari_viewer
    self.model = qt.PathEdit("bundle directory (WORKDIR/model) or .pth")
    self.model_file = QPushButton(".pth…")
    self.model_file.setToolTip("Pick PyTorch weights (.pth / .safetensors) instead of a bundle")
    self.model_file.clicked.connect(self._browse_weights)
    self.image = qt.LayerCombo(napari_viewer, "image")
    self.planes = QComboBox()
    self.planes.addItems([str(p) for p in PLANES])
    self.planes.setCurrentText("3")
    self.axis = QComboBox()
    self.axis.addItems(["0 (Z)", "1 (Y)", "2 (X)"])
    self.planes.currentTextChanged.connect(lambda t: self.axis.setEnabled(t == "1"))
    self.axis.setEnabled(False)
    self.vote = QComboBox()
    self.vote.addItems(list(VOTES))
    self.dtype = QComboBox()
    self.dtype.addItems(["auto", *DTYPES])  # auto: bf16 where the device has bf16 units
    self.dtype.setCurrentText("auto")
    self.memory = QDoubleSpinBox()
    self.memory.setRange(0.25, 4096.0)
    self.memory.setSingleStep(1.0)
    self.memory.setValue(float(DEFAULT_BUDGET_GB))
    self.memory.setSuffix(" GB")
    self.resample = QCheckBox("resample to the model's voxel size (as predict.py)")
    self.resample.setChecked(True)
    self.resample.setToolTip("When the bundle records the voxel size it was trained at and the "
                             "layer's differs: predict on the model's grid, vote on the layer's")
    self.probs = QCheckBox("probability layers")
    self.uncertainty = QCheckBox("uncertainty layer (entropy)")
    self.uncertainty.setEnabled(HAS_UNCERTAINTY)
    if not HAS_UNCERTAINTY:
      self.uncertainty.setToolTip("needs a bonejax with uncertainty maps (bonejax.evaluate.uncertainty)")
    self.output = qt.PathEdit("optional: save labels as .zarr, .ome.zarr or .tif", save=True,
                              filter="Labels (*.zarr *.tif *.tiff)")
    self.overwrite = QCheckBox("overwrite")
    self.run_button = QPushButton("Predict")
    self.run_button.clicked.connect(self.start)
    self.cancel_button = QPushButton("Cancel")
    self.cancel_button.setEnabled(False)
    self.cancel_button.clicked.connect(self.cancel)
    self.bar = QProgressBar()
    self.bar.setRange(0, 1000)
    self.bar.setValue(0)
    self.bar.setTextVisible(True)
    self.bar.setFormat("")
    self.status = qt.Status()

    form = QFormLayout()
    model_row = QHBoxLayout()
    model_row.addWidget(self.model)
    model_row.addWidget(self.model_file)
    form.addRow("model", model_row)
    form.addRow("image", self.image)
    form.addRow("planes", self.planes)
    form.addRow("axis (1 plane)", self.axis)
    form.addRow("vote", self.vote)
    form.addRow("compute dtype", self.dtype)
    form.addRow("memory budget", self.memory)
    form.addRow("", self.resample)
    form.addRow("", self.probs)
    form.addRow("", self.uncertainty)
    form.addRow("save labels", self.output)
    form.addRow("", self.overwrite)
    buttons = QHBoxLayout()
    buttons.addWidget(self.run_button)
    buttons.addWidget(self.cancel_button)
    box = QVBoxLayout(self)
    box.addLayout(form)
    box.addLayout(buttons)
    box.addWidget(self.bar)
    box.addWidget(self.status)
    box.addStretch(1)

    self._progress: jobs.JobProgress | None = None
    self._worker = None
    self._image = None
    self.result: dict[str, Any] | None = None
    self._timer = QTimer(self)
    self._timer.setInterval(200)
    self._timer.timeout.connect(self._tick)

  @property
  def busy(self) -> bool:
    return self._worker is not None

  def _browse_weights(self) -> None:
    from qtpy.QtWidgets import QFileDialog
    path, _ = QFileDialog.getOpenFileName(self, "PyTorch weights", self.model.text(),
                                          "Weights (*.pth *.pt *.safetensors)")
    if path:
      self.model.setText(path)

  def start(self) -> None:
    if self.busy:
      return
    try:
      model, meta = model_meta(self.model.text())
      layer = self.image.layer()
      if meta is not None:
        check_layer(layer, meta)
      elif layer is None:
        raise errors.UserError("choose an image layer")
      output = self.output.text()
      check_output(output, self.overwrite.isChecked())
      planes = int(self.planes.currentText())
      axis = self.axis.currentIndex() if planes == 1 else None
      info = layers.info(layer)
      volume = as_array(layers.data_of(layer))
    except Exception as e:  # pylint: disable=broad-except
      self.status.fail(qt.user_message(e))
      return
    self._image = layer
    self._progress = progress = jobs.JobProgress()
    attrs = {"source": info.get("source") or layer.name,
             "voxel_size_um": layers.voxel_size_of(layer)}
    job = dict(model=model, volume=volume, stats=info.get("intensity"), planes=planes, axis=axis,
               vote=self.vote.currentText(), dtype=self.dtype.currentText(),
               memory_budget_gb=float(self.memory.value()), probs=self.probs.isChecked(),
               uncertainty=self.uncertainty.isChecked(), output=output,
               overwrite=self.overwrite.isChecked(), attrs=attrs, progress=progress,
               resample=self.resample.isChecked())
    self.result = None
    self.run_button.setEnabled(False)
    self.cancel_button.setEnabled(True)
    self._tick()  # busy from the start: loading and compiling show as a moving bar
    self.status.say(f"predicting {layer.name!r} with {model.name}…")
    self._timer.start()
    self._worker = qt.start_worker(lambda: run_job(**job), self._done)

  def cancel(self) -> None:
    if self._progress is not None:
      self._progress.cancel()
      self.status.say("cancelling…")

  def _tick(self) -> None:
    p = self._progress
    if p is None:
      return
    if p.counting():
      if self.bar.maximum() == 0:
        self.bar.setRange(0, 1000)
      self.bar.setValue(int(1000 * p.fraction()))
    elif self.bar.maximum() != 0:
      self.bar.setRange(0, 0)  # Qt's busy bar: it moves while nothing can be counted yet
    self.bar.setFormat(p.text())

  def _idle_bar(self, value: int, text: str = "") -> None:
    self.bar.setRange(0, 1000)
    self.bar.setValue(value)
    self.bar.setFormat(text)

  def _done(self, result: dict[str, Any] | None, error: str | None) -> None:
    self._timer.stop()
    self._worker = None
    self.run_button.setEnabled(True)
    self.cancel_button.setEnabled(False)
    if error == "cancelled":
      self._idle_bar(0)
      self.status.say("cancelled: no layer added, nothing written")
      return
    if error is not None:
      self._idle_bar(0)
      self.status.fail(error)
      return
    self._idle_bar(1000, self._progress.text() if self._progress is not None else "")
    self.result = result
    self._add_layers(result)
    where = f"; saved {result['output']}" if result["output"] else ""
    grid = (f"; predicted at {' x '.join(f'{v:g}' for v in result['resampled_to_um'])} um"
            if result.get("resampled_to_um") else "")
    self.status.say(f"{result['seconds']:.1f} s, {result['voxels_per_second']:,.0f} voxels/s "
                    f"({result['total_seconds']:.1f} s with loading){grid}{where}")

  def _add_layers(self, result: dict[str, Any]) -> None:
    image = self._image
    v = layers.voxel_size_of(image)
    # Every added layer sits where the image is, in micrometres like every bonejax layer.
    units = getattr(image, "units", None)
    placed = {"scale": tuple(image.scale)[-3:], "translate": tuple(image.translate)[-3:],
              "units": (tuple(str(u) for u in units)[-3:] if units is not None
                        else layers.units_for(3))}
    data, kwargs, _ = layers.labels_layer(result["labels"], f"{image.name} prediction",
                                          result["classes"], voxel_size_um=v,
                                          source=result["output"])
    kwargs.update(placed)
    if result["probs"] is not None:
      k = len(result["classes"])
      self.viewer.add_image(result["probs"], channel_axis=3, contrast_limits=[(0.0, 1.0)] * k,
                            name=[f"{image.name} p({c})" for c in result["classes"]],
                            blending="additive", visible=False, **placed)
    if result["uncertainty"] is not None:
      self.viewer.add_image(result["uncertainty"], name=f"{image.name} uncertainty",
                            colormap="magma", contrast_limits=(0, 255), blending="additive",
                            visible=False, **placed)
    self.viewer.add_labels(data, **kwargs)
