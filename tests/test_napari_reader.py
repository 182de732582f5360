"""The napari reader: scans, datasets, predictions, probabilities and OME-Zarr open as layers
with the voxel size as scale and the class names and colours; bad input is a notification."""

import json

import numpy as np
import pytest

from napari_helpers import CLASSES, require_napari

require_napari()  # skips this module without napari or a display

from bonejax import phantom  # noqa: E402
from bonejax.data import store
from bonejax.io import colours
from bonejax.napari import reader  # noqa: E402



@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  path = tmp_path_factory.mktemp("napari-reader") / "data"
  phantom.make_dataset(path, num_scans=2, shape=(32, 32, 40), seed=3, kind="bone",
                       progress=False)
  return path


def open_in(viewer, path):
  """What napari does with the reader's answer: layers from LayerData, added to the viewer."""
  fn = reader.get_reader(str(path))
  assert fn is not None
  added = []
  for data in fn(str(path)):
    added += viewer._add_layer_from_data(*data)  # napari's own step for a reader's LayerData
  return added


def check_labels_colours(layer, classes):
  assert list(layer.features["class"]) == classes
  for k in range(1, len(classes)):
    rgb = colours.colour(k).lstrip("#")
    want = [int(rgb[i:i + 2], 16) / 255 for i in (0, 2, 4)]
    np.testing.assert_allclose(layer.colormap.color_dict[k][:3], want, atol=1e-6)


def test_scan_opens_image_and_labels_with_voxel_size_and_classes(make_napari_viewer, dataset):
  viewer = make_napari_viewer()
  scan = store.open_scan(dataset / "scan_000")
  image, labels = open_in(viewer, dataset / "scan_000")
  v = scan.voxel_size_um
  assert image.name == "scan_000" and labels.name == "scan_000 labels"
  assert type(labels).__name__ == "Labels"
  np.testing.assert_allclose(image.scale, [v, v, v])
  np.testing.assert_allclose(labels.scale, [v, v, v])
  np.testing.assert_array_equal(np.asarray(image.data), scan.read_image())
  np.testing.assert_array_equal(np.asarray(labels.data), scan.read_labels())
  stats = scan.stats
  assert image.contrast_limits == pytest.approx([stats["p0_5"], stats["p99_9"]], rel=1e-5)
  assert image.metadata["bonejax"]["intensity"] == stats
  check_labels_colours(labels, CLASSES)


def test_dataset_opens_every_scan(make_napari_viewer, dataset):
  viewer = make_napari_viewer()
  added = open_in(viewer, dataset)
  assert [layer.name for layer in added] == ["scan_000", "scan_000 labels", "scan_001",
                                             "scan_001 labels"]
  assert [layer.visible for layer in added] == [True, True, False, False]
  for layer in added[1::2]:
    check_labels_colours(layer, CLASSES)


def test_prediction_and_probabilities_take_the_source_scans_voxel_size(make_napari_viewer,
                                                                        dataset, tmp_path):
  scan = store.open_scan(dataset / "scan_001")
  labels = scan.read_labels()
  # What predict.py writes: zarr v3 labels with attributes, and (Z, Y, X, K) probabilities.
  store.create_array(tmp_path / "pred.zarr", labels.shape, np.uint8).write(labels).result()
  store.set_array_attrs(tmp_path / "pred.zarr", {"classes": CLASSES, "source": str(scan.path)})
  probs = np.eye(3, dtype=np.float32)[labels]
  store.create_array(tmp_path / "probs.zarr", probs.shape, np.float32).write(probs).result()
  store.set_array_attrs(tmp_path / "probs.zarr", {"classes": CLASSES, "source": str(scan.path),
                                                  "content": "mean probabilities (Z, Y, X, K)"})
  viewer = make_napari_viewer()
  (pred,) = open_in(viewer, tmp_path / "pred.zarr")
  v = scan.voxel_size_um
  assert pred.name == "pred" and type(pred).__name__ == "Labels"
  np.testing.assert_allclose(pred.scale, [v, v, v])
  np.testing.assert_array_equal(np.asarray(pred.data), labels)
  check_labels_colours(pred, CLASSES)
  channels = open_in(viewer, tmp_path / "probs.zarr")
  assert [c.name for c in channels] == [f"probs p({c})" for c in CLASSES]
  np.testing.assert_allclose(channels[1].scale, [v, v, v])
  np.testing.assert_array_equal(np.asarray(channels[2].data), probs[..., 2])
  # Uncertainty maps (predict.py --save_uncertainty): named uint8 channels, images not labels.
  unc = np.stack([labels * 40, labels * 80], axis=-1).astype(np.uint8)
  store.create_array(tmp_path / "unc.zarr", unc.shape, np.uint8).write(unc).result()
  store.set_array_attrs(tmp_path / "unc.zarr", {"classes": CLASSES, "source": str(scan.path),
                                                "channels": ["entropy", "disagreement"]})
  maps = open_in(viewer, tmp_path / "unc.zarr")
  assert [m.name for m in maps] == ["unc entropy", "unc disagreement"]
  assert {type(m).__name__ for m in maps} == {"Image"}
  np.testing.assert_allclose(maps[0].scale, [v, v, v])


