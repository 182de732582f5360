"""Pluggable evaluators, the TensorBoard writer and the profiler hook of the trainer.

- The volume evaluator's score is what predict.py's pipeline gives: the best bundle (exported
  from the step the volume metric chose) predicted whole with 3 plane sets and soft voting by
  the public `predict_volume`, scored on the pooled confusion matrix, gives the recorded score.
- The event files parse as TensorBoard's Event protocol buffers (decoded here with protobuf's
  own runtime from a descriptor written from tensorflow/core/util/event.proto, not by the
  encoder under test), framed with valid masked CRC-32C checksums.
- Bad evaluator configs are one line naming the field; the one mirror rule matches numpy's
  'reflect' padding for numpy and jax inputs.

Trains the smoke config (U-Net depth 2 width 4, 32-px patches) for 3 steps on 3 phantom scans.
"""

import struct

import jax.numpy as jnp
import numpy as np
import pytest

from bonejax import predict
from bonejax.core import errors
from bonejax.data import context, store
from bonejax.evaluate import metrics
from bonejax.models import bundle
from bonejax.train import tensorboard, trainer
from train_helpers import smoke_config


@pytest.fixture(scope="module")
def volume_run(tiny_dataset, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("volume") / "run"
  c = smoke_config(tiny_dataset, num_steps=3, eval_every=1, checkpoint_every=0,
                   best_metric="volume/miou_fg", profile_steps="1:2")
  c.evaluators.volume = dict(type="volume", every_steps=2, planes=3, vote="soft")
  return trainer.train(c, workdir), workdir


def test_the_volume_score_is_the_predicted_bundles(volume_run, tiny_dataset):
  result, workdir = volume_run
  assert result["best_metric"] == "volume/miou_fg" and result["best_step"] in (2, 3)
  b = bundle.load_bundle(workdir / "model")
  assert b.meta["train_step"] == result["best_step"]
  dataset = store.open_dataset(tiny_dataset)
  k = len(b.classes)
  cm = np.zeros((k, k), np.int64)
  for name in result["split"]["val"]:
    scan = dataset.open_scan(name)
    labels = predict.predict_volume(b, scan, stats=scan.stats, rule=b.normalization, planes=3,
                                    vote="soft")
    cm += metrics.confusion_matrix(labels, scan.read_labels(), k)
  want = metrics.scores(cm, b.classes)
  assert result["best_val"]["miou_fg"] == pytest.approx(want["miou_fg"], abs=1e-9)
  assert result["best_val"]["iou"] == pytest.approx(want["iou"], abs=1e-9)


def test_metrics_csv_has_both_evaluators(volume_run):
  _, workdir = volume_run
  rows = (workdir / "metrics.csv").read_text().splitlines()
  header = rows[0].split(",")
  assert {"val_loss", "val_miou_fg", "volume_miou_fg", "volume_iou_bone", "step_ms",
          "data_ms"} <= set(header)
  by_step = {r.split(",")[0]: dict(zip(header, r.split(","))) for r in rows[1:]}
  assert by_step["1"]["val_miou_fg"] and not by_step["1"]["volume_miou_fg"]  # every 2 steps
  assert by_step["2"]["volume_miou_fg"] and by_step["3"]["volume_miou_fg"]  # and at the end


def test_a_profile_of_the_requested_steps(volume_run):
  _, workdir = volume_run
  traces = list((workdir / "profile").rglob("*.xplane.pb"))
  assert traces and all(t.stat().st_size > 0 for t in traces)


def _event_class():
  """tensorflow.Event, from a descriptor (the fields scalars use), via protobuf's runtime."""
  from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
  f = descriptor_pb2.FileDescriptorProto(name="event_test.proto", package="tft",
                                         syntax="proto3")
  T = descriptor_pb2.FieldDescriptorProto
  value = f.message_type.add(name="Value")
  value.field.add(name="tag", number=1, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL)
  value.field.add(name="simple_value", number=2, type=T.TYPE_FLOAT, label=T.LABEL_OPTIONAL)
  summary = f.message_type.add(name="Summary")
  summary.field.add(name="value", number=1, type=T.TYPE_MESSAGE, type_name=".tft.Value",
                    label=T.LABEL_REPEATED)
  session = f.message_type.add(name="SessionLog")
  session.field.add(name="status", number=1, type=T.TYPE_INT32, label=T.LABEL_OPTIONAL)
  event = f.message_type.add(name="Event")
  event.field.add(name="wall_time", number=1, type=T.TYPE_DOUBLE, label=T.LABEL_OPTIONAL)
  event.field.add(name="step", number=2, type=T.TYPE_INT64, label=T.LABEL_OPTIONAL)
  event.field.add(name="file_version", number=3, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL)
  event.field.add(name="summary", number=5, type=T.TYPE_MESSAGE, type_name=".tft.Summary",
                  label=T.LABEL_OPTIONAL)
  event.field.add(name="session_log", number=7, type=T.TYPE_MESSAGE,
                  type_name=".tft.SessionLog", label=T.LABEL_OPTIONAL)
  pool = descriptor_pool.DescriptorPool()
  pool.Add(f)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("tft.Event"))


