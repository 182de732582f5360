"""The Train widget: launch/train.py in a child process, stopped with Ctrl-C after its first
checkpoint and resumed from it; settings as JSON; layers imported as a dataset; bad input is a
message and starts nothing."""

import json

import numpy as np
import pytest

from napari_helpers import require_napari

require_napari()  # skips this module without napari or a display

from bonejax.data import store  # noqa: E402
from bonejax.napari import layers  # noqa: E402
from bonejax.napari import train_process as tp  # noqa: E402
from bonejax.napari.train_widget import TrainWidget  # noqa: E402

SMOKE = f"{tp.DEMO_CONFIG}:smoke"  # 32-px patches of a 3-scan phantom; checkpoints every 3 steps
WAIT_MS = 400_000


def make_widget(make_napari_viewer, qtbot, workdir):
  viewer = make_napari_viewer()
  w = TrainWidget(viewer)
  qtbot.addWidget(w)
  w.config.setText(SMOKE)
  w.workdir.setText(str(workdir))
  return viewer, w


def last_step(workdir):
  rows = tp.metrics_rows(workdir)
  return int(rows[-1]["step"]) if rows else 0


def test_start_stop_and_resume(make_napari_viewer, qtbot, tmp_path):
  workdir = tmp_path / "run"
  _, w = make_widget(make_napari_viewer, qtbot, workdir)
  w.steps.setValue(1000)
  w.start()
  assert w.running and w.stop_button.isEnabled() and not w.start_button.isEnabled()
  # metrics.csv logs every 2 steps: a row at step 4 means the step-3 checkpoint was started.
  qtbot.waitUntil(lambda: last_step(workdir) >= 4 or not w.running, timeout=WAIT_MS)
  assert w.running, w.status.text()
  w.stop()
  qtbot.waitUntil(lambda: not w.running, timeout=WAIT_MS)
  assert w.status.error is None, w.status.text()
  ckpt = tp.latest_checkpoint(workdir)
  assert ckpt is not None and ckpt >= 3
  assert "Start resumes" in w.status.text() or (w.result and w.result["stopped"] != "num_steps")
  assert w.plot.steps and w.plot.steps[-1] >= 4  # the live plot followed metrics.csv
  # Start again: it resumes from that checkpoint and finishes at the steps asked.
  w.steps.setValue(ckpt + 3)
  w.start()
  qtbot.waitUntil(lambda: not w.running, timeout=WAIT_MS)
  assert w.status.error is None, w.status.text()
  assert w.result["resumed_from"] == ckpt and w.result["steps"] == ckpt + 3
  assert "finished at step" in w.status.text()
  assert (workdir / "model" / "model.json").exists()


def test_settings_round_trip(make_napari_viewer, qtbot, tmp_path):
  _, w = make_widget(make_napari_viewer, qtbot, tmp_path / "run")
  w.steps.setValue(250)
  w.batch.setValue(8)
  w.source.setCurrentIndex(1)
  w.dataset.setText(str(tmp_path / "data"))
  path = tmp_path / "settings.json"
  w.save_settings(str(path))
  saved = json.loads(path.read_text())
  assert saved == {"config": SMOKE, "workdir": str(tmp_path / "run"),
                   "overrides": {"num_steps": 250, "batch_size": 8,
                                 "dataset": str(tmp_path / "data")}}
  _, w2 = make_widget(make_napari_viewer, qtbot, "")
  w2.load_settings(str(path))
  assert (w2.steps.value(), w2.batch.value(), w2.patch.value()) == (250, 8, 0)
  assert w2.source.currentIndex() == 1 and w2.overrides() == saved["overrides"]
  # A bare object of overrides loads too, as --config.KEY=VALUE would set them.
  (tmp_path / "flat.json").write_text(json.dumps({"num_steps": 7, "seed": 3}))
  w2.load_settings(str(tmp_path / "flat.json"))
  assert w2.steps.value() == 7 and w2.extra == {"seed": 3}
  assert tp.command(SMOKE, "/w", {"num_steps": 7, "val_scans": ("a", "b")})[-2:] == [
      "--config.num_steps=7", "--config.val_scans=a,b"]


