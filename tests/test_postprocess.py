"""bonejax/predict/postprocess.py against a whole-volume reference, slab by slab and on disk."""

import tracemalloc

import numpy as np
import pytest
from scipy import ndimage

from bonejax.core import errors
from bonejax.data import store
from bonejax.predict import postprocess as pp

CLASSES = ["background", "bone", "pore"]


def reference(labels: np.ndarray, rule: pp.Rule, k: int) -> np.ndarray:
  """The rule on the whole volume in memory, component by component (a plain loop)."""
  out = labels.copy()
  if rule.op == "fill_holes":
    ids, n = ndimage.label(labels != rule.cls, structure=np.ones((3, 3, 3)) * 0 + pp._FACE)
    for i in range(1, n + 1):
      m = ids == i
      zz, yy, xx = np.nonzero(m)
      touches = (zz.min() == 0 or yy.min() == 0 or xx.min() == 0 or zz.max() == m.shape[0] - 1
                 or yy.max() == m.shape[1] - 1 or xx.max() == m.shape[2] - 1)
      if not touches:
        out[m] = rule.cls
    return out
  ids, n = ndimage.label(labels == rule.cls, structure=pp._FULL)
  sizes = np.bincount(ids.ravel())[1:]
  if rule.op == "min_size":
    drop = [i + 1 for i in range(n) if sizes[i] < rule.min_voxels]
  else:
    drop = [i + 1 for i in range(n) if i != int(np.argmax(sizes))]
  for i in drop:
    m = ids == i
    counts = np.zeros(k, np.int64)
    for axis in range(3):
      for shift in (1, -1):
        nb = np.roll(m, shift, axis=axis)
        # np.roll wraps: blank the wrapped plane
        edge = [slice(None)] * 3
        edge[axis] = 0 if shift == 1 else -1
        nb[tuple(edge)] = False
        sel = nb & ~m & (labels != rule.cls)
        counts += np.bincount(labels[sel], minlength=k)
    if counts.sum():
      out[m] = int(np.argmax(counts))
  return out


def random_labels(seed: int, shape=(12, 10, 11)) -> np.ndarray:
  rng = np.random.default_rng(seed)
  smooth = ndimage.gaussian_filter(rng.normal(size=shape), 1.0)
  labels = np.digitize(smooth, np.quantile(smooth, [0.35, 0.7])).astype(np.uint8)
  specks = rng.random(shape) < 0.02
  labels[specks] = rng.integers(0, 3, specks.sum())
  labels[1:4, 1:4, 1:4], labels[2, 2, 2] = 1, 0      # an enclosed hole in bone
  labels[6:9, 5:8, 6:9], labels[7, 6, 7] = 2, 1      # bone enclosed in pore
  return labels


RULES = [pp.Rule("min_size", 1, 6), pp.Rule("min_size", 2, 30), pp.Rule("largest", 1),
         pp.Rule("largest", 2), pp.Rule("fill_holes", 1), pp.Rule("fill_holes", 2)]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.describe())
@pytest.mark.parametrize("slab_bytes", [None, 1, 3], ids=["whole", "1plane", "3planes"])
def test_each_rule_matches_the_whole_volume_reference(rule, slab_bytes):
  changed = False
  for seed in range(3):
    labels = random_labels(seed)
    want = reference(labels, rule, 3)
    got = labels.copy()
    budget = 1 << 30 if slab_bytes is None else slab_bytes * 10 * 11 * pp._BYTES_PER_VOXEL
    report = pp.postprocess(got, [rule], 3, budget_bytes=budget)
    np.testing.assert_array_equal(got, want)
    assert report[0]["voxels"] == int((got != labels).sum()) or rule.op == "fill_holes"
    changed |= bool((want != labels).any())
  assert changed  # the rule did something on these volumes


def test_components_that_meet_only_diagonally_across_a_slab_face_are_one():
  labels = np.zeros((4, 5, 5), np.uint8)
  labels[1, 1, 1] = labels[2, 2, 2] = 1  # 26-connected through a corner, across z=1|2
  labels[3, 4, 4] = 1                    # a separate voxel
  for planes in (1, 2, 4):
    got = labels.copy()
    pp.postprocess(got, [pp.Rule("min_size", 1, 2)], 3,
                   budget_bytes=planes * 25 * pp._BYTES_PER_VOXEL)
    assert got[1, 1, 1] == got[2, 2, 2] == 1 and got[3, 4, 4] == 0


