"""The Predict widget: the labels of predict_volume, on a worker thread; Cancel mid-run leaves
nothing; bad input is a message in the widget and nothing written."""

import numpy as np
import pytest

from napari_helpers import CLASSES, require_napari

require_napari()  # skips this module without napari or a display

from bonejax import phantom, predict  # noqa: E402
from bonejax.data import store
from bonejax.io import colours
from bonejax.models import bundle
from bonejax.napari import jobs, predict_widget, reader  # noqa: E402
from bonejax.napari.predict_widget import PredictWidget  # noqa: E402
from bundle_helpers import make_bundle  # noqa: E402

WAIT_MS = 300_000


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("napari-predict")
  phantom.make_dataset(root / "data", num_scans=1, shape=(32, 32, 32), seed=5, progress=False)
  return {"scan": root / "data" / "scan_000", "model": make_bundle(root / "model"),
          "model2": make_bundle(root / "model2", in_channels=2)}


def open_scan(viewer, path):
  for data in reader.get_reader(str(path))(str(path)):
    viewer._add_layer_from_data(*data)


def widget_for(make_napari_viewer, qtbot, files):
  viewer = make_napari_viewer()
  open_scan(viewer, files["scan"])
  w = PredictWidget(viewer)
  qtbot.addWidget(w)
  w.model.setText(str(files["model"]))
  w.image.select("scan_000")
  assert w.dtype.currentText() == "auto"  # the default: the fastest accurate dtype here
  w.dtype.setCurrentText("float32")  # the references these tests compare with are float32
  return viewer, w


def test_predict_widget_gives_predict_volumes_labels(make_napari_viewer, qtbot, files, tmp_path):
  viewer, w = widget_for(make_napari_viewer, qtbot, files)
  out = tmp_path / "pred.zarr"
  w.planes.setCurrentText("3")
  w.vote.setCurrentText("soft")
  w.probs.setChecked(True)
  w.output.setText(str(out))
  w.start()
  assert w.busy and not w.run_button.isEnabled() and w.cancel_button.isEnabled()
  qtbot.waitUntil(lambda: not w.busy, timeout=WAIT_MS)
  assert w.status.error is None, w.status.text()
  scan = store.open_scan(files["scan"])
  b = bundle.load_bundle(files["model"])
  want, probs = predict.predict_volume(b, scan.read_image(), stats=scan.stats,
                                       rule=b.normalization, planes=3, vote="soft",
                                       return_probs=True)
  layer = viewer.layers["scan_000 prediction"]
  np.testing.assert_array_equal(layer.data, want)
  np.testing.assert_allclose(layer.scale, [scan.voxel_size_um] * 3)
  assert list(layer.features["class"]) == CLASSES
  np.testing.assert_allclose(viewer.layers["scan_000 p(pore)"].data, probs[..., 2], atol=1e-6)
  saved = store.open_array(out).read().result()
  np.testing.assert_array_equal(saved, want)
  attrs = store.array_attrs(out)
  assert attrs["classes"] == CLASSES and attrs["planes"] == 3
  assert attrs["voxel_size_um"] == pytest.approx(scan.voxel_size_um)
  assert w.bar.value() == w.bar.maximum()
  assert "voxels/s" in w.status.text() and w.result["voxels_per_second"] > 0
  # The saved prediction reads back with the scan's scale and the classes.
  (pred,) = reader.read(str(out))
  assert pred[1]["metadata"]["bonejax"]["classes"] == CLASSES


@pytest.mark.skipif(not (predict_widget.HAS_UNCERTAINTY and predict_widget.HAS_OME_ZARR),
                    reason="this bonejax has no uncertainty maps or OME-Zarr writer")
def test_uncertainty_layer_and_ome_zarr_output(make_napari_viewer, qtbot, files, tmp_path):
  from bonejax.evaluate import uncertainty
  viewer, w = widget_for(make_napari_viewer, qtbot, files)
  out = tmp_path / "pred.ome.zarr"
  w.uncertainty.setChecked(True)
  w.output.setText(str(out))
  w.start()
  qtbot.waitUntil(lambda: not w.busy, timeout=WAIT_MS)
  assert w.status.error is None, w.status.text()
  scan = store.open_scan(files["scan"])
  b = bundle.load_bundle(files["model"])
  labels, probs = predict.predict_volume(b, scan.read_image(), stats=scan.stats,
                                         rule=b.normalization, planes=3, return_probs=True)
  np.testing.assert_array_equal(viewer.layers["scan_000 prediction"].data, labels)
  np.testing.assert_array_equal(viewer.layers["scan_000 uncertainty"].data,
                                uncertainty.maps(probs, None, labels, 1)[..., 0])
  (data, kwargs, kind) = reader.read(str(out))[0]
  assert kind == "labels" and kwargs["metadata"]["bonejax"]["classes"] == CLASSES
  np.testing.assert_allclose(kwargs["scale"], [scan.voxel_size_um] * 3)
  np.testing.assert_array_equal(np.asarray(data[0] if kwargs.get("multiscale") else data),
                                labels)