def test_layers_become_a_dataset(make_napari_viewer, qtbot, tmp_path, monkeypatch):
  viewer, w = make_widget(make_napari_viewer, qtbot, tmp_path / "run")
  rng = np.random.default_rng(0)
  image = rng.integers(0, 4000, (20, 32, 32)).astype(np.uint16)
  labels = (image > 2000).astype(np.uint8)
  viewer.add_image(image, name="ct", scale=(5, 5, 5))
  lab, kwargs, _ = layers.labels_layer(labels, "seg", ["background", "bone"], voxel_size_um=5)
  viewer.add_labels(lab, **kwargs)
  launched = []
  monkeypatch.setattr(tp, "start", lambda argv, workdir: launched.append(argv) or _Done())
  w.source.setCurrentIndex(2)
  w.image.select("ct")
  w.labels.select("seg")
  w.start()
  qtbot.waitUntil(lambda: bool(launched) or w.status.error is not None, timeout=60_000)
  assert w.status.error is None, w.status.text()
  data = tmp_path / "run" / tp.LAYERS_DATASET
  assert f"--config.dataset={data}" in launched[0]
  ds = store.open_dataset(data)
  assert ds.classes == ["background", "bone"] and ds.scans == ["train", "val"]
  train, val = ds.open_scan("train"), ds.open_scan("val")
  assert train.shape == (16, 32, 32) and val.shape == (4, 32, 32)
  np.testing.assert_array_equal(np.concatenate([train.read_image(), val.read_image()]), image)
  np.testing.assert_array_equal(val.read_labels(), labels[16:])
  assert train.voxel_size_um == 5
  qtbot.waitUntil(lambda: not w.running, timeout=60_000)


def test_sparse_layer_becomes_a_sparse_dataset(make_napari_viewer, qtbot, tmp_path, monkeypatch):
  """Unlabelled value 0: napari's unpainted voxels become the dataset's 255 and the painted
  values shift down by one (1 -> background 0, 2 -> bone 1); the last painted slices validate."""
  viewer, w = make_widget(make_napari_viewer, qtbot, tmp_path / "run")
  image = np.random.default_rng(1).integers(0, 4000, (20, 16, 16)).astype(np.uint16)
  painted = np.zeros(image.shape, np.uint8)  # a user painted z = 2, 7, 12, 17 only
  for z in (2, 7, 12, 17):
    painted[z] = np.where(image[z] > 2000, 2, 1)
  viewer.add_image(image, name="ct")
  viewer.add_labels(painted, name="paint")  # a plain napari layer: no class names
  launched = []
  monkeypatch.setattr(tp, "start", lambda argv, workdir: launched.append(argv) or _Done())
  w.source.setCurrentIndex(2)
  w.image.select("ct")
  w.labels.select("paint")
  assert w.unlabelled.value() == -1 and "paint background as 1" in w.unlabelled.toolTip()
  w.unlabelled.setValue(0)
  w.start()
  qtbot.waitUntil(lambda: bool(launched) or w.status.error is not None, timeout=60_000)
  assert w.status.error is None, w.status.text()
  ds = store.open_dataset(tmp_path / "run" / tp.LAYERS_DATASET)
  assert ds.unlabelled == 255 and ds.classes == ["background", "class_1"]
  want = np.where(painted == 0, 255, painted.astype(np.int64) - 1)
  train, val = ds.open_scan("train").read_labels(), ds.open_scan("val").read_labels()
  assert train.shape[0] == 17 and val.shape[0] == 3  # slice 17 (1/4 of the painted) validates
  np.testing.assert_array_equal(np.concatenate([train, val]), want)
  qtbot.waitUntil(lambda: not w.running, timeout=60_000)
  # The same workdir with dense labels: its layers dataset is sparse, so Start refuses.
  w.unlabelled.setValue(-1)
  launched.clear()
  w.start()
  qtbot.waitUntil(lambda: not w.running, timeout=60_000)
  assert "sparse labels (unlabelled 255), not dense labels" in w.status.error and not launched


