"""Qt glue the three widgets share: path fields, layer pickers, a status line, worker threads.

Errors reach the user as a napari notification plus a red status line in the widget, never as
a traceback dialog: work on a worker thread returns `(result, error line)` instead of raising
(an unexpected error also prints its traceback on stderr, for whoever runs napari from a shell).
"""

from __future__ import annotations

import traceback
from typing import Any, Callable

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (QComboBox, QFileDialog, QHBoxLayout, QLabel, QLineEdit, QPushButton,
                            QWidget)

from bonejax.core import errors
from bonejax.napari import jobs


class PathEdit(QWidget):
  """A path field with a Browse button (a directory, or a file matching `filter`)."""

  def __init__(self, placeholder: str = "", *, directory: bool = True, filter: str = "",
               save: bool = False, text: str = ""):
    super().__init__()
    self.directory, self.filter, self.save = directory, filter, save
    self.edit = QLineEdit(text)
    self.edit.setPlaceholderText(placeholder)
    browse = QPushButton("Browse…")
    browse.clicked.connect(self.browse)
    row = QHBoxLayout(self)
    row.setContentsMargins(0, 0, 0, 0)
    row.addWidget(self.edit)
    row.addWidget(browse)

  def text(self) -> str:
    return self.edit.text().strip()

  def setText(self, text: str) -> None:  # noqa: N802  (Qt's spelling)
    self.edit.setText(str(text))

  def browse(self) -> None:
    if self.save:
      path, _ = QFileDialog.getSaveFileName(self, "Save as", self.text(), self.filter)
    elif self.directory:
      path = QFileDialog.getExistingDirectory(self, "Choose a directory", self.text())
    else:
      path, _ = QFileDialog.getOpenFileName(self, "Choose a file", self.text(), self.filter)
    if path:
      self.setText(path)


class LayerCombo(QComboBox):
  """The viewer's layers of one kind ("image" or "labels"), kept up to date."""

  def __init__(self, viewer, kind: str):
    super().__init__()
    self.viewer, self.kind = viewer, kind
    for event in ("inserted", "removed", "moved", "reordered"):
      emitter = getattr(viewer.layers.events, event, None)
      if emitter is not None:
        emitter.connect(self.refresh)
    self.refresh()

  def layers(self) -> list:
    return [layer for layer in self.viewer.layers if type(layer).__name__.lower() == self.kind]

  def refresh(self, *_) -> None:
    current = self.currentText()
    self.blockSignals(True)
    self.clear()
    self.addItems([layer.name for layer in self.layers()])
    if current:
      i = self.findText(current)
      if i >= 0:
        self.setCurrentIndex(i)
    self.blockSignals(False)

  def showPopup(self) -> None:  # noqa: N802  (renamed layers show up too)
    self.refresh()
    super().showPopup()

  def layer(self):
    """The chosen layer, or None."""
    self.refresh()
    name = self.currentText()
    return next((layer for layer in self.layers() if layer.name == name), None)

  def select(self, name: str) -> None:
    self.refresh()
    self.setCurrentIndex(self.findText(name))


class Status(QLabel):
  """The widget's last word: progress in plain text, bad input in red (and notified)."""

  def __init__(self):
    super().__init__("")
    self.setWordWrap(True)
    self.setTextInteractionFlags(Qt.TextSelectableByMouse)
    self.error: str | None = None

  def say(self, text: str) -> None:
    self.error = None
    self.setStyleSheet("")
    self.setText(text)

  def fail(self, text: str) -> None:
    from napari.utils.notifications import show_error
    self.error = text
    self.setStyleSheet("color: #ff6060;")
    self.setText(text)
    show_error(f"bonejax: {text}")


def user_message(e: BaseException) -> str:
  if not isinstance(e, (errors.UserError, jobs.Cancelled)) and errors.io_error(e) is None:
    traceback.print_exc()
  return jobs.message(e)


def start_worker(fn: Callable[[], Any], on_done: Callable[[Any, str | None], None]):
  """Runs fn() on a worker thread; on_done(result, None) or on_done(None, error line) in the
  GUI thread. Returns the worker (keep a reference while it runs)."""
  from napari.qt.threading import create_worker

  def guarded():
    try:
      return fn(), None
    except Exception as e:  # pylint: disable=broad-except  (one line, no traceback dialog)
      return None, user_message(e)

  worker = create_worker(guarded, _start_thread=False)
  worker.returned.connect(lambda r: on_done(*r))
  worker.start()
  return worker
