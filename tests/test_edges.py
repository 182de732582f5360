"""Edges (issue 28): training crops reach the volume's borders as often as prediction needs them,
and the border band (outer voxels) is scored apart from the interior."""

import numpy as np
import pytest

from bonejax.data import patches, store
from bonejax.evaluate import border, metrics


def test_zero_margin_is_the_old_uniform_rule():
  h = patches._hash(3, np.arange(5000), 0)
  n = np.full(5000, 100)
  np.testing.assert_array_equal(patches._edge_origin(h, n, 32, 0), patches._randint(h, 0, 68))
  small = np.full(5000, 20)  # shorter than the patch: mirrored origins in [n - P, 0]
  np.testing.assert_array_equal(patches._edge_origin(h, small, 32, 0),
                                patches._randint(h, -12, 0))


@pytest.mark.parametrize("margin", [4, 16])
def test_margin_clamps_onto_the_borders(margin):
  h = patches._hash(1, np.arange(40000), 0)
  o = patches._edge_origin(h, np.full(h.size, 100), 32, margin)
  assert o.min() == 0 and o.max() == 68
  span = 69 + 2 * margin
  for edge in (0, 68):  # each border takes the margin's share, within sampling noise
    assert np.mean(o == edge) == pytest.approx((margin + 1) / span, rel=0.1)
  inner = np.bincount(o, minlength=69)[1:68] / o.size
  assert np.allclose(inner, 1 / span, rtol=0.2)


def test_cell_bounds_keep_the_cell_in_the_crop():
  h = patches._hash(2, np.arange(3000), 0)
  n = np.full(h.size, 50)
  first = patches._randint(patches._hash(9, np.arange(3000)), 0, 49)
  last = np.minimum(first + 7, 49)
  o = patches._edge_origin(h, n, 16, 8, first, last)
  assert np.all((o <= first) & (o + 16 > last) & (o >= 0) & (o <= 34))


def _coverage(root, margin, axis_rows=64, patch=16):
  """How often each row of the axis-0 planes lies inside a crop, over two epochs."""
  with patches.PatchStream(root, ["s"], patch_size=patch, global_batch_size=4, axes=(0,),
                           patches_per_plane=64, process_index=0, process_count=1,
                           edge_margin=margin) as s:
    rows = s.records(np.arange(2 * s.records_per_epoch))
  cover = np.zeros(axis_rows)
  for oy in rows[:, 3]:
    cover[oy:oy + patch] += 1
  return cover


def test_border_rows_are_trained_nearly_as_often_as_interior_rows(tmp_path):
  """The cause of issue 28's worse edges: with crops inside the volume a border row is in
  1 / (n - P + 1) of the crops, an interior row in P / (n - P + 1): here 16x rarer."""
  img = np.arange(4 * 64 * 64, dtype=np.uint16).reshape(4, 64, 64)
  store.write_scan(tmp_path / "s", img, (img % 3).astype(np.uint8), chunks=(4, 32, 32))
  store.write_dataset_json(tmp_path, ["a", "b", "c"], ["s"])
  before, after = _coverage(tmp_path, 0), _coverage(tmp_path, None)
  interior = lambda c: c[24:40].mean()  # noqa: E731
  assert before[0] / interior(before) < 0.1 and before[-1] / interior(before) < 0.1
  assert after[0] / interior(after) > 0.4 and after[-1] / interior(after) > 0.4