def write_ome_group(path, attrs):
  path.mkdir(parents=True, exist_ok=True)
  (path / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                              "attributes": {"ome": attrs}}))


def test_ome_zarr_image_with_a_label_image(make_napari_viewer, dataset, tmp_path):
  # OME-NGFF 0.5 as the specification writes it: two image levels in micrometres and a
  # label image under labels/ with colours and class names.
  scan = store.open_scan(dataset / "scan_000")
  image, labels = scan.read_image(), scan.read_labels()
  root = tmp_path / "scan.ome.zarr"
  axes = [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]

  def multiscales(levels):
    return [{"axes": axes, "datasets": [
        {"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [s] * 3}]}
        for i, s in enumerate(levels)]}]

  write_ome_group(root, {"version": "0.5", "multiscales": multiscales([2.5, 5.0])})
  store.create_array(root / "0", image.shape, image.dtype).write(image).result()
  store.create_array(root / "1", [s // 2 for s in image.shape], image.dtype).write(
      image[::2, ::2, ::2]).result()
  write_ome_group(root / "labels", {"version": "0.5", "labels": ["tissue"]})
  write_ome_group(root / "labels" / "tissue", {
      "version": "0.5", "multiscales": multiscales([2.5]),
      "image-label": {"colors": [{"label-value": 1, "rgba": [255, 0, 0, 255]},
                                 {"label-value": 2, "rgba": [0, 0, 255, 255]}],
                      "properties": [{"label-value": k, "class": c}
                                     for k, c in enumerate(CLASSES)]}})
  store.create_array(root / "labels" / "tissue" / "0", labels.shape, np.uint8).write(
      labels).result()
  viewer = make_napari_viewer()
  img, lab = open_in(viewer, root)
  assert img.name == "scan" and img.multiscale and len(img.data) == 2
  np.testing.assert_allclose(img.scale, [2.5] * 3)
  assert [str(u) for u in img.units] == ["micrometer"] * 3
  np.testing.assert_array_equal(np.asarray(img.data[0]), image)
  assert lab.name == "scan tissue" and type(lab).__name__ == "Labels"
  np.testing.assert_allclose(lab.scale, [2.5] * 3)
  assert list(lab.features["class"]) == CLASSES
  np.testing.assert_allclose(lab.colormap.color_dict[1], [1, 0, 0, 1])
  assert lab.metadata["bonejax"]["voxel_size_um"] == [2.5] * 3
  # The widgets take a multiscale layer's full resolution.
  from bonejax.napari import layers, predict_widget
  assert layers.data_of(img).shape == image.shape
  predict_widget.check_layer(img, {"in_channels": 1})


def test_bad_and_foreign_paths(make_napari_viewer, tmp_path, monkeypatch):
  assert reader.get_reader(str(tmp_path)) is None  # not ours: napari asks other readers
  assert reader.get_reader(str(tmp_path / "missing.zarr")) is None
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "dataset.json").write_text("{not json")
  shown = []
  monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
  fn = reader.get_reader(str(bad))
  assert fn(str(bad)) == [(None,)]  # napari's "nothing to add"
  assert len(shown) == 1 and "is not valid JSON" in shown[0] and "\n" not in shown[0]


def _has_entry_point():
  import importlib.metadata
  try:
    eps = importlib.metadata.distribution("bonejax").entry_points
  except importlib.metadata.PackageNotFoundError:
    return False
  return any(ep.group == "napari.manifest" for ep in eps)


@pytest.mark.skipif(not _has_entry_point(), reason="bonejax is installed without the "
                    "napari.manifest entry point (an install older than the plugin)")
def test_napari_opens_a_dataset_through_the_installed_plugin(make_napari_viewer, dataset):
  # Drag and drop: napari picks the reader from the installed plugin's manifest.
  from npe2 import PluginManager
  pm = PluginManager.instance()
  if "bonejax" not in {m.name for m in pm.iter_manifests()}:
    pm.discover(include_npe1=False)
  viewer = make_napari_viewer()
  added = viewer.open(str(dataset / "scan_001"), plugin="bonejax")
  assert [layer.name for layer in added] == ["scan_001", "scan_001 labels"]
  v = store.open_scan(dataset / "scan_001").voxel_size_um
  np.testing.assert_allclose(added[1].scale, [v, v, v])


def test_anisotropic_scan_and_class_named_probabilities(make_napari_viewer, tmp_path):
  # A scan of 8 x 6.24 x 6.24 um voxels keeps its three sizes; --save_probs as OME-Zarr opens
  # as one layer per class named by the omero channel labels, every layer in micrometres.
  from bonejax.io import ome_zarr
  shape, voxel = (6, 8, 10), [8.0, 6.24, 6.24]
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, shape).astype(np.uint8)
  store.write_scan(tmp_path / "s0", rng.random(shape).astype(np.float32), labels,
                   attrs={"voxel_size_um": 6.24, "voxel_size_zyx_um": voxel})
  probs = rng.random(shape + (3,)).astype(np.float32)
  w = ome_zarr.OmeZarrWriter(tmp_path / "probs.ome.zarr", shape, np.float32, kind="image",
                             channels=3, channel_names=CLASSES, voxel_size_um=voxel)
  w.view[...].write(probs).result()
  w.finish({"classes": CLASSES})
  viewer = make_napari_viewer()
  added = open_in(viewer, tmp_path / "s0") + open_in(viewer, tmp_path / "probs.ome.zarr")
  for layer in added:
    np.testing.assert_allclose(layer.scale, voxel)
    assert [str(u) for u in layer.units] == ["micrometer"] * 3
  assert [layer.name for layer in added[2:]] == [f"probs p({c})" for c in CLASSES]
  assert [tuple(layer.contrast_limits) for layer in added[2:]] == [(0.0, 1.0)] * 3
  np.testing.assert_allclose(np.asarray(added[3].data), probs[..., 1])


def test_dataset_with_mixed_voxel_sizes_opens_centred(make_napari_viewer, tmp_path):
  # Two scans of different voxel sizes and shapes: each is placed with its centre on the
  # first's, so the extent napari fits the view to is centred on the scan shown.
  rng = np.random.default_rng(1)
  for name, shape, v in (("a", (8, 10, 12), 5.0), ("b", (6, 20, 9), 12.0)):
    store.write_scan(tmp_path / "d" / name, rng.random(shape).astype(np.float32),
                     attrs={"voxel_size_um": v})
  store.write_dataset_json(tmp_path / "d", CLASSES, ["a", "b"])
  viewer = make_napari_viewer()
  a, b = open_in(viewer, tmp_path / "d")
  centres = []
  for layer in (a, b):
    ext = np.asarray(layer.extent.world)  # [min, max] corners in micrometres
    centres.append((ext[0] + ext[1]) / 2)
  np.testing.assert_allclose(centres[0], centres[1], atol=1e-9)
  world = np.asarray(viewer.layers.extent.world)
  np.testing.assert_allclose((world[0] + world[1]) / 2, centres[0], atol=1e-9)
