"""What every napari widget test module needs before it imports bonejax.napari: napari, pytest-qt
and an X display for napari's OpenGL canvas, or else a skip of the whole module.

Where napari or pytest-qt is missing the module skips (they come with the `napari` extra). A
missing display skips too, except in CI (`CI` set): .ci/run installs Xvfb, so no display there
is a broken install and must fail loudly rather than skip every widget test.
"""

import os

import pytest

CLASSES = ["background", "bone", "pore"]


def require_napari() -> None:
  """Call at the top of a test module, before any napari or Qt import."""
  os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # headless; OpenGL from the X display
  pytest.importorskip("napari")
  pytest.importorskip("pytestqt")
  if not os.environ.get("DISPLAY"):
    if os.environ.get("CI"):  # .ci/run installs Xvfb: no display there is a broken install
      raise RuntimeError("no X display for napari's OpenGL canvas: is Xvfb installed?")
    pytest.skip("napari's canvas needs an OpenGL display: install Xvfb (pytest-xvfb starts it)",
                allow_module_level=True)
