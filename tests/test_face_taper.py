"""The face taper of the soft vote: weights against a voxel loop, streaming against in-memory."""

import numpy as np
import pytest

from bonejax import predict
from bonejax.core import errors
from bonejax.io import resample as resample_lib
from bonejax.predict import api
from bonejax.predict.planesets import PlaneSet
from bonejax.predict.volumes import SlabVolume

from test_predict import SHAPE, TinyNet, face_weight_reference  # noqa: F401  (fixtures below)
from test_predict import engine, model, stats, volume  # noqa: F401

SMALL = (6, 9, 7)


@pytest.mark.parametrize("taper", [1, 3, 8])
@pytest.mark.parametrize("set_axis", [0, 1, 2])
def test_weights_equal_the_voxel_loop_in_every_slab_layout(set_axis, taper):
  ps = PlaneSet(set_axis)
  ref = face_weight_reference(SMALL, ps, taper)
  whole = predict.face_weights(SMALL, ps, taper)
  np.testing.assert_allclose(np.broadcast_to(whole[..., 0], SMALL), ref, rtol=1e-7)
  assert ref.min() == pytest.approx(1 / taper if taper > 1 else 1.0)
  for axis in range(3):  # laid out as SlabVolume.read lays out the planes of a slab
    s0, s1 = 1, SMALL[axis] - 1
    got = predict.face_weights(SMALL, ps, taper, axis, s0, s1)
    want = SlabVolume(ref).read(axis, s0, s1)
    np.testing.assert_allclose(np.broadcast_to(got[..., 0], want.shape), want, rtol=1e-7)


def test_rotated_sets_and_taper_zero_weigh_one():
  assert predict.face_weights(SMALL, PlaneSet(1, rot45=0), 4) == 1.0
  assert predict.face_weights(SMALL, PlaneSet(1), 0) == 1.0
  assert predict.face_weights(SMALL, None, 4) == 1.0


def test_the_set_parallel_to_a_face_outvotes_the_sets_that_cut_it():
  # At z = 0 the axial set (planes parallel to the face) says class 1; the two sets whose
  # planes cut the face say class 0, more confidently: the plain mean follows them, the
  # tapered vote the axial set. Deep inside, all three weigh the same.
  shape = (9, 9, 9)
  sets = predict.plane_sets(3)
  axial = np.broadcast_to(np.array([0.1, 0.9], np.float32), shape + (2,)).copy()
  cut = np.broadcast_to(np.array([0.7, 0.3], np.float32), shape + (2,)).copy()
  plain, _ = predict.fuse([axial, cut, cut], "soft")
  tapered, mean = predict.fuse([axial, cut, cut], "soft", sets, 4)
  assert plain[0, 4, 4] == 0 and tapered[0, 4, 4] == 1
  assert tapered[4, 4, 4] == plain[4, 4, 4] == 0
  np.testing.assert_allclose(mean.sum(-1), 1.0, rtol=1e-6)  # still probabilities
  # (0.9 + 2 * 0.25 * 0.3) / (1 + 2 * 0.25) at the middle of the z = 0 face.
  assert mean[0, 4, 4, 1] == pytest.approx((0.9 + 0.15) / 1.5)


def test_taper_zero_is_the_plain_mean_bit_for_bit(engine, volume, stats):  # noqa: F811
  per = predict.predict_planes(engine, volume, stats=stats, planes=3)
  labels, probs = predict.predict_volume(engine, volume, stats=stats, planes=3,
                                         return_probs=True, face_taper=0)
  ref_labels, ref_mean = predict.fuse(per, "soft")
  np.testing.assert_array_equal(labels, ref_labels)
  np.testing.assert_array_equal(probs, ref_mean)


@pytest.mark.parametrize("planes,ooc", [(3, True), (12, False), (9, True)],
                         ids=["3-out_of_core", "12-memory", "9-out_of_core"])
def test_streaming_vote_equals_the_in_memory_fuse(engine, volume, stats, planes,  # noqa: F811
                                                   ooc, tmp_path):
  sets = predict.plane_sets(planes)
  per = predict.predict_planes(engine, volume, stats=stats, sets=sets)
  ref_labels, ref_mean = predict.fuse(per, "soft", sets, 5)
  labels, probs = predict.predict_volume(engine, volume, stats=stats, planes=planes,
                                         return_probs=True, face_taper=5, out_of_core=ooc,
                                         scratch_dir=tmp_path)
  np.testing.assert_allclose(probs, ref_mean, atol=2e-6)
  top2 = np.sort(ref_mean, axis=-1)
  clear = top2[..., -1] - top2[..., -2] > 1e-5
  assert (labels == ref_labels)[clear].all()


def test_regridded_votes_are_weighted_on_the_input_grid(engine, volume, stats):  # noqa: F811
  # An identity regrid goes through the regrid sink (sets staged, then added slab by slab
  # along Z): the same weights, so the same labels and probabilities as without it.
  sets = predict.plane_sets(3)
  vol = api.as_volume(volume)
  engine.set_normalization(stats, "percentile")
  kw = dict(budget_bytes=1 << 30, out_of_core=False, scratch_dir=None, keep_probs=True,
            face_taper=4)
  direct = api.run_prediction(engine, vol, sets, "soft", **kw)
  staged = api.run_prediction(engine, vol, sets, "soft",
                              regrid=resample_lib.Regrid(SHAPE, SHAPE), **kw)
  np.testing.assert_allclose(staged.probs, direct.probs, atol=1e-6)
  assert staged.info["face_taper"] == 4


def test_bad_taper_is_one_error(engine, volume, stats):  # noqa: F811
  with pytest.raises(errors.UserError, match="face_taper"):
    predict.predict_volume(engine, volume, stats=stats, face_taper=-1)
  with pytest.raises(errors.UserError, match="face_taper"):
    predict.Predictor(TinyNet.__new__(TinyNet), face_taper="wide")


def test_the_benchmarks_summary_counts_gaps_and_their_standard_error():
  import sys
  from pathlib import Path
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  from benchmarks import face_taper
  gaps = [0.02, -0.02, 0.005, 0.0]
  rows = [{"run": f"demo seed {i}", "fusion": "f", "miou_fg": 0.9, "border": 0.9 - g,
           "interior": 0.9, "gap": g} for i, g in enumerate(gaps)]
  rows.append({"run": "extra", "fusion": "f", "miou_fg": 0.5, "border": 0.0, "interior": 0.5,
               "gap": 0.5})  # not a demo seed: not in the means
  (s,) = face_taper.summary(rows, [f"demo seed {i}" for i in range(4)])
  assert s["runs"] == 4 and s["gap"] == pytest.approx(np.mean(gaps))
  assert s["gap_se"] == pytest.approx(np.std(gaps, ddof=1) / 2)
  assert s["worst_gap"] == 0.02 and s["runs_gap_le_0.01"] == 3 and s["runs_abs_gap_le_0.01"] == 2
