"""evaluate.py on a sparse truth (issue 28): voxels of the unlabelled value (dataset.json's
"unlabelled", or --unlabelled for a bare truth file) are not scored. Scores, the border band,
the per-slice profile and the count measures are checked against a float64 numpy reference
over the labelled voxels; --morphometry is refused; the report counts the unlabelled voxels."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bonejax.core import errors
from bonejax.data import store
from bonejax.evaluate import border, html_report, report

REPO = Path(__file__).resolve().parents[1]
U = store.UNLABELLED
CLASSES = ["background", "bone", "pore"]
SHAPE = (10, 16, 14)
VOXEL = (8.0, 6.0, 5.0)


@pytest.fixture(scope="module")
def sparse(tmp_path_factory):
  """A scan whose truth is painted on every 3rd Z slice and one Y row band, in a dataset with
  "unlabelled": 255; a prediction that is right on 80 % of the voxels."""
  root = tmp_path_factory.mktemp("sparse")
  rng = np.random.default_rng(3)
  dense = rng.choice(3, SHAPE, p=(0.3, 0.5, 0.2)).astype(np.uint8)
  painted = np.zeros(SHAPE, bool)
  painted[::3] = True
  painted[:, 5:7] = True
  truth = np.where(painted, dense, U).astype(np.uint8)
  pred = np.where(rng.random(SHAPE) < 0.8, dense, rng.integers(0, 3, SHAPE)).astype(np.uint8)
  image = (dense * 100 + 50).astype(np.uint8)
  store.write_scan(root / "data" / "scan_000", image, truth, {"voxel_size_um": 5.0},
                   chunks=(4, 16, 14))
  store.write_dataset_json(root / "data", CLASSES, ["scan_000"], unlabelled=U)
  np.save(root / "pred.npy", pred)
  np.save(root / "truth.npy", truth)
  return root, truth, pred, painted


def _iou(pred, truth, where):
  out = []
  for c in range(3):
    inter = np.sum((pred == c) & (truth == c) & where, dtype=np.float64)
    union = np.sum(((pred == c) | (truth == c)) & where, dtype=np.float64)
    out.append(inter / union if union else float("nan"))
  return out


def test_scores_and_measures_count_the_labelled_voxels_only(sparse, tmp_path):
  root, truth, pred, lab = sparse
  ev = report.evaluate(root / "pred.npy", root / "data" / "scan_000", voxel_size_um=VOXEL,
                       slab=4, progress=False, middle_planes=True)
  r = ev.result
  assert r["unlabelled_value"] == U and r["unlabelled_voxels"] == int((~lab).sum()) > 0
  assert r["voxels"] == int(lab.sum())
  want = _iou(pred, truth, lab)
  assert [r["iou"][n] for n in CLASSES] == pytest.approx(want, abs=1e-12)
  assert r["miou_fg"] == pytest.approx(np.mean(want[1:]), abs=1e-12)
  assert sum(r["truth_voxels"].values()) == int(lab.sum())
  # The border band, over labelled voxels too.
  m = border.band_mask(SHAPE, 2)
  sec = r["border_band"]
  assert sec["voxels"]["border"] == int((m & lab).sum())
  assert [sec["iou"][n]["border"] for n in CLASSES] == pytest.approx(_iou(pred, truth, m & lab))
  assert [sec["iou"][n]["interior"] for n in CLASSES] == pytest.approx(
      _iou(pred, truth, ~m & lab))
  # Per-slice profile: an unlabelled slice (z = 1 has only the Y band) counts that band only.
  z = 1
  w = _iou(pred[z], truth[z], lab[z])
  assert ev.profiles[0][z] == pytest.approx(np.nanmean(w[1:]), abs=1e-12)
  # Measures: both sides on the truth's labelled voxels.
  vmm3 = np.prod(VOXEL) * 1e-9
  ms = r["measures"]
  for side, a in (("truth", truth), ("pred", pred)):
    bone, pore = np.sum((a == 1) & lab), np.sum((a == 2) & lab)
    assert ms["bv_tv"][side] == pytest.approx(bone / (bone + pore), abs=1e-12)
    assert ms["porosity"][side] == pytest.approx(pore / (bone + pore), abs=1e-12)
    assert ms["bone_volume_mm3"][side] == pytest.approx(bone * vmm3, rel=1e-12)
  assert any("unlabelled voxels" in w for w in r["warnings"])
  # The written report and the page say so; unlabelled voxels are not drawn as errors.
  out = report.write(ev, tmp_path / "r.json")
  assert json.loads(Path(out["out"]).read_text())["unlabelled_voxels"] == r["unlabelled_voxels"]
  md = (tmp_path / "r.md").read_text()
  assert f"{r['unlabelled_voxels']:,} unlabelled (value 255, not scored)" in md
  page = html_report.render(ev)
  assert f"{r['unlabelled_voxels']:,} unlabelled" in page and 'id="border"' in page
  mid = ev.middles[0]
  shown = html_report.errors_mask(mid["pred"], mid["truth"], 3)
  z = ev.middles[0]["index"]
  np.testing.assert_array_equal(shown, (pred[z] != truth[z]) & lab[z])


def test_a_bare_truth_file_needs_the_flag(sparse):
  root, truth, pred, lab = sparse
  with pytest.raises(errors.UserError, match="label value 255 >= number of classes 3"):
    report.evaluate(root / "pred.npy", root / "truth.npy", classes=CLASSES, progress=False)
  a = report.evaluate(root / "pred.npy", root / "truth.npy", classes=CLASSES, unlabelled=U,
                      voxel_size_um=VOXEL, progress=False).result
  b = report.evaluate(root / "pred.npy", root / "data" / "scan_000", voxel_size_um=VOXEL,
                      progress=False).result
  for key in ("iou", "miou_fg", "measures", "unlabelled_voxels", "border_band"):
    assert a[key] == b[key]
  # Without class names: max label + 1 of the labelled voxels and the prediction.
  c = report.evaluate(root / "pred.npy", root / "truth.npy", unlabelled=U, progress=False).result
  assert c["classes"] == ["class_0", "class_1", "class_2"] and c["miou_fg"] == b["miou_fg"]


def test_bad_unlabelled_values_and_morphometry_are_one_line(sparse):
  root, *_ = sparse
  scan = root / "data" / "scan_000"
  with pytest.raises(errors.UserError, match="disagrees with the truth's dataset"):
    report.evaluate(root / "pred.npy", scan, unlabelled=254, progress=False)
  with pytest.raises(errors.UserError, match="collides with class 1"):
    report.evaluate(root / "pred.npy", root / "truth.npy", classes=CLASSES, unlabelled=1,
                    progress=False)
  with pytest.raises(errors.UserError, match="fully labelled truth.*unlabelled voxels"):
    report.evaluate(root / "pred.npy", scan, progress=False, morphometry=True)


def test_a_dense_truth_in_a_sparse_dataset_is_measured_as_before(sparse, tmp_path):
  root, truth, pred, lab = sparse
  dense = np.where(lab, truth, pred).astype(np.uint8)
  np.save(tmp_path / "dense.npy", dense)
  a = report.evaluate(root / "pred.npy", tmp_path / "dense.npy", classes=CLASSES, unlabelled=U,
                      voxel_size_um=VOXEL, progress=False).result
  b = report.evaluate(root / "pred.npy", tmp_path / "dense.npy", classes=CLASSES,
                      voxel_size_um=VOXEL, progress=False).result
  assert a["unlabelled_voxels"] == 0 and a["measures"] == b["measures"]
  assert "warnings" not in a or not any("unlabelled" in w for w in a["warnings"])


def test_cli_flags(sparse, tmp_path):
  root, truth, pred, lab = sparse
  out = tmp_path / "rep.json"
  p = subprocess.run([sys.executable, str(REPO / "launch" / "evaluate.py"),
                      f"--pred={root / 'pred.npy'}", f"--truth={root / 'truth.npy'}",
                      f"--out={out}", "--classes=background,bone,pore", "--unlabelled=255",
                      "--border_band=3"], capture_output=True, text=True, timeout=120, cwd=REPO)
  assert p.returncode == 0, p.stderr[-2000:]
  r = json.loads(p.stdout.strip().splitlines()[-1])
  assert r["unlabelled_voxels"] == int((~lab).sum()) and r["border_band"]["band_voxels"] == 3
  m = border.band_mask(SHAPE, 3)
  assert r["border_band"]["voxels"]["border"] == int((m & lab).sum())
