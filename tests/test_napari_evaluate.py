"""The Evaluate widget: its numbers are bonejax.evaluate.metrics' and bonejax.evaluate.measures'; the report it
writes is evaluate.py's; labels past the class count are a message, and nothing is written."""

import json

import numpy as np
import pytest

from napari_helpers import CLASSES, require_napari

require_napari()  # skips this module without napari or a display

from bonejax.evaluate import measures, metrics  # noqa: E402
from bonejax.napari import layers  # noqa: E402
from bonejax.napari.evaluate_widget import EvaluateWidget  # noqa: E402

VOXEL = 12.5
WAIT_MS = 120_000


def labels_pair(seed=0, shape=(12, 20, 24)):
  rng = np.random.default_rng(seed)
  z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
  truth = np.where((y - 10) ** 2 + (x - 12) ** 2 < 60, 1, 0).astype(np.uint8)
  truth[(truth == 1) & (rng.random(shape) < 0.2)] = 2
  pred = truth.copy()
  flip = rng.random(shape) < 0.1
  pred[flip] = rng.integers(0, 3, flip.sum())
  return pred, truth


def add(viewer, data, name, classes=CLASSES):
  lab, kwargs, _ = layers.labels_layer(data, name, classes, voxel_size_um=VOXEL)
  return viewer.add_labels(lab, **kwargs)


def evaluated(make_napari_viewer, qtbot, pred, truth, classes=CLASSES):
  viewer = make_napari_viewer()
  add(viewer, pred, "pred", classes)
  add(viewer, truth, "truth", classes)
  w = EvaluateWidget(viewer)
  qtbot.addWidget(w)
  w.pred.select("pred")
  w.truth.select("truth")
  w.start()
  qtbot.waitUntil(lambda: not w.busy, timeout=WAIT_MS)
  return viewer, w


def test_numbers_equal_bonejax_metrics_and_measures(make_napari_viewer, qtbot, tmp_path):
  pred, truth = labels_pair()
  _, w = evaluated(make_napari_viewer, qtbot, pred, truth)
  assert w.status.error is None, w.status.text()
  r = w.result
  want = metrics.scores(metrics.confusion_matrix(pred, truth, 3), CLASSES)
  assert [r["iou"][c] for c in CLASSES] == pytest.approx(want["iou"], abs=1e-12)
  assert [r["dice"][c] for c in CLASSES] == pytest.approx(want["dice"], abs=1e-12)
  assert r["miou_fg"] == pytest.approx(want["miou_fg"], abs=1e-12)
  assert r["miou_all"] == pytest.approx(want["miou_all"], abs=1e-12)
  m = measures.compare(measures.measure(pred, CLASSES, VOXEL), measures.measure(truth, CLASSES,
                                                                               VOXEL))
  assert r["measures"].keys() == m.keys() and "bv_tv" in m and "porosity" in m
  for k in m:
    assert r["measures"][k]["pred"] == pytest.approx(m[k]["pred"])
    assert r["measures"][k]["truth"] == pytest.approx(m[k]["truth"])
  assert r["voxel_size_um"] == VOXEL and r["pred"] == "pred" and r["truth"] == "truth"
  # What the table shows.
  assert w.table.rowCount() == 3 and w.table.item(1, 0).text() == "1 bone"
  assert w.table.item(1, 1).text() == f"{want['iou'][1]:.4f}"
  assert f"miou_fg {want['miou_fg']:.4f}" in w.summary.text()
  assert w.measures.rowCount() == len(m)
  # Write report: REPORT.json (+ .md) with the same numbers.
  out = tmp_path / "reports" / "eval.json"
  w.out.setText(str(out))
  w.html.setChecked(False)
  w.write()
  assert w.status.error is None, w.status.text()
  saved = json.loads(out.read_text())
  assert saved["miou_fg"] == pytest.approx(want["miou_fg"])
  assert saved["iou"]["pore"] == pytest.approx(want["iou"][2])
  assert (tmp_path / "reports" / "eval.md").exists()


@pytest.mark.skipif(not __import__("bonejax.napari.evaluate_widget", fromlist=["x"]).HAS_HTML,
                    reason="this bonejax has no HTML report (bonejax.evaluate.html_report)")
def test_html_report(make_napari_viewer, qtbot, tmp_path):
  pred, truth = labels_pair(1)
  _, w = evaluated(make_napari_viewer, qtbot, pred, truth)
  w.html.setChecked(True)
  w.start()
  qtbot.waitUntil(lambda: not w.busy, timeout=WAIT_MS)
  w.out.setText(str(tmp_path / "eval.json"))
  w.write()
  assert w.status.error is None, w.status.text()
  page = (tmp_path / "eval.html").read_text()
  assert page.startswith("<!DOCTYPE html>") and "Per class" in page and "porosity" in page
  assert w.status.text().endswith("eval.html")


def test_labels_past_the_class_count_are_a_message(make_napari_viewer, qtbot, tmp_path,
                                                    monkeypatch):
  shown = []
  monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
  pred, truth = labels_pair(2)
  pred[0, 0, :3] = 5
  _, w = evaluated(make_napari_viewer, qtbot, pred, truth)
  assert "label value 5 >= number of classes 3" in w.status.error
  assert shown == [f"bonejax: {w.status.error}"]
  assert w.result is None and not w.write_button.isEnabled()
  w.out.setText(str(tmp_path / "eval.json"))
  w.write()
  assert list(tmp_path.iterdir()) == []


def test_shape_mismatch_and_2d_layers(make_napari_viewer, qtbot):
  pred, truth = labels_pair(3)
  viewer, w = evaluated(make_napari_viewer, qtbot, pred[:-1], truth)
  assert "prediction shape" in w.status.error
  viewer.add_labels(np.zeros((20, 24), np.uint8), name="flat")
  w.pred.select("flat")
  w.start()
  assert not w.busy and "3D" in w.status.error


def test_anisotropic_layers_and_morphometry(make_napari_viewer, qtbot):
  # Layers of 8 x 6.24 x 6.24 um voxels: volumes use the three sizes; "bone morphometry" adds
  # the bone indices of both layers under the measures, as evaluate.py --morphometry does.
  pred, truth = labels_pair(1)
  voxel = (8.0, 6.24, 6.24)
  viewer = make_napari_viewer()
  for data, name in ((pred, "pred"), (truth, "truth")):
    lab, kwargs, _ = layers.labels_layer(data, name, CLASSES, voxel_size_um=voxel)
    viewer.add_labels(lab, **kwargs)
  w = EvaluateWidget(viewer)
  qtbot.addWidget(w)
  w.pred.select("pred")
  w.truth.select("truth")
  w.morphometry.setChecked(True)
  w.start()
  qtbot.waitUntil(lambda: not w.busy, timeout=WAIT_MS)
  assert w.status.error is None, w.status.text()
  r = w.result
  assert r["voxel_size_zyx_um"] == pytest.approx(list(voxel))
  vol_mm3 = 8e-3 * 6.24e-3 * 6.24e-3
  assert r["measures"]["bone_volume_mm3"]["truth"] == pytest.approx((truth == 1).sum() * vol_mm3)
  morph = r["morphometry"]["bone"]["indices"]
  assert morph["BV"]["truth"] == pytest.approx((truth == 1).sum() * 8 * 6.24 * 6.24)
  shown = [w.measures.item(i, 0).text() for i in range(w.measures.rowCount())]
  assert "bone: Tb.Th (um)" in shown and "bone: BV/TV" in shown
  assert "8 x 6.24 x 6.24 um (Z, Y, X)" in w.summary.text()
