"""Voxel sizes (Z, Y, X) through evaluation: an ImageJ hyperstack with Z spacing 8 um and XY
6.24 um imported with launch/import_volume.py reports the exact bone volume (count x 8 x 6.24 x
6.24 um^3), the report names where the size came from, and bad voxel sizes, classes and ROIs
are one `error:` line with nothing written. Also the evaluation's --morphometry plumbing."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from bonejax.core import errors
from bonejax.data import store
from bonejax.evaluate import measures, morph_report, provenance, report

REPO = Path(__file__).resolve().parents[1]
VOXEL = (8.0, 6.24, 6.24)
CLASSES = ["background", "bone", "pore"]


def _run(script, *args):
  return subprocess.run([sys.executable, str(REPO / "launch" / script), *args],
                        capture_output=True, text=True, cwd=REPO, timeout=300)


def _phantom(shape=(10, 16, 14), seed=0):
  rng = np.random.default_rng(seed)
  labels = np.zeros(shape, np.uint8)
  labels[1:-1, 2:-2, 2:-2] = 2
  labels[2:-2, 4:-4, 3:-3] = 1
  labels[(labels == 1) & (rng.random(shape) < 0.1)] = 2
  image = (500 + 1000 * (labels == 1) + rng.normal(0, 30, shape)).astype(np.uint16)
  return image, labels


def _imagej(path, data, voxel):
  # ImageJ hyperstack: XResolution / YResolution in pixels per unit, Z spacing in the
  # description (what Fiji writes for a calibrated stack).
  tifffile.imwrite(path, data, imagej=True, resolution=(1 / voxel[2], 1 / voxel[1]),
                   metadata={"spacing": voxel[0], "unit": "um", "axes": "ZYX"})


@pytest.fixture(scope="module")
def anisotropic(tmp_path_factory):
  root = tmp_path_factory.mktemp("aniso")
  image, truth = _phantom()
  pred = truth.copy()
  pred[:, :, 3:5][pred[:, :, 3:5] == 1] = 2  # some bone predicted as pore
  _imagej(root / "image.tif", image, VOXEL)
  _imagej(root / "truth.tif", truth, VOXEL)
  _imagej(root / "pred.tif", pred, VOXEL)
  proc = _run("import_volume.py", f"--image={root / 'image.tif'}",
              f"--labels={root / 'truth.tif'}", f"--out={root / 'data'}", "--scan=s0")
  assert proc.returncode == 0, proc.stderr[-2000:]
  return root, truth, pred


def test_anisotropic_import_then_evaluate_reports_the_exact_bone_volume(anisotropic):
  root, truth, pred = anisotropic
  proc = _run("evaluate.py", f"--pred={root / 'pred.tif'}", f"--truth={root / 'data' / 's0'}",
              f"--out={root / 'r.json'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  voxel_mm3 = 8e-3 * 6.24e-3 * 6.24e-3
  assert r["voxel_size_zyx_um"] == pytest.approx(list(VOXEL))
  assert r["voxel_size_source"] == "metadata"
  bv = r["measures"]["bone_volume_mm3"]
  assert bv["truth"] == pytest.approx(int((truth == 1).sum()) * voxel_mm3, rel=1e-12)
  assert bv["pred"] == pytest.approx(int((pred == 1).sum()) * voxel_mm3, rel=1e-12)
  tv = int((truth > 0).sum()) * voxel_mm3
  assert r["measures"]["total_volume_mm3"]["truth"] == pytest.approx(tv, rel=1e-12)
  md = (root / "r.md").read_text()
  assert "8 x 6.24 x 6.24 um (Z, Y, X)" in md
  # The same numbers with the size given on the command line as Z,Y,X, said to be given.
  proc = _run("evaluate.py", f"--pred={root / 'pred.tif'}", f"--truth={root / 'truth.tif'}",
              f"--out={root / 'g.json'}", "--voxel_size_um=8,6.24,6.24",
              "--classes=background,bone,pore")
  g = json.loads(proc.stdout.strip().splitlines()[-1])
  assert g["voxel_size_source"] == "given"
  assert g["measures"]["bone_volume_mm3"] == r["measures"]["bone_volume_mm3"]


def test_bad_voxel_size_is_one_error_line_and_nothing_written(anisotropic):
  root = anisotropic[0]
  out = root / "bad.json"
  proc = _run("evaluate.py", f"--pred={root / 'pred.tif'}", f"--truth={root / 'truth.tif'}",
              f"--out={out}", "--voxel_size_um=8,nan,6.24")
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --voxel_size_um='8,nan,6.24'")
  assert "Traceback" not in proc.stderr
  assert not out.exists() and not out.with_suffix(".md").exists()
  for value in ("0", "nan", "8,6.24", "8,0,6", "-1", "x", "inf"):
    with pytest.raises(errors.UserError, match="--voxel_size_um"):
      provenance.parse_voxel_size(value)
  assert provenance.parse_voxel_size("8, 6.24,6.24") == VOXEL
  assert provenance.parse_voxel_size("5") == (5.0, 5.0, 5.0)


def test_anisotropic_implant_surface_and_shell():
  names = ["background", "bone", "degradation layer", "residual material"]
  labels = np.ones((8, 9, 10), np.uint8)
  labels[2:6, 3:6, 3:7] = 2  # implant 4 x 3 x 4 voxels
  v = (2.0, 3.0, 5.0)
  out = measures.measure(labels, names, v, measures.Options(roi_distance_um=4.5))
  vz, vy, vx = (x * 1e-3 for x in v)
  faces = 2 * (3 * 4 * vy * vx + 4 * 4 * vz * vx + 4 * 3 * vz * vy)
  assert out["implant_surface_mm2"] == pytest.approx(faces, rel=1e-12)
  assert out["implant_volume_mm3"] == pytest.approx(48 * vz * vy * vx, rel=1e-12)
  # The shell: a numpy reference over every voxel with the physical distance to the implant.
  imp = np.argwhere(labels == 2) * np.array(v)
  pts = np.argwhere(labels != 2) * np.array(v)
  d = np.sqrt(((pts[:, None, :] - imp[None]) ** 2).sum(-1)).min(1)
  assert out["roi_volume_mm3"] == pytest.approx((d <= 4.5).sum() * vz * vy * vx, rel=1e-12)


def test_morphometry_in_the_report(tmp_path):
  shape = (12, 14, 16)
  truth = np.zeros(shape, np.uint8)
  truth[2:10, 2:12, 2:14] = 2
  truth[2:10, 4:7, 2:14] = 1       # a plate of bone 3 voxels thick (along Y)
  pred = truth.copy()
  pred[2:10, 7, 2:14] = 1          # predicted 4 thick
  np.save(tmp_path / "t.npy", truth)
  np.save(tmp_path / "p.npy", pred)
  ev = report.evaluate(tmp_path / "p.npy", tmp_path / "t.npy", classes=CLASSES,
                       voxel_size_um=(10.0, 5.0, 5.0), progress=False,
                       morphometry=morph_report.Request(roi="2,2,2,10,12,14"))
  m = ev.result["morphometry"]["bone"]
  assert m["roi"].startswith("box")
  bvtv = m["indices"]["BV/TV"]
  assert bvtv["truth"] == pytest.approx(3 / 10) and bvtv["pred"] == pytest.approx(4 / 10)
  assert bvtv["rel_diff"] == pytest.approx(1 / 3)
  bv = m["indices"]["BV"]
  assert bv["truth"] == pytest.approx(int((truth == 1).sum()) * 250.0)
  assert bv["unit"] == "um^3"
  md = report.markdown(dict(ev.result, pictures=[]))
  assert "## Bone morphometry" in md and "| Tb.Th (um) |" in md


def test_morphometry_bad_input(tmp_path):
  truth = np.zeros((6, 6, 6), np.uint8)
  truth[1:5, 1:5, 1:5] = 1
  np.save(tmp_path / "t.npy", truth)
  np.save(tmp_path / "p.npy", np.zeros_like(truth))
  kw = dict(classes=CLASSES, progress=False)
  with pytest.raises(errors.UserError, match="class index 7"):
    report.evaluate(tmp_path / "t.npy", tmp_path / "t.npy", **kw,
                    morphometry=morph_report.Request(classes=("7",)))
  with pytest.raises(errors.UserError, match="no class named 'marrow'"):
    report.evaluate(tmp_path / "t.npy", tmp_path / "t.npy", **kw,
                    morphometry=morph_report.Request(classes=("marrow",)))
  with pytest.raises(errors.UserError, match="prediction class 1 .bone.*no voxels"):
    report.evaluate(tmp_path / "p.npy", tmp_path / "t.npy", **kw, morphometry=True)
  np.save(tmp_path / "m.npy", np.ones((6, 6, 5), np.uint8))
  with pytest.raises(errors.UserError, match="shape"):
    report.evaluate(tmp_path / "t.npy", tmp_path / "t.npy", **kw,
                    morphometry=morph_report.Request(roi=str(tmp_path / "m.npy")))
  with pytest.raises(errors.UserError, match="outside"):
    report.evaluate(tmp_path / "t.npy", tmp_path / "t.npy", **kw,
                    morphometry=morph_report.Request(roi="0,0,0,7,6,6"))


def test_slab_array_reads_like_numpy(tmp_path):
  a = np.arange(5 * 6 * 7, dtype=np.uint16).reshape(5, 6, 7) % 3
  np.save(tmp_path / "a.npy", a)
  from bonejax.io import registry
  src = registry.open_volume(tmp_path / "a.npy", array="labels")
  arr = morph_report.SlabArray(src)
  assert arr.shape == a.shape
  np.testing.assert_array_equal(arr[1:4, 2:5, :], a[1:4, 2:5, :])
  np.testing.assert_array_equal(morph_report.SlabArray(src, nonzero=True)[2:3], a[2:3] != 0)


def test_training_scan_warning(tmp_path):
  data = tmp_path / "data"
  image, truth = _phantom((6, 8, 8))
  store.write_scan(data / "scan_000", image.astype(np.float32), truth)
  store.write_dataset_json(data, CLASSES, ["scan_000"])
  (tmp_path / "run" / "model").mkdir(parents=True)
  (tmp_path / "run" / "model" / "model.json").write_text(json.dumps(
      {"model": "unet", "classes": CLASSES, "train_scans": ["scan_000"]}))
  (tmp_path / "run" / "config.json").write_text(json.dumps({"dataset": str(data)}))
  arr = store.create_array(tmp_path / "pred.zarr", truth.shape, np.uint8)
  arr.write(truth).result()
  store.set_array_attrs(tmp_path / "pred.zarr", {"model": str(tmp_path / "run" / "model"),
                                                 "classes": CLASSES})
  proc = _run("evaluate.py", f"--pred={tmp_path / 'pred.zarr'}", f"--truth={data / 'scan_000'}",
              f"--out={tmp_path / 'r.json'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "warning: the truth scan 'scan_000' was one of the model's training scans" in proc.stderr
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert any("training scans" in w for w in r["warnings"])
  # Another dataset's scan of the same name is not a training scan.
  (tmp_path / "run" / "config.json").write_text(json.dumps({"dataset": str(tmp_path / "x")}))
  assert provenance.training_scan_warning(tmp_path / "pred.zarr", data / "scan_000") is None


def test_morphometry_bad_input_on_the_command_line(anisotropic):
  root = anisotropic[0]
  out = root / "m.json"
  base = [f"--pred={root / 'pred.tif'}", f"--truth={root / 'data' / 's0'}", f"--out={out}",
          f"--html={root / 'm.html'}"]
  for extra, message in ((["--morphometry", "--morphometry_classes=5"],
                          "error: --morphometry_classes: class index 5"),
                         (["--morphometry_roi=truth"], "error: --morphometry_classes, "
                          "--cortical_classes and --morphometry_roi go with --morphometry")):
    proc = _run("evaluate.py", *base, *extra)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-500:]
    assert not any(p.exists() for p in (out, out.with_suffix(".md"), root / "m.html"))


def test_slab_array_reads_zarr_blocks(tmp_path):
  a = (np.arange(6 * 7 * 8).reshape(6, 7, 8) % 4).astype(np.uint8)
  store.create_array(tmp_path / "a.zarr", a.shape, np.uint8).write(a).result()
  from bonejax.io import registry
  src = registry.open_volume(tmp_path / "a.zarr", array="labels")
  assert src.tensorstore is not None
  arr = morph_report.SlabArray(src)
  np.testing.assert_array_equal(arr[2:5, 1:6, 3:8], a[2:5, 1:6, 3:8])
  np.testing.assert_array_equal(morph_report.SlabArray(src, nonzero=True)[:, 2:4], a[:, 2:4] != 0)


def test_default_roi_is_the_truth_envelope_when_a_pore_class_is_left():
  assert morph_report.auto_roi(CLASSES, [1]) == "truth"
  assert morph_report.auto_roi(["background", "bone"], [1]) == "all"
  assert morph_report.auto_roi(CLASSES, [1, 2]) == "all"
