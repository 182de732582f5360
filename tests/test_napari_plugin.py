"""The napari plugin's packaging: a valid npe2 manifest whose commands import, the entry point
napari discovers it by, and no napari or Qt import anywhere else in bonejax."""

import importlib
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "bonejax" / "napari" / "napari.yaml"


def test_importing_bonejax_never_imports_napari_or_qt():
  # A fresh interpreter: this one has napari loaded by its pytest plugin.
  code = """
import importlib, json, pkgutil, sys
import bonejax
from bonejax.cli import main as console
# The command modules define their absl flags at import: one per process (their imports are the
# library modules walked here).
commands = {"bonejax.cli." + module for module, _ in console.SUBCOMMANDS.values()}
names = [m.name for m in pkgutil.walk_packages(bonejax.__path__, "bonejax.")
         if not m.name.startswith("bonejax.napari.") and m.name not in commands]
for name in names:
  importlib.import_module(name)
importlib.import_module("bonejax.cli.predict")  # one command, its flags and imports
import bonejax.napari  # the package itself is cheap: napari and Qt load with its modules
gui = sorted(m for m in sys.modules if m.split(".")[0] in
             ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "vispy", "magicgui"))
print(json.dumps({"modules": len(names), "gui": gui}))
"""
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["modules"] > 20
  assert result["gui"] == []


def test_manifest_is_valid_and_its_commands_import():
  npe2 = pytest.importorskip("npe2")
  pytest.importorskip("qtpy")
  manifest = npe2.PluginManifest.from_file(MANIFEST)
  assert manifest.name == "bonejax"
  assert {w.display_name for w in manifest.contributions.widgets} == {"Predict", "Train",
                                                                      "Evaluate"}
  reader = manifest.contributions.readers[0]
  assert reader.accepts_directories
  for command in manifest.contributions.commands:
    module, _, attr = command.python_name.partition(":")
    assert callable(getattr(importlib.import_module(module), attr)), command.python_name


def _bonejax_entry_points():
  try:
    dist = importlib.metadata.distribution("bonejax")
  except importlib.metadata.PackageNotFoundError:
    return []
  return [ep for ep in dist.entry_points if ep.group == "napari.manifest"]


@pytest.mark.skipif(not _bonejax_entry_points(), reason="bonejax is installed without the "
                    "napari.manifest entry point (an install older than the plugin)")
def test_napari_discovers_the_plugin():
  npe2 = pytest.importorskip("npe2")
  (ep,) = _bonejax_entry_points()
  assert ep.value == "bonejax.napari:napari.yaml"
  pm = npe2.PluginManager()
  pm.discover(include_npe1=False)
  assert pm.get_manifest("bonejax").name == "bonejax"
  widgets = {w.display_name for w in pm.iter_widgets() if w.plugin_name == "bonejax"}
  assert widgets == {"Predict", "Train", "Evaluate"}