def _records(path):
  data, out, i = path.read_bytes(), [], 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    assert struct.unpack("<I", data[i + 8:i + 12])[0] == tensorboard._masked(data[i:i + 8])
    body = data[i + 12:i + 12 + n]
    assert struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] == tensorboard._masked(body)
    out.append(body)
    i += 16 + n
  return out


def test_crc32c_known_value():
  assert tensorboard.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
  assert tensorboard.crc32c(b"") == 0


def test_event_files_parse_as_tensorboard_events(volume_run, tmp_path):
  _, workdir = volume_run
  (path,) = (workdir / "tensorboard").iterdir()
  Event = _event_class()
  events = [Event.FromString(r) for r in _records(path)]
  assert events[0].file_version == "brain.Event:2"
  scalars = {(e.step, v.tag): v.simple_value for e in events for v in e.summary.value}
  assert {1, 2, 3} <= {s for s, _ in scalars}
  rows = (workdir / "metrics.csv").read_text().splitlines()
  header = rows[0].split(",")
  for r in rows[1:]:
    row = dict(zip(header, r.split(",")))
    for tag in ("loss", "val_miou_fg", "volume_miou_fg"):
      if row[tag]:
        assert scalars[(int(row["step"]), tag)] == pytest.approx(float(row[tag]), rel=1e-5)
  # A resumed writer starts with a SessionLog START at its step (TensorBoard drops the
  # earlier file's later points); negative and large steps encode as protobuf varints.
  w = tensorboard.Writer(tmp_path / "tb", resume_step=7)
  w.scalars(2**40, {"a": 1.5, "nan": float("nan"), "text": "x"})
  got = [Event.FromString(r) for r in _records(w.path)]
  assert got[1].step == 7 and got[1].session_log.status == 1
  assert got[2].step == 2**40 and [(v.tag, v.simple_value) for v in got[2].summary.value] == [
      ("a", 1.5)]
  assert Event.FromString(tensorboard.event(-3, 0.0)).step == -3


@pytest.mark.parametrize("setting, message", [
    ({"best_metric": "volume/miou_fg"}, r"best_metric='volume/miou_fg'; known: val/loss"),
    ({"evaluators.val.type": "nope"}, r"evaluator type 'nope'; known: planes, volume"),
    ({"evaluators.val.every_steps": -1}, r"config.evaluators.val.every_steps=-1 must be"),
    ({"evaluators.val.colour": 1}, r"config.evaluators.val has unknown field\(s\) colour"),
    ({"profile_steps": "5"}, r"config.profile_steps='5' must be 'A:B'"),
    ({"profile_steps": "4:2"}, r"config.profile_steps='4:2' must be 'A:B'"),
])
def test_bad_evaluator_settings_are_one_line(tiny_dataset, tmp_path, setting, message):
  c = smoke_config(tiny_dataset, num_steps=1)
  for key, value in setting.items():
    node, *rest = key.split(".")
    if rest:
      c.evaluators[rest[0]][rest[1]] = value
    else:
      c[node] = value
  with pytest.raises(errors.UserError, match=message):
    trainer.train(c, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_one_mirror_rule_for_numpy_and_jax():
  idx = np.arange(-23, 31)
  for n in (1, 2, 3, 8):
    want = np.pad(np.arange(n), 40, mode="reflect")[idx + 40] if n > 1 else np.zeros_like(idx)
    np.testing.assert_array_equal(context.reflect_index(idx, n), want)
    np.testing.assert_array_equal(np.asarray(context.reflect_index(jnp.asarray(idx), n, jnp)),
                                  want)
    per_crop = jnp.full(idx.shape, n, jnp.int32)  # the device sampler's per-crop n
    np.testing.assert_array_equal(
        np.asarray(context.reflect_index(jnp.asarray(idx), per_crop, jnp)), want)
