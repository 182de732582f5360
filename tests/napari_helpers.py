"""What every napari widget test module needs before it imports bonejax.napari: napari, pytest-qt
and an X display for napari's OpenGL canvas, or else a skip of the whole module.

In CI (`CI` set) nothing here skips: .ci/run installs the `napari` extra (through `dev`) and
Xvfb, so a napari or pytest-qt that fails to import, or no display, is a broken install and
raises with its own error (and tests/conftest.py fails any skip CI does not allow). Elsewhere a
missing napari / pytest-qt (the `napari` extra) or display skips the module, with the reason.
"""

import importlib
import os

import pytest

CLASSES = ["background", "bone", "pore"]


def require_napari() -> None:
  """Call at the top of a test module, before any napari or Qt import."""
  os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # headless; OpenGL from the X display
  ci = bool(os.environ.get("CI"))
  for name in ("napari", "pytestqt"):
    if ci:
      importlib.import_module(name)  # the import error itself, not a skip
    else:
      pytest.importorskip(name, reason=f"{name} is not installed: pip install -e '.[napari]'")
  if not os.environ.get("DISPLAY"):
    if ci:  # .ci/run installs Xvfb: no display there is a broken install
      raise RuntimeError("no X display for napari's OpenGL canvas: is Xvfb installed?")
    pytest.skip("napari's canvas needs an OpenGL display: install Xvfb (pytest-xvfb starts it)",
                allow_module_level=True)