def test_layer_labels_conventions():
  image = np.zeros((4, 3, 3), np.uint8)
  lab = np.zeros(image.shape, np.uint8)
  lab[0, 0, :3] = [5, 6, 7]  # unlabelled 6: 5 stays, 7 -> 6; the layer names 8 values
  names = [f"v{k}" for k in range(8)]
  out, classes, u = tp.layer_labels(image, lab, names, 6)
  assert u == 255 and classes == ["v0", "v1", "v2", "v3", "v4", "v5", "v7"]
  assert out[0, 0, :3].tolist() == [5, 255, 6] and (out[1:] == 0).all()
  dense, classes, u = tp.layer_labels(image, lab, names, None)
  assert u is None and classes == names and (dense == lab).all()
  with pytest.raises(Exception, match="no labelled voxel"):
    tp.layer_labels(image, np.zeros_like(lab), None, 0)
  with pytest.raises(Exception, match="at least 2 classes"):
    tp.layer_labels(image, (lab > 0).astype(np.uint8), None, 0)  # only value 1 painted
  with pytest.raises(Exception, match="paint at least two Z slices"):
    tp._val_slices(np.where(np.arange(4)[:, None, None] == 1, 0, 255) + 0 * lab, 255)


class _Done:
  """A child process that has already exited with an error (the launch is what is tested)."""
  pid = 0

  def poll(self):
    return 2


def test_bad_input_starts_nothing(make_napari_viewer, qtbot, tmp_path, monkeypatch):
  shown = []
  monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
  viewer, w = make_widget(make_napari_viewer, qtbot, tmp_path / "run")
  monkeypatch.setattr(tp, "start", lambda *a: pytest.fail("must not start"))
  (tmp_path / "plain").mkdir()
  w.source.setCurrentIndex(1)
  w.dataset.setText(str(tmp_path / "plain"))  # a directory without dataset.json
  w.start()
  assert "is not a dataset (no dataset.json)" in w.status.error and not w.running
  assert shown == [f"bonejax: {w.status.error}"]
  w.source.setCurrentIndex(0)
  w.config.setText(str(tmp_path / "nope.py"))
  w.start()
  assert "does not exist" in w.status.error
  w.config.setText(SMOKE)
  w.source.setCurrentIndex(2)
  image = np.zeros((8, 16, 16), np.float32)
  lab = np.zeros((8, 16, 16), np.uint8)
  lab[0, 0, 0] = 3  # past the two classes the layer names
  viewer.add_image(image, name="ct")
  data, kwargs, _ = layers.labels_layer(lab, "seg", ["background", "bone"])
  viewer.add_labels(data, **kwargs)
  w.image.select("ct")
  w.labels.select("seg")
  w.start()
  assert "label value 3 >= number of classes 2" in w.status.error and not w.running
  assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]  # no workdir, no dataset


def test_loss_plot_keeps_its_height_with_three_docks(make_napari_viewer, qtbot):
  from bonejax.napari.evaluate_widget import EvaluateWidget
  from bonejax.napari.predict_widget import PredictWidget
  from bonejax.napari.train_widget import PLOT_MIN_HEIGHT
  viewer = make_napari_viewer(show=True)
  for name, widget in (("Predict", PredictWidget(viewer)), ("Evaluate", EvaluateWidget(viewer)),
                       ("Train", TrainWidget(viewer))):
    viewer.window.add_dock_widget(widget, name=name, area="right")
  train = widget
  viewer.window._qt_window.resize(1400, 900)
  qtbot.waitUntil(lambda: train.plot.height() > 0, timeout=10_000)
  qtbot.wait(200)
  assert train.plot.height() >= PLOT_MIN_HEIGHT
  assert train.plot.canvas.height() >= PLOT_MIN_HEIGHT - 10
