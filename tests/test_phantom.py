"""The phantom generator: determinism, classes, CT look, dataset layout, atomicity, CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from bonejax import phantom
from bonejax.core import errors
from bonejax.data import store

REPO = Path(__file__).resolve().parents[1]
SHAPE = (32, 48, 48)


@pytest.fixture(scope="module")
def scans():
  return {kind: phantom.make_scan(kind, SHAPE, seed=0, index=0) for kind in phantom.KINDS}


def test_class_names():
  assert phantom.CLASSES["bone"] == ["background", "bone", "pore"]
  assert phantom.CLASSES["implant"] == ["background", "bone", "degradation layer",
                                        "residual material"]


@pytest.mark.parametrize("kind", phantom.KINDS)
def test_scan_types_and_every_class_present(scans, kind):
  image, labels, attrs = scans[kind]
  assert image.shape == labels.shape == SHAPE
  assert image.dtype == np.uint16 and labels.dtype == np.uint8
  n = len(phantom.CLASSES[kind])
  counts = np.bincount(labels.ravel(), minlength=n)
  assert len(counts) == n and (counts > 0).all(), counts
  assert image.std() > 0
  for key in ("voxel_size_um", "source", "kind", "seed", "index", "params"):
    assert key in attrs
  assert attrs["source"] == "phantom" and attrs["kind"] == kind
  json.dumps(attrs)  # attributes go into zarr.json


def test_deterministic_for_a_seed(scans):
  image, labels, _ = phantom.make_scan("bone", SHAPE, seed=0, index=0)
  np.testing.assert_array_equal(image, scans["bone"][0])
  np.testing.assert_array_equal(labels, scans["bone"][1])
  other_seed = phantom.make_scan("bone", SHAPE, seed=1, index=0)
  other_index = phantom.make_scan("bone", SHAPE, seed=0, index=1)
  for img, lab, _ in (other_seed, other_index):
    assert not np.array_equal(img, image) and not np.array_equal(lab, labels)


def test_pore_and_background_share_grey_values(scans):
  """Only context separates them: away from partial volume, same mean within the noise."""
  image, labels, _ = scans["bone"]
  far = ndimage.distance_transform_edt(labels != 1) > 3
  x = image.astype(np.float64)
  bg, pore, bone = x[(labels == 0) & far], x[(labels == 2) & far], x[labels == 1]
  assert pore.size > 200 and bg.size > 200
  assert abs(pore.mean() - bg.mean()) < 0.5 * bg.std()
  assert bone.mean() - bg.mean() > 4 * bg.std()


def test_make_dataset_layout(tmp_path):
  out = tmp_path / "data"
  ds = phantom.make_dataset(out, num_scans=2, shape=SHAPE, seed=5, kind="implant",
                            progress=False)
  meta = json.loads((out / "dataset.json").read_text())
  assert meta == {"classes": phantom.CLASSES["implant"], "scans": ["scan_000", "scan_001"]}
  assert ds.scans == meta["scans"] and ds.classes == meta["classes"]
  scan = ds.open_scan("scan_001")
  assert scan.shape == SHAPE and scan.dtype == np.uint16
  assert scan.attrs["source"] == "phantom" and "intensity" in scan.attrs
  assert scan.voxel_size_um > 0
  # Scan i does not depend on how many scans the dataset has.
  image, labels, _ = phantom.make_scan("implant", SHAPE, seed=5, index=1)
  np.testing.assert_array_equal(scan.read_image(), image)
  np.testing.assert_array_equal(scan.read_labels(), labels)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temporary leftovers
  with pytest.raises(errors.UserError, match="exists"):
    phantom.make_dataset(out, num_scans=1, shape=SHAPE, seed=5, progress=False)


def test_make_dataset_is_atomic(tmp_path, monkeypatch):
  real = store.write_scan
  calls = []

  def failing(path, *a, **kw):
    calls.append(path)
    if len(calls) == 2:
      raise RuntimeError("disk full")
    return real(path, *a, **kw)

  monkeypatch.setattr(store, "write_scan", failing)
  with pytest.raises(RuntimeError, match="disk full"):
    phantom.make_dataset(tmp_path / "data", num_scans=3, shape=SHAPE, seed=0, progress=False)
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind,shape,num_scans,match", [
    ("femur", SHAPE, 1, "unknown phantom kind"),
    ("bone", (32, 48), 1, "3 sides"),
    ("bone", (16, 48, 48), 1, ">= 32"),
    ("bone", SHAPE, 0, "num_scans"),
])
def test_bad_arguments(kind, shape, num_scans, match):
  with pytest.raises(errors.UserError, match=match):
    phantom.check_args(kind, shape, num_scans)


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, str(REPO / "launch" / "make_phantom.py"), *args],
                        capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


def test_cli(tmp_path):
  out = tmp_path / "ph"
  ok = _cli(f"--out={out}", "--num_scans=1", "--shape=32,32,32", "--seed=1", "--kind=bone")
  assert ok.returncode == 0, ok.stderr
  result = json.loads(ok.stdout.strip().splitlines()[-1])
  assert result["scans"] == ["scan_000"] and result["classes"] == phantom.CLASSES["bone"]
  assert Path(result["dataset"]) == out and result["shape"] == [32, 32, 32]
  assert "scans/s" in ok.stderr  # progress lines
  for args, match in [((f"--out={out}", "--num_scans=1"), "exists"),
                      ((f"--out={tmp_path / 'x'}", "--shape=8,32,32"), ">= 32")]:
    bad = _cli(*args)
    assert bad.returncode != 0
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], bad.stderr
  assert not (tmp_path / "x").exists()
