"""The Evaluate widget: two labels layers in, launch/evaluate.py's numbers out.

The layers are handed to the same `report.evaluate` the command runs (written to a temporary
.npy each, removed after), so the table (per-class IoU, Dice, precision, recall), the means and
the bone measures of prediction and truth are the command's, with the class names of the truth
layer (else the prediction's, else max label + 1) and its (Z, Y, X) voxel size. "bone
morphometry" adds the command's --morphometry: the ASBMR indices of the bone class (BV/TV,
BS/BV, Tb.Th, Tb.Sp, Tb.N, Conn.D, DA, SMI) of both layers side by side. "Write report" writes
REPORT.json and REPORT.md with `report.write`, and a self-contained HTML page beside them when
this bonejax has `html_report`.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import (QCheckBox, QFormLayout, QHBoxLayout, QPushButton, QTableWidget,
                            QTableWidgetItem, QVBoxLayout, QWidget)

from bonejax.core import errors, outputs
from bonejax.evaluate import provenance, report
from bonejax.napari import layers, qt

HAS_HTML = (importlib.util.find_spec("bonejax.evaluate.html_report") is not None and
            "middle_planes" in inspect.signature(report.evaluate).parameters)


def check_pair(pred, truth) -> None:
  if pred is None or truth is None:
    raise errors.UserError("choose a prediction and a truth labels layer")
  shapes = []
  for what, layer in (("prediction", pred), ("truth", truth)):
    shapes.append(tuple(layers.data_of(layer).shape))
    if len(shapes[-1]) != 3:
      raise errors.UserError(f"{what} layer {layer.name!r} has shape {shapes[-1]}; evaluation "
                          f"needs 3D (Z, Y, X) labels")
  if shapes[0] != shapes[1]:
    raise errors.UserError(f"prediction shape {shapes[0]} != truth shape {shapes[1]}")


def evaluate_layers(pred, truth, html: bool = False,
                    morphometry: bool = False) -> report.Evaluation:
  """`report.evaluate` on two labels layers (their data written to temporary .npy files)."""
  check_pair(pred, truth)
  classes = layers.classes_of(truth) or layers.classes_of(pred)
  voxel = layers.voxel_size_of(truth) or layers.voxel_size_of(pred)
  extra = {"middle_planes": True} if html and HAS_HTML else {}
  if morphometry:
    extra["morphometry"] = True
  with tempfile.TemporaryDirectory(prefix="bonejax-napari-") as tmp:
    paths = []
    for name, layer in (("pred", pred), ("truth", truth)):
      path = Path(tmp) / f"{name}.npy"
      np.save(path, np.asarray(layers.data_of(layer)))
      paths.append(path)
    ev = report.evaluate(*paths, classes=classes, voxel_size_um=voxel, progress=False, **extra)
  ev.result["pred"] = layers.source_of(pred) or pred.name
  ev.result["truth"] = layers.source_of(truth) or truth.name
  return ev


def write_report(ev: report.Evaluation, out: str, html: bool) -> dict[str, Any]:
  out_path = Path(out)
  if out_path.suffix.lower() != ".json":
    raise errors.UserError(f"report {out!r} must end in .json (REPORT.md is written beside it)")
  html_path = out_path.with_suffix(".html") if html and HAS_HTML else None
  with outputs.claim_output(out_path):
    for p in [out_path, out_path.with_suffix(".md")] + ([html_path] if html_path else []):
      outputs.check_output(p, overwrite=True)  # replaces only bonejax's own reports
    if html_path is not None:
      from bonejax.evaluate import html_report
      html_report.write(ev, html_path)
      ev.result["html"] = str(html_path)
    return report.write(ev, out_path)


def _fmt(v: Any, spec: str = ".4f") -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "n/a"
  return format(v, spec)


class EvaluateWidget(QWidget):

  def __init__(self, napari_viewer):
    super().__init__()
    self.viewer = napari_viewer
    self.pred = qt.LayerCombo(napari_viewer, "labels")
    self.truth = qt.LayerCombo(napari_viewer, "labels")
    if len(self.truth.layers()) > 1:
      self.truth.setCurrentIndex(1)
    self.run_button = QPushButton("Evaluate")
    self.run_button.clicked.connect(self.start)
    self.table = QTableWidget(0, 5)
    self.table.setHorizontalHeaderLabels(["class", "IoU", "Dice", "precision", "recall"])
    self.summary = qt.Status()
    self.measures = QTableWidget(0, 4)
    self.measures.setHorizontalHeaderLabels(["measure", "prediction", "truth", "rel. diff"])
    self.morphometry = QCheckBox("bone morphometry (Tb.Th, Tb.Sp, Conn.D, ...)")
    self.morphometry.setToolTip("ASBMR indices of the bone class of both layers, in "
                                "micrometres (evaluate.py --morphometry); takes longer")
    self.out = qt.PathEdit("REPORT.json", save=True, filter="JSON (*.json)")
    self.html = QCheckBox("HTML page too")
    self.html.setEnabled(HAS_HTML)
    self.html.setChecked(HAS_HTML)
    if not HAS_HTML:
      self.html.setToolTip("needs a bonejax with HTML reports (bonejax.evaluate.html_report)")
    self.write_button = QPushButton("Write report")
    self.write_button.setEnabled(False)
    self.write_button.clicked.connect(self.write)
    self.status = qt.Status()

    form = QFormLayout()
    form.addRow("prediction", self.pred)
    form.addRow("truth", self.truth)
    out_row = QHBoxLayout()
    out_row.addWidget(self.out)
    out_row.addWidget(self.html)
    box = QVBoxLayout(self)
    box.addLayout(form)
    box.addWidget(self.morphometry)
    box.addWidget(self.run_button)
    box.addWidget(self.table)
    box.addWidget(self.summary)
    box.addWidget(self.measures)
    box.addLayout(out_row)
    box.addWidget(self.write_button)
    box.addWidget(self.status)

    self.evaluation: report.Evaluation | None = None
    self._worker = None

  @property
  def busy(self) -> bool:
    return self._worker is not None

  @property
  def result(self) -> dict[str, Any] | None:
    return self.evaluation.result if self.evaluation is not None else None

  def start(self) -> None:
    if self.busy:
      return
    pred, truth = self.pred.layer(), self.truth.layer()
    try:
      check_pair(pred, truth)
    except errors.UserError as e:
      self.status.fail(qt.user_message(e))
      return
    html = self.html.isChecked()
    morph = self.morphometry.isChecked()
    self.evaluation = None
    self.write_button.setEnabled(False)
    self.run_button.setEnabled(False)
    self.status.say(f"evaluating {pred.name!r} against {truth.name!r}…")
    self._worker = qt.start_worker(lambda: evaluate_layers(pred, truth, html, morph),
                                   self._done)

  def _done(self, ev: report.Evaluation | None, error: str | None) -> None:
    self._worker = None
    self.run_button.setEnabled(True)
    if error is not None:
      self.status.fail(error)
      return
    self.evaluation = ev
    self.show_result(ev.result)
    self.write_button.setEnabled(True)
    self.status.say(f"{ev.result['voxels']:,} voxels in {ev.result['seconds']:.1f} s")

  def show_result(self, r: dict[str, Any]) -> None:
    names = r["classes"]
    self.table.setRowCount(len(names))
    for i, n in enumerate(names):
      cells = [f"{i} {n}"] + [_fmt(r[k][n]) for k in ("iou", "dice", "precision", "recall")]
      for j, text in enumerate(cells):
        self.table.setItem(i, j, QTableWidgetItem(text))
    self.summary.say(f"miou_fg {_fmt(r['miou_fg'])}   miou_all {_fmt(r['miou_all'])}   "
                     f"mdice_fg {_fmt(r['mdice_fg'])}   accuracy {_fmt(r['accuracy'])}\n"
                     f"voxel size {provenance.voxel_text(r)}"
                     + "".join(f"\n{w}" for w in r.get("warnings") or []))
    rows = list((r.get("measures") or {}).items())
    # Morphometry rows under the measures, named "bone: Tb.Th (um)".
    from bonejax.evaluate import morph_report
    for key, m in (r.get("morphometry") or {}).items():
      rows += [(f"{key}: {morph_report.label(name, v['unit'])}", v)
               for name, v in m["indices"].items()]
    self.measures.setRowCount(len(rows))
    for i, (k, v) in enumerate(rows):
      rel = v.get("rel_diff")
      cells = [k, _fmt(v.get("pred"), ".4g"), _fmt(v.get("truth"), ".4g"),
               "n/a" if rel is None else f"{rel * 100:+.1f} %"]
      for j, text in enumerate(cells):
        self.measures.setItem(i, j, QTableWidgetItem(text))

  def write(self) -> None:
    if self.evaluation is None:
      self.status.fail("evaluate first")
      return
    try:
      out = self.out.text()
      if not out:
        raise errors.UserError("choose where to write the report (REPORT.json)")
      result = write_report(self.evaluation, out, self.html.isChecked())
    except Exception as e:  # pylint: disable=broad-except
      self.status.fail(qt.user_message(e))
      return
    extra = f" and {result['html']}" if result.get("html") else ""
    self.status.say(f"wrote {result['out']}, {result['report_md']}{extra}")