def test_cancel_mid_run_leaves_no_output(make_napari_viewer, qtbot, files, tmp_path,
                                         monkeypatch):
  viewer, w = widget_for(make_napari_viewer, qtbot, files)
  out_dir = tmp_path / "out"
  w.output.setText(str(out_dir / "pred.zarr"))
  update = jobs.JobProgress.update
  seen = []

  def cancel_after_first_slab(self, n=1, extra=""):
    # Cancel as the user would, once the first slab of planes has gone through the model.
    seen.append(n)
    self.cancel()
    update(self, n, extra)

  monkeypatch.setattr(jobs.JobProgress, "update", cancel_after_first_slab)
  w.start()
  qtbot.waitUntil(lambda: not w.busy, timeout=WAIT_MS)
  assert seen == [seen[0]] and 0 < seen[0] < w._progress.total  # stopped after one slab
  assert w.status.text().startswith("cancelled") and w.status.error is None
  assert [layer.name for layer in viewer.layers] == ["scan_000", "scan_000 labels"]
  # Nothing at the output: no labels, no temporary, no lock, not even the folder made for it.
  assert not out_dir.exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cancel_button(make_napari_viewer, qtbot, files, tmp_path):
  viewer, w = widget_for(make_napari_viewer, qtbot, files)
  w.output.setText(str(tmp_path / "pred.tif"))
  w.start()
  qtbot.mouseClick(w.cancel_button, __import__("qtpy").QtCore.Qt.LeftButton)
  qtbot.waitUntil(lambda: not w.busy, timeout=WAIT_MS)
  assert w.status.text().startswith("cancelled")
  assert list(tmp_path.iterdir()) == []
  assert len(viewer.layers) == 2


def test_bad_input_is_a_message_and_writes_nothing(make_napari_viewer, qtbot, files, tmp_path,
                                                   monkeypatch):
  shown = []
  monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
  viewer, w = widget_for(make_napari_viewer, qtbot, files)
  out = tmp_path / "pred.zarr"
  w.output.setText(str(out))

  def attempt():
    w.start()
    assert not w.busy  # refused before any work
    assert w.status.error and "\n" not in w.status.error
    assert shown[-1] == f"bonejax: {w.status.error}"
    return w.status.error

  w.model.setText(str(files["model2"]))  # a 2-channel model on a 1-channel layer
  assert "1 channel(s)" in attempt() and "expects 2" in attempt()
  w.model.setText(str(tmp_path / "nothing"))
  assert "does not exist" in attempt()
  w.model.setText(str(files["model"]))
  viewer.add_image(np.zeros((32, 32), np.float32), name="slice")
  w.image.select("slice")
  assert "2D" in attempt()
  w.image.select("scan_000")
  w.output.setText(str(tmp_path / "pred.png"))
  assert "must end in" in attempt()
  (tmp_path / "old.zarr").mkdir()  # exists, and overwrite is not ticked
  w.output.setText(str(tmp_path / "old.zarr"))
  assert "exists" in attempt()
  assert [p.name for p in tmp_path.iterdir()] == ["old.zarr"] and len(viewer.layers) == 3
  assert list((tmp_path / "old.zarr").iterdir()) == []


def test_the_layers_own_file_is_never_the_output(make_napari_viewer, qtbot, files, tmp_path):
  viewer, w = widget_for(make_napari_viewer, qtbot, files)
  src = tmp_path / "image.zarr"  # an image array read by the reader, then chosen as output
  image = store.open_scan(files["scan"]).read_image()
  store.create_array(src, image.shape, image.dtype).write(image).result()
  store.set_array_attrs(src, {"source": "test"})
  for data in reader.get_reader(str(src))(str(src)):
    viewer._add_layer_from_data(*data)
  w.image.select("image")
  w.output.setText(str(src))
  w.overwrite.setChecked(True)
  w.start()
  qtbot.waitUntil(lambda: not w.busy, timeout=WAIT_MS)
  assert "would destroy the input" in w.status.error
  np.testing.assert_array_equal(store.open_array(src).read().result(), image)