def test_a_hole_is_filled_and_a_pore_open_to_the_face_is_not():
  labels = np.ones((7, 7, 7), np.uint8)
  labels[3, 3, 3] = 2          # enclosed pore
  labels[3, 0:2, 3] = 2        # pore open to the Y face
  pp.postprocess(labels, [pp.Rule("fill_holes", 1)], 3, budget_bytes=2 * 49 * pp._BYTES_PER_VOXEL)
  assert labels[3, 3, 3] == 1 and (labels[3, 0:2, 3] == 2).all()


def test_on_disk_out_of_core_equals_in_memory_and_stays_near_its_budget(tmp_path):
  labels = random_labels(7, shape=(40, 32, 32))
  rules = [pp.Rule("min_size", 2, 20), pp.Rule("fill_holes", 1), pp.Rule("largest", 1)]
  want = labels.copy()
  pp.postprocess(want, rules, 3)
  arr = store.create_array(tmp_path / "labels", labels.shape, np.uint8, chunks=(8, 32, 32))
  arr.write(labels).result()
  out = store.create_array(tmp_path / "clean", labels.shape, np.uint8, chunks=(8, 32, 32))
  budget = 4 * 32 * 32 * pp._BYTES_PER_VOXEL  # 4 planes of a 40-plane volume
  tracemalloc.start()
  pp.postprocess(arr, rules, 3, out=out, budget_bytes=budget)
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  np.testing.assert_array_equal(out.read().result(), want)
  np.testing.assert_array_equal(arr.read().result(), labels)  # the input is never changed
  volume_work = labels.size * pp._BYTES_PER_VOXEL
  assert peak < volume_work / 2, (peak, volume_work)


def test_rules_parse_names_numbers_and_volumes():
  rules = pp.parse_rules("bone:min_size=500, pore:fill_holes,1:largest,bone:min_size=8um3",
                         CLASSES, voxel_size_um=(2.0, 1.0, 1.0))
  assert rules == [pp.Rule("min_size", 1, 500), pp.Rule("fill_holes", 2),
                   pp.Rule("largest", 1), pp.Rule("min_size", 1, 4)]


@pytest.mark.parametrize("text,match", [
    ("bone", "is not CLASS:OP"), ("bone:erode", "unknown operation"),
    ("marrow:largest", "unknown class 'marrow'"), ("5:largest", "not below the 3 classes"),
    ("bone:min_size", "needs a size"), ("bone:largest=3", "takes no size"),
    ("background:fill_holes", "background"), ("", "no rule")])
def test_bad_rules_are_one_line_errors(text, match):
  with pytest.raises(errors.UserError, match=match):
    pp.parse_rules(text, CLASSES)


def test_a_volume_size_needs_a_voxel_size():
  with pytest.raises(errors.UserError, match="voxel size"):
    pp.parse_rules("bone:min_size=10um3", CLASSES, voxel_size_um=(0.0, 1.0, 1.0))


def test_predict_cli_applies_the_rules_and_records_them(tmp_path):
  """launch/predict.py --postprocess equals predicting, then post-processing in memory."""
  import json
  import os
  import subprocess
  import sys
  from pathlib import Path
  from bundle_helpers import make_bundle, phantom
  repo = Path(__file__).resolve().parents[1]
  make_bundle(tmp_path / "model", depth=1, width=2)
  np.save(tmp_path / "vol.npy", phantom((12, 20, 18), seed=3))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(repo))

  def run(out, *extra):
    r = subprocess.run([sys.executable, str(repo / "launch/predict.py"),
                        f"--model={tmp_path / 'model'}", f"--input={tmp_path / 'vol.npy'}",
                        f"--output={out}", "--planes=1", *extra], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])

  run(tmp_path / "plain.zarr")
  rules = "1:min_size=20,1:fill_holes"
  res = run(tmp_path / "clean.zarr", f"--postprocess={rules}")
  plain = store.open_array(tmp_path / "plain.zarr").read().result()
  want = plain.copy()
  pp.postprocess(want, pp.parse_rules(rules, list(res["classes"])), len(res["classes"]))
  got = store.open_array(tmp_path / "clean.zarr").read().result()
  np.testing.assert_array_equal(got, want)
  assert [r["rule"] for r in res["postprocess"]] == ["1:min_size=20", "1:fill_holes"]
  assert store.array_attrs(tmp_path / "clean.zarr")["postprocess"] == res["postprocess"]
