"""The Train widget: BONe's DLFit panel in napari (data, config, settings, Start / Stop, curves).

Pick a config (the demo by default), a run directory and the data: the config's own (the demo
makes its phantom), a dataset directory, or an image and a labels layer from the viewer
(imported into WORKDIR/layers-data, see train_process.import_layers; with an "unlabelled value",
a labels layer painted on a few slices trains as sparse labels). Steps, batch size and
patch size override the config (0 keeps the config's value); Save / Load keep these settings in
a JSON file. Start runs launch/train.py in a child process (train_process), so the viewer stays
responsive; Stop is Ctrl-C, and Start again resumes from the newest checkpoint. The plot
follows WORKDIR/metrics.csv: training loss, validation miou_fg and per-class IoU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (QComboBox, QFileDialog, QFormLayout, QFrame, QHBoxLayout,
                            QPushButton, QScrollArea, QSpinBox, QVBoxLayout, QWidget)

from bonejax.core import errors
from bonejax.napari import layers, qt
from bonejax.napari import train_process as tp

SOURCES = ("the config's", "a dataset directory", "image + labels layers")
POLL_MS = 1000
PLOT_MIN_HEIGHT = 240  # pixels: two axes with readable ticks
NO_UNLABELLED = -1     # the unlabelled-value box's "none": every voxel of the layer is a class
UNLABELLED_HELP = (
    "Sparse labels: paint a few slices of the labels layer and leave the rest.\n"
    "none: every voxel is labelled; a layer value is a class id (0 background).\n"
    "0: napari's unpainted voxels (value 0) are unlabelled and training ignores them; paint "
    "background as 1, class k as k + 1 (values above 0 shift down by one).\n"
    "Another value v: voxels of value v are unlabelled; values above v shift down by one.\n"
    "Unlabelled voxels are stored as 255 in WORKDIR/layers-data (dataset.json \"unlabelled\": "
    "255); the last labelled slices (about 20 % of the labelled voxels) validate.")


def _spin(maximum: int, step: int = 1) -> QSpinBox:
  box = QSpinBox()
  box.setRange(0, maximum)
  box.setSingleStep(step)
  box.setSpecialValueText("config")  # 0: the config's own value
  return box


class TrainWidget(QWidget):

  def __init__(self, napari_viewer):
    super().__init__()
    self.viewer = napari_viewer
    self.config = qt.PathEdit("configs/NAME.py[:arg]", directory=False,
                              filter="Configs (*.py)", text=str(tp.DEMO_CONFIG))
    self.workdir = qt.PathEdit("run directory (checkpoints, metrics, model)")
    self.source = QComboBox()
    self.source.addItems(list(SOURCES))
    self.dataset = qt.PathEdit("dataset directory (with dataset.json)")
    self.image = qt.LayerCombo(napari_viewer, "image")
    self.labels = qt.LayerCombo(napari_viewer, "labels")
    self.unlabelled = QSpinBox()
    self.unlabelled.setRange(NO_UNLABELLED, 255)
    self.unlabelled.setSpecialValueText("none (dense labels)")
    self.unlabelled.setValue(NO_UNLABELLED)
    self.unlabelled.setToolTip(UNLABELLED_HELP)
    self.source.currentIndexChanged.connect(self._source_changed)
    self.steps = _spin(10_000_000, 100)
    self.batch = _spin(4096)
    self.patch = _spin(4096, 32)
    load = QPushButton("Load settings…")
    load.clicked.connect(self._load_dialog)
    save = QPushButton("Save settings…")
    save.clicked.connect(self._save_dialog)
    self.start_button = QPushButton("Start")
    self.start_button.clicked.connect(self.start)
    self.stop_button = QPushButton("Stop")
    self.stop_button.setEnabled(False)
    self.stop_button.clicked.connect(self.stop)
    self.status = qt.Status()
    self.plot = CurvesPlot()

    form = QFormLayout()
    form.addRow("config", self.config)
    form.addRow("workdir", self.workdir)
    form.addRow("data", self.source)
    form.addRow("dataset", self.dataset)
    form.addRow("image layer", self.image)
    form.addRow("labels layer", self.labels)
    form.addRow("unlabelled value", self.unlabelled)
    form.labelForField(self.unlabelled).setToolTip(UNLABELLED_HELP)
    form.addRow("steps", self.steps)
    form.addRow("batch size", self.batch)
    form.addRow("patch size", self.patch)
    settings = QHBoxLayout()
    settings.addWidget(load)
    settings.addWidget(save)
    buttons = QHBoxLayout()
    buttons.addWidget(self.start_button)
    buttons.addWidget(self.stop_button)
    # The form scrolls when the dock is short (three docks stacked share one column), so the
    # plot keeps a readable height instead of being squeezed to a few pixels.
    controls = QWidget()
    top = QVBoxLayout(controls)
    top.setContentsMargins(0, 0, 0, 0)
    top.addLayout(form)
    top.addLayout(settings)
    top.addLayout(buttons)
    top.addWidget(self.status)
    scroll = QScrollArea()
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.NoFrame)
    scroll.setWidget(controls)
    scroll.setMinimumHeight(120)
    self.plot.setMinimumHeight(PLOT_MIN_HEIGHT)
    box = QVBoxLayout(self)
    box.addWidget(scroll, 1)
    box.addWidget(self.plot, 1)
    self._source_changed(0)

    self.extra: dict[str, Any] = {}  # loaded --config.KEY overrides the form has no field for
    self.proc = None
    self._worker = None
    self._stopping = False
    self._rows = 0
    self.result: dict[str, Any] | None = None
    self._timer = QTimer(self)
    self._timer.setInterval(POLL_MS)
    self._timer.timeout.connect(self.poll)

  @property
  def running(self) -> bool:
    return self.proc is not None or self._worker is not None

  def _source_changed(self, index: int) -> None:
    self.dataset.setEnabled(index == 1)
    self.image.setEnabled(index == 2)
    self.labels.setEnabled(index == 2)
    self.unlabelled.setEnabled(index == 2)

  # -- settings --------------------------------------------------------------------------------

  def overrides(self) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, box in (("num_steps", self.steps), ("batch_size", self.batch),
                     ("patch_size", self.patch)):
      if box.value() > 0:
        out[key] = int(box.value())
    if self.source.currentIndex() == 1:
      out["dataset"] = self.dataset.text()
    return out

  def save_settings(self, path: str) -> None:
    tp.save_settings(path, self.config.text(), self.workdir.text(), self.overrides())

  def load_settings(self, path: str) -> None:
    s = tp.load_settings(path)
    if s["config"]:
      self.config.setText(s["config"])
    if s["workdir"]:
      self.workdir.setText(s["workdir"])
    o = dict(s["overrides"])
    for key, box in (("num_steps", self.steps), ("batch_size", self.batch),
                     ("patch_size", self.patch)):
      box.setValue(int(o.pop(key, 0) or 0))
    if o.get("dataset"):
      self.dataset.setText(str(o.pop("dataset")))
      self.source.setCurrentIndex(1)
    self.extra = o

  def _save_dialog(self) -> None:
    path, _ = QFileDialog.getSaveFileName(self, "Save settings", "", "JSON (*.json)")
    if path:
      try:
        self.save_settings(path)
        self.status.say(f"settings saved to {path}")
      except Exception as e:  # pylint: disable=broad-except
        self.status.fail(qt.user_message(e))

  def _load_dialog(self) -> None:
    path, _ = QFileDialog.getOpenFileName(self, "Load settings", "", "JSON (*.json)")
    if path:
      try:
        self.load_settings(path)
        self.status.say(f"settings loaded from {path}")
      except Exception as e:  # pylint: disable=broad-except
        self.status.fail(qt.user_message(e))

  # -- run -------------------------------------------------------------------------------------

  def start(self) -> None:
    if self.running:
      return
    try:
      config, workdir = self.config.text(), self.workdir.text()
      overrides = dict(self.extra, **self.overrides())
      if self.source.currentIndex() == 1 and not overrides.get("dataset"):
        raise errors.UserError("choose a dataset directory")
      tp.check_settings(config, workdir, overrides)
      pair = self._layer_pair() if self.source.currentIndex() == 2 else None
    except Exception as e:  # pylint: disable=broad-except
      self.status.fail(qt.user_message(e))
      return
    self.result, self._stopping, self._rows = None, False, 0
    self.start_button.setEnabled(False)
    self.stop_button.setEnabled(True)
    self.plot.clear()
    if pair is None:
      self._launch(config, workdir, overrides)
      return
    target = Path(workdir) / tp.LAYERS_DATASET
    self.status.say(f"importing the layers into {target}…")

    def do_import():
      if (target / "dataset.json").exists():  # an earlier Start's: resumes on the same data
        tp.check_imported(target, pair[-1])
      else:
        tp.import_layers(target, *pair)
      return str(target)

    def imported(dataset, error):
      self._worker = None
      if error is not None:
        self._finish()
        self.status.fail(error)
        return
      if self._stopping:
        self._finish()
        self.status.say("stopped before training began")
        return
      self._launch(config, workdir, dict(overrides, dataset=dataset))

    self._worker = qt.start_worker(do_import, imported)

  def _layer_pair(self) -> tuple:
    image, labels = self.image.layer(), self.labels.layer()
    if image is None or labels is None:
      raise errors.UserError("choose an image layer and a labels layer")
    img, lab = np.asarray(layers.data_of(image)), np.asarray(layers.data_of(labels))
    value = self.unlabelled.value()
    sparse = value != NO_UNLABELLED
    # Class names by layer value: the labels layer's (sparse: only those), else the image's.
    names = layers.classes_of(labels) or (None if sparse else layers.classes_of(image))
    lab, classes, unlabelled = tp.layer_labels(img, lab, names, value if sparse else None)
    return (image.name, img, lab, classes,
            layers.voxel_size_of(image) or layers.voxel_size_of(labels), unlabelled)

  def _launch(self, config: str, workdir: str, overrides: dict[str, Any]) -> None:
    try:
      self.proc = tp.start(tp.command(config, workdir, overrides), workdir)
    except Exception as e:  # pylint: disable=broad-except
      self._finish()
      self.status.fail(qt.user_message(e))
      return
    self._workdir = workdir
    self.status.say(f"training in {workdir} (process {self.proc.pid})…")
    self._timer.start()

  def stop(self) -> None:
    if self.proc is None:
      self._stopping = True  # an import still running: stop before launching
      return
    if self._stopping:
      self.proc.terminate()  # a second Stop: do not wait for the loop
      return
    self._stopping = True
    tp.interrupt(self.proc)
    self.status.say("stopping: waiting for the trainer to finish its checkpoint writes…")

  def poll(self) -> None:
    if self.proc is None:
      return
    rows = tp.metrics_rows(self._workdir)
    if len(rows) != self._rows:
      self._rows = len(rows)
      self.plot.draw_rows(rows)
    code = self.proc.poll()
    if code is None:
      if rows and not self._stopping:
        last = rows[-1]
        self.status.say(f"step {last.get('step')}" + (f", loss {float(last['loss']):.4f}"
                                                      if last.get("loss") else ""))
      return
    self._timer.stop()
    self.proc = None
    self.plot.draw_rows(tp.metrics_rows(self._workdir))
    result, line = tp.outcome(self._workdir, code)
    self.result = result
    stopped = self._stopping
    self._finish()
    if result is not None and stopped and result.get("stopped") != "num_steps":
      # A trainer that answers Ctrl-C with a checkpoint at the step it stopped and its result.
      self.status.say(f"stopped at step {result.get('steps')} ({result.get('stopped')}); newest "
                      f"checkpoint: step {tp.latest_checkpoint(self._workdir)}: Start resumes "
                      f"from it")
    elif result is not None:
      self.status.say(line)
    elif stopped:
      ckpt = tp.latest_checkpoint(self._workdir)
      last = rows[-1].get("step") if rows else None
      self.status.say(f"stopped (last logged step {last}); newest checkpoint: step {ckpt}: "
                      "Start resumes from it" if ckpt is not None else
                      "stopped before the first checkpoint: Start begins again")
    else:
      self.status.fail(line)

  def _finish(self) -> None:
    self.start_button.setEnabled(True)
    self.stop_button.setEnabled(False)
    self._stopping = False


class CurvesPlot(QWidget):
  """Training loss and validation IoU against step, redrawn from metrics.csv rows."""

  def __init__(self):
    super().__init__()
    from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
    from matplotlib.figure import Figure
    self.figure = Figure(figsize=(4, 3.2), tight_layout=True)
    self.canvas = FigureCanvasQTAgg(self.figure)
    self.loss_ax, self.iou_ax = self.figure.subplots(2, 1, sharex=True)
    box = QVBoxLayout(self)
    box.setContentsMargins(0, 0, 0, 0)
    box.addWidget(self.canvas)
    self.steps: list[int] = []
    self.clear()

  def clear(self) -> None:
    self.steps = []
    for ax, label in ((self.loss_ax, "train loss"), (self.iou_ax, "validation IoU")):
      ax.clear()
      ax.set_ylabel(label, fontsize=8)
      ax.tick_params(labelsize=7)
    self.iou_ax.set_xlabel("step", fontsize=8)
    self.canvas.draw_idle()

  def draw_rows(self, rows: list[dict[str, str]]) -> None:
    self.clear()
    xs, ys = tp.series(rows, "loss")
    self.steps = xs
    if xs:
      self.loss_ax.plot(xs, ys, lw=1)
      if min(ys) > 0:
        self.loss_ax.set_yscale("log")
    keys = [k for k in (rows[0].keys() if rows else []) if k.startswith("val_iou_")]
    for key in keys + ["val_miou_fg"]:
      vx, vy = tp.series(rows, key)
      if vx:
        bold = key == "val_miou_fg"
        self.iou_ax.plot(vx, vy, "o-" if bold else ".-", lw=2 if bold else 0.8, ms=3,
                         label=key[4:])
    if self.iou_ax.lines:
      self.iou_ax.set_ylim(0, 1)
      self.iou_ax.legend(fontsize=6, loc="lower right")
    self.canvas.draw_idle()