def test_weights_file_needs_the_converter(make_napari_viewer, qtbot, files, tmp_path,
                                          monkeypatch):
  viewer, w = widget_for(make_napari_viewer, qtbot, files)
  pth = tmp_path / "model.pth"
  pth.write_bytes(b"not really")
  monkeypatch.setattr(predict_widget, "CONVERTER", tmp_path / "absent.py")
  w.model.setText(str(pth))
  w.start()
  assert not w.busy and "convert_weights.py" in w.status.error


FAKE_CONVERTER = """
import shutil, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
if open(args["pth"], "rb").read() != b"weights":
  print("error: not a PyTorch checkpoint", file=sys.stderr)
  sys.exit(2)
shutil.copytree(%r, args["out"])
print("{}")
"""


def test_weights_file_is_converted_first(make_napari_viewer, qtbot, files, tmp_path,
                                         monkeypatch):
  # The converter's command line (--pth, --out) and its one-line errors; converting itself is
  # launch/convert_weights.py's (tests/test_convert*.py).
  from bonejax.napari import predict_widget
  converter = tmp_path / "convert_weights.py"
  converter.write_text(FAKE_CONVERTER % str(files["model"]))
  monkeypatch.setattr(predict_widget, "CONVERTER", converter)
  monkeypatch.setattr(predict_widget.tempfile, "gettempdir", lambda: str(tmp_path / "cache"))
  viewer, w = widget_for(make_napari_viewer, qtbot, files)
  bad = tmp_path / "bad.pth"
  bad.write_bytes(b"junk")
  w.model.setText(str(bad))
  w.start()
  qtbot.waitUntil(lambda: not w.busy, timeout=WAIT_MS)
  assert w.status.error == "not a PyTorch checkpoint"
  good = tmp_path / "model.pth"
  good.write_bytes(b"weights")
  w.model.setText(str(good))
  w.start()
  qtbot.waitUntil(lambda: not w.busy, timeout=WAIT_MS)
  assert w.status.error is None, w.status.text()
  assert "scan_000 prediction" in viewer.layers
  (converted,) = (tmp_path / "cache" / "bonejax-napari-bundles").iterdir()
  assert converted.name.startswith("model-") and (converted / "model.json").exists()


def test_colours_match_the_reports(files):
  from bonejax.napari import layers
  assert layers.label_colours(3) == {None: layers.OTHER_LABEL, 1: colours.colour(1),
                                     2: colours.colour(2)}


def test_resamples_to_the_models_voxel_size_as_predict_py(make_napari_viewer, qtbot, files,
                                                          tmp_path):
  # A bundle trained at other (anisotropic) voxels: the widget predicts on the model's grid
  # and votes on the layer's, as predict_scan does: the same labels voxel for voxel.
  import json
  model = make_bundle(tmp_path / "model")
  meta = json.loads((model / "model.json").read_text())
  v = store.open_scan(files["scan"]).voxel_size_um
  meta["voxel_size_um"] = [v * 1.5, v * 0.75, v * 1.25]
  (model / "model.json").write_text(json.dumps(meta))
  viewer, w = widget_for(make_napari_viewer, qtbot, files)
  w.model.setText(str(model))
  w.planes.setCurrentText("3")
  w.vote.setCurrentText("majority")
  w.probs.setChecked(True)
  w.start()
  qtbot.waitUntil(lambda: not w.busy, timeout=WAIT_MS)
  assert w.status.error is None, w.status.text()
  want = predict.predict_scan(model, files["scan"], planes=3, vote="majority", progress=False,
                              keep_labels=True)
  assert want["resampled"] is not None
  layer = viewer.layers["scan_000 prediction"]
  np.testing.assert_array_equal(layer.data, want["labels"])
  assert w.result["resampled_to_um"] == pytest.approx(meta["voxel_size_um"])
  assert "predicted at" in w.status.text()
  # Every layer the widget added is in the image's micrometres (no "inconsistent units").
  for layer in viewer.layers:
    assert [str(u) for u in layer.units] == ["micrometer"] * 3
    np.testing.assert_allclose(layer.scale, [v] * 3)


def test_progress_phases_then_rate_and_eta():
  p = jobs.JobProgress()
  p.set_phase("compiling")
  assert not p.counting() and p.text() == "compiling…"
  p.total = 10
  p.update(2)
  assert p.counting() and p.text() == "predict 2/10 planes"  # no rate from one update yet
  p._first = (p._first[0] - 2.0, p._first[1])  # two seconds since the first update
  p.update(4)
  text = p.text()
  import re
  m = re.fullmatch(r"predict 6/10 planes · ([\d.]+) planes/s · eta 0:0(\d)", text)
  assert m and float(m.group(1)) == pytest.approx(2.0, rel=0.05) and m.group(2) == "2", text
  p.cancel()
  with pytest.raises(jobs.Cancelled):
    p.set_phase("writing")
