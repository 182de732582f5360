"""Confusion matrix and scores against hand-worked cases and a plain loop in float64; the
evaluation report (bonejax/report.py) and launch/evaluate.py."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bonejax.core import errors, jsonable
from bonejax.data import store
from bonejax.evaluate import metrics, report

# (truth, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,2) (2,0)
TRUTH = np.array([0, 0, 1, 1, 2, 2], np.uint8)
PRED = np.array([0, 1, 1, 1, 2, 0], np.uint8)


def test_hand_worked_confusion_and_scores():
  cm = metrics.confusion_matrix(PRED, TRUTH, 3)
  np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
  assert cm.dtype == np.int64
  s = metrics.scores(cm, ["background", "bone", "pore"])
  # class 0: tp 1, |T| 2, |P| 2 -> IoU 1/3, Dice 2/4; class 1: tp 2, |T| 2, |P| 3 -> 2/3, 4/5;
  # class 2: tp 1, |T| 2, |P| 1 -> 1/2, 2/3.
  np.testing.assert_allclose(s["iou"], [1 / 3, 2 / 3, 1 / 2])
  np.testing.assert_allclose(s["dice"], [1 / 2, 4 / 5, 2 / 3])
  np.testing.assert_allclose(s["precision"], [1 / 2, 2 / 3, 1])
  np.testing.assert_allclose(s["recall"], [1 / 2, 1, 1 / 2])
  assert s["miou_all"] == pytest.approx(1 / 2)
  assert s["miou_fg"] == pytest.approx(7 / 12)
  assert s["accuracy"] == pytest.approx(4 / 6)
  assert s["voxels"] == 6


def test_absent_class_is_null_and_excluded_from_means():
  s = metrics.scores(metrics.confusion_matrix(PRED, TRUTH, 4))
  assert np.isnan(s["iou"][3]) and np.isnan(s["dice"][3])
  assert s["miou_all"] == pytest.approx(1 / 2)
  assert s["miou_fg"] == pytest.approx(7 / 12)
  assert json.loads(json.dumps(jsonable.to_jsonable(s)))["iou"][3] is None
  # Present in the truth but never predicted: IoU 0 (a miss), not undefined.
  s = metrics.scores(metrics.confusion_matrix(np.zeros(6, np.uint8), TRUTH, 3))
  assert s["iou"][1] == 0 and s["iou"][2] == 0 and np.isnan(s["precision"][1])


def _loop_reference(pred, truth, c):
  cm = np.zeros((c, c), np.int64)
  for t, p in zip(truth.ravel().tolist(), pred.ravel().tolist()):
    cm[t, p] += 1
  iou, dice = [], []
  for k in range(c):
    t, p = truth == k, pred == k
    inter, union = float(np.sum(t & p)), float(np.sum(t | p))
    iou.append(inter / union if union else np.nan)
    dice.append(2 * inter / (t.sum() + p.sum()) if union else np.nan)
  return cm, np.array(iou, np.float64), np.array(dice, np.float64)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_volume_matches_loop(seed):
  rng = np.random.default_rng(seed)
  c = 4
  truth = rng.integers(0, c, (5, 6, 7)).astype(np.uint8)
  pred = np.where(rng.random(truth.shape) < 0.6, truth, rng.integers(0, c, truth.shape))
  pred = pred.astype(np.uint8)
  ref_cm, ref_iou, ref_dice = _loop_reference(pred, truth, c)
  cm = metrics.confusion_matrix(pred, truth, c)
  np.testing.assert_array_equal(cm, ref_cm)
  s = metrics.scores(cm)
  np.testing.assert_allclose(s["iou"], ref_iou, rtol=1e-12)
  np.testing.assert_allclose(s["dice"], ref_dice, rtol=1e-12)
  assert s["miou_fg"] == pytest.approx(np.nanmean(ref_iou[1:]), rel=1e-12)


def test_jax_matches_numpy():
  import jax
  rng = np.random.default_rng(2)
  truth = rng.integers(0, 3, (2, 8, 8)).astype(np.uint8)
  pred = rng.integers(0, 3, (2, 8, 8)).astype(np.uint8)
  f = jax.jit(metrics.confusion_matrix_jax, static_argnums=2)
  np.testing.assert_array_equal(np.asarray(f(pred, truth, 3)),
                                metrics.confusion_matrix(pred, truth, 3))
  mask = rng.random(truth.shape) < 0.5
  got = metrics.confusion_matrix_jax(pred, truth, 3, mask=mask)
  np.testing.assert_array_equal(np.asarray(got),
                                metrics.confusion_matrix(pred[mask], truth[mask], 3))
  got = metrics.confusion_matrix_jax(pred, truth, 3, mask=mask.astype(np.float32) * 0.5)
  np.testing.assert_allclose(np.asarray(got),
                             0.5 * metrics.confusion_matrix(pred[mask], truth[mask], 3))


@pytest.mark.parametrize("slab", [1, 3, 64])
def test_streamed_equals_in_memory(tmp_path, slab):
  rng = np.random.default_rng(3)
  truth = rng.integers(0, 3, (7, 5, 6)).astype(np.uint8)
  pred = rng.integers(0, 3, (7, 5, 6)).astype(np.uint8)
  expected = metrics.confusion_matrix(pred, truth, 3)
  np.testing.assert_array_equal(metrics.streamed_confusion(pred, truth, 3, slab=slab), expected)
  a = store.create_array(tmp_path / "p", pred.shape, "uint8", chunks=(2, 5, 6))
  b = store.create_array(tmp_path / "t", truth.shape, "uint8", chunks=(4, 5, 6))
  a.write(pred).result()
  b.write(truth).result()
  np.testing.assert_array_equal(metrics.streamed_confusion(a, b, 3, slab=slab), expected)


def test_bad_inputs():
  with pytest.raises(errors.UserError, match="label value 3 >= number of classes 3"):
    metrics.confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
  with pytest.raises(errors.UserError, match="shape"):
    metrics.confusion_matrix(np.zeros(3, np.uint8), np.zeros(4, np.uint8), 3)
  with pytest.raises(errors.UserError, match="negative"):
    metrics.confusion_matrix(np.array([0, -1]), np.array([0, 1]), 3)


def test_jax_confusion_on_a_sharded_batch():
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  n = jax.device_count()
  rng = np.random.default_rng(4)
  truth = rng.integers(0, 3, (2 * n, 4, 4)).astype(np.uint8)
  pred = rng.integers(0, 3, (2 * n, 4, 4)).astype(np.uint8)
  mesh = jax.make_mesh((n,), ("data",))
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))  # noqa: E731
  got = jax.jit(metrics.confusion_matrix_jax, static_argnums=2)(put(pred), put(truth), 3)
  np.testing.assert_array_equal(np.asarray(got), metrics.confusion_matrix(pred, truth, 3))


# ---------------------------------------------------------------------------------------------
# The evaluation report and launch/evaluate.py.
# ---------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def _dataset(tmp_path):
  z, y, x = np.mgrid[:9, :12, :12]
  truth = np.where((y - 6) ** 2 + (x - 6) ** 2 < 16, 1, 0).astype(np.uint8)
  truth[(y - 6) ** 2 + (x - 6) ** 2 < 4] = 2
  image = (truth * 90 + 10).astype(np.uint8)
  store.write_scan(tmp_path / "DATA" / "scan_000", image, truth, {"voxel_size_um": 5.0},
                   chunks=(4, 12, 12))
  store.write_dataset_json(tmp_path / "DATA", ["background", "bone", "pore"], ["scan_000"])
  pred = truth.copy()
  pred[0] = 0  # the first slice misses all foreground
  np.save(tmp_path / "pred.npy", pred)
  return tmp_path / "DATA" / "scan_000", tmp_path / "pred.npy", truth, pred


def test_evaluate_report(tmp_path):
  scan, pred_path, truth, pred = _dataset(tmp_path)
  ev = report.evaluate(pred_path, scan, pictures=True, overlay_slices=[0, 8], slab=4,
                       progress=False)
  expected = metrics.scores(metrics.confusion_matrix(pred, truth, 3))
  r = ev.result
  assert r["classes"] == ["background", "bone", "pore"] and r["voxel_size_um"] == 5.0
  assert r["iou"]["bone"] == pytest.approx(expected["iou"][1])
  assert r["miou_fg"] == pytest.approx(expected["miou_fg"])
  assert r["measures"]["bv_tv"]["truth"] == pytest.approx(np.sum(truth == 1) / np.sum(truth > 0))
  z_profile = ev.profiles[0]
  assert z_profile[0] == 0 and z_profile[1] == pytest.approx(1.0)
  out = report.write(ev, tmp_path / "rep" / "report.json")
  assert json.loads(Path(out["out"]).read_text())["miou_fg"] == pytest.approx(r["miou_fg"])
  assert "| 1 bone |" in Path(out["report_md"]).read_text()
  assert all(Path(p).stat().st_size > 0 for p in out["pictures"]) and len(out["pictures"]) == 3


def test_evaluate_classes_and_bad_inputs(tmp_path):
  scan, pred_path, truth, _ = _dataset(tmp_path)
  # Outside a dataset, without names: max label + 1 classes.
  np.save(tmp_path / "truth.npy", truth)
  r = report.evaluate(pred_path, tmp_path / "truth.npy", progress=False).result
  assert r["classes"] == ["class_0", "class_1", "class_2"] and r["measures"] == {}
  with pytest.raises(errors.UserError, match="disagrees with the dataset"):
    report.evaluate(pred_path, scan, num_classes=4, progress=False)
  with pytest.raises(errors.UserError, match="shape"):
    np.save(tmp_path / "small.npy", truth[:5])
    report.evaluate(tmp_path / "small.npy", scan, progress=False)
  with pytest.raises(errors.UserError, match="does not exist"):
    report.evaluate(tmp_path / "nope.zarr", scan, progress=False)
  with pytest.raises(errors.UserError, match="number of classes 2"):
    report.evaluate(pred_path, tmp_path / "truth.npy", num_classes=2, progress=False)


def _run(*args):
  return subprocess.run([sys.executable, str(REPO / "launch" / "evaluate.py"), *args],
                        capture_output=True, text=True, timeout=120, cwd=REPO)


def test_cli(tmp_path):
  scan, pred_path, truth, _ = _dataset(tmp_path)
  bad = truth.copy()
  bad[0, 0, 0] = 3
  np.save(tmp_path / "bad.npy", bad)
  out = tmp_path / "rep" / "report.json"
  p = _run(f"--pred={tmp_path / 'bad.npy'}", f"--truth={scan}", f"--out={out}")
  assert p.returncode != 0
  assert p.stderr.strip().splitlines()[-1].startswith("error: prediction label value 3 >=")
  assert "Traceback" not in p.stderr and not out.parent.exists()
  p = _run(f"--pred={pred_path}", f"--truth={scan}", f"--out={out}")
  assert p.returncode == 0, p.stderr
  last = json.loads(p.stdout.strip().splitlines()[-1])
  assert set(last["iou"]) == {"background", "bone", "pore"} and "miou_fg" in last
  assert out.exists() and out.with_suffix(".md").exists()
  p = _run(f"--pred={pred_path}", f"--truth={scan}", f"--out={out}")
  assert p.returncode != 0 and "exists" in p.stderr and "Traceback" not in p.stderr