def test_3d_border_voxels_are_trained_nearly_as_often_as_interior_voxels(tmp_path):
  """The 3D stream draws its uniform origins the same way (foreground draws off here)."""
  from bonejax.data import patches3d
  img = np.arange(48 * 16 * 16, dtype=np.uint16).reshape(48, 16, 16)
  store.write_scan(tmp_path / "s", img, (img % 3).astype(np.uint8), chunks=(16, 16, 16))
  store.write_dataset_json(tmp_path, ["a", "b", "c"], ["s"])

  def coverage(margin):
    with patches3d.PatchStream3d(tmp_path, ["s"], patch_size=16, global_batch_size=4,
                                 patches_per_scan=2000, foreground=0.0, process_index=0,
                                 process_count=1, edge_margin=margin) as s:
      rows = s.records(np.arange(s.records_per_epoch))
    cover = np.zeros(48)
    for oz in rows[:, 1]:
      cover[oz:oz + 16] += 1
    assert rows[:, 1].min() >= 0 and rows[:, 1].max() <= 32 and not rows[:, 2:].any()
    return cover / cover[20:28].mean()

  before, after = coverage(0.0), coverage(None)
  assert before[0] < 0.1 and before[-1] < 0.1
  assert after[0] > 0.4 and after[-1] > 0.4


def test_band_mask_against_brute_force():
  shape = (5, 7, 6)
  z, y, x = np.indices(shape)
  dist = np.minimum.reduce([z, shape[0] - 1 - z, y, shape[1] - 1 - y, x, shape[2] - 1 - x])
  for band in (1, 2, 3):
    np.testing.assert_array_equal(border.band_mask(shape, band), dist < band)
    np.testing.assert_array_equal(border.band_mask(shape, band, 1, 4), (dist < band)[1:4])


def test_border_scores_against_numpy():
  rng = np.random.default_rng(0)
  shape = (9, 10, 11)
  truth = rng.integers(0, 3, shape).astype(np.uint8)
  pred = np.where(rng.random(shape) < 0.8, truth, rng.integers(0, 3, shape)).astype(np.uint8)
  truth[0, 0, :5] = 255
  truth[4, 5, 5] = 255
  m = border.band_mask(shape, 2)
  keep = truth != 255
  b, i = border.border_confusion(pred, truth, 3, band=2, ignore=255, slab=4)
  np.testing.assert_array_equal(b, metrics.confusion_matrix(pred[m & keep], truth[m & keep], 3))
  np.testing.assert_array_equal(i, metrics.confusion_matrix(pred[~m & keep], truth[~m & keep], 3))
  assert b.sum() + i.sum() == keep.sum()
  s = border.border_scores(pred, truth, ["bg", "bone", "pore"], band=2, ignore=255)
  assert s["gap_miou_fg"] == pytest.approx(s["interior"]["miou_fg"] - s["border"]["miou_fg"])
  assert s["border"]["confusion"] == b.tolist()


# ---- the border band in evaluate.py's report -------------------------------------------------


def _numpy_iou(pred, truth, where, k):
  """Per-class IoU over the voxels `where`, by a float64 loop (NaN: empty union)."""
  out = []
  for c in range(k):
    inter = np.sum((pred == c) & (truth == c) & where, dtype=np.float64)
    union = np.sum(((pred == c) | (truth == c)) & where, dtype=np.float64)
    out.append(inter / union if union else float("nan"))
  return out


def _wrong_on_the_border(shape=(12, 14, 16), band=2, seed=0):
  """A truth and a prediction equal to it inside, wrong on about half the band's voxels."""
  rng = np.random.default_rng(seed)
  truth = rng.integers(0, 3, shape).astype(np.uint8)
  m = border.band_mask(shape, band)
  pred = np.where(m & (rng.random(shape) < 0.5), (truth + 1) % 3, truth).astype(np.uint8)
  return truth, pred, m


@pytest.mark.parametrize("band,slab", [(2, 5), (3, 64)])
def test_report_scores_a_prediction_wrong_only_on_the_border(tmp_path, band, slab):
  from bonejax.evaluate import report
  truth, pred, m = _wrong_on_the_border(band=band)
  np.save(tmp_path / "truth.npy", truth)
  np.save(tmp_path / "pred.npy", pred)
  names = ["background", "bone", "pore"]
  ev = report.evaluate(tmp_path / "pred.npy", tmp_path / "truth.npy", classes=names,
                       slab=slab, progress=False, border_band=band)
  sec = ev.result["border_band"]
  assert sec["band_voxels"] == band
  assert sec["voxels"] == {"border": int(m.sum()), "interior": int((~m).sum())}
  want_b, want_i = _numpy_iou(pred, truth, m, 3), _numpy_iou(pred, truth, ~m, 3)
  for c, n in enumerate(names):
    r = sec["iou"][n]
    assert r["interior"] == 1.0 and r["border"] == pytest.approx(want_b[c], abs=1e-12)
    assert r["interior"] == pytest.approx(want_i[c])
    assert r["difference"] == pytest.approx(1.0 - want_b[c], abs=1e-12)
  assert sec["miou_fg"]["border"] == pytest.approx(np.mean(want_b[1:]), abs=1e-12)
  assert sec["miou_fg"]["difference"] == pytest.approx(1.0 - np.mean(want_b[1:]), abs=1e-12)
  out = report.write(ev, tmp_path / f"rep{band}.json")
  md = (tmp_path / f"rep{band}.md").read_text()
  assert "## Border band vs interior" in md and f"IoU in the outer {band} voxels" in md
  assert f"| 1 bone | {want_b[1]:.4f} | 1.0000 | {1 - want_b[1]:.4f} |" in md
  assert out["border_band"]["iou"]["pore"]["interior"] == 1.0
  off = report.evaluate(tmp_path / "pred.npy", tmp_path / "truth.npy", progress=False,
                        border_band=0)
  assert "border_band" not in off.result and off.result["miou_fg"] == ev.result["miou_fg"]


def test_band_wider_than_the_volume_leaves_no_interior():
  truth, pred, _ = _wrong_on_the_border(shape=(4, 6, 6), band=2)
  b, i = border.border_confusion(pred, truth, 3, band=2)
  assert i.sum() == 0 and b.sum() == truth.size
  sec = border.section(b, i, ["a", "b", "c"], 2)
  assert np.isnan(sec["miou_fg"]["interior"]) and np.isnan(sec["iou"]["b"]["difference"])
  with pytest.raises(Exception, match="border band 0"):
    border.BandCounter((4, 6, 6), 3, band=0)


def test_edge_margin_is_a_config_fraction_of_the_patch(tmp_path, monkeypatch):
  """config.edge_margin (a fraction of the patch) reaches the stream the host and device
  samplers share; bad values are one-line errors."""
  import types

  from bonejax.core import errors
  from bonejax.train import configlib, setup

  img = np.zeros((4, 40, 40), np.uint16)
  stripes = (np.indices(img.shape)[2] % 2).astype(np.uint8)  # both classes labelled
  store.write_scan(tmp_path / "s", img, stripes, chunks=(4, 40, 40))
  store.write_dataset_json(tmp_path, ["a", "b"], ["s"])
  kw = dict(patch_size=16, global_batch_size=2, process_index=0, process_count=1)
  for frac, px in ((None, 8), (0.0, 0), (0.25, 4), (1.0, 16)):
    with patches.PatchStream(tmp_path, ["s"], edge_margin=frac, **kw) as s:
      assert s.edge_margin == px
  for bad in (-0.1, 1.5, float("nan"), "wide"):
    with pytest.raises(errors.UserError, match="edge_margin"):
      patches.PatchStream(tmp_path, ["s"], edge_margin=bad, **kw)

  c = configlib.default_config()
  assert c.edge_margin == patches.EDGE_MARGIN == 0.5
  seen = {}
  monkeypatch.setattr(patches, "PatchStream", lambda *a, **k: seen.update(k) or "stream")
  monkeypatch.setattr(setup.feed_lib, "make_feed", lambda sampler, stream, *a, **k: stream)
  with c.unlocked():
    c.edge_margin = 0.125
  s = types.SimpleNamespace(batch_size=2, context=0)
  split = types.SimpleNamespace(train=["s"])
  assert setup._feed_2d(c, s, tmp_path, split, None, None) == "stream"
  assert seen["edge_margin"] == 0.125
