"""A 3D model end to end through the ordinary commands: make_phantom -> train -> predict ->
evaluate. The trainer's 3D hook (models.spatial_dims == 3) and the predictor's 3D windows."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _launch(script, *args):
  r = subprocess.run([sys.executable, str(REPO / "launch" / script), *map(str, args)],
                     capture_output=True, text=True, timeout=300, cwd=REPO)
  assert r.returncode == 0, r.stderr[-3000:]
  return r


def _json_line(stdout):
  return json.loads(stdout.strip().splitlines()[-1])


def test_3d_train_predict_evaluate(tmp_path):
  from bonejax.data import store
  from bonejax.models import bundle
  from bonejax.predict import predict_volume_3d

  data, work = tmp_path / "data", tmp_path / "run"
  _launch("make_phantom.py", f"--out={data}", "--num_scans=3", "--shape=32,32,32")
  r = _launch("train.py", f"--config={REPO / 'configs/unet3d.py'}:smoke", f"--workdir={work}",
              f"--config.dataset={data}", "--config.num_steps=2", "--config.eval_every=2",
              "--config.checkpoint_every=2", "--config.log_every=1")
  trained = _json_line(r.stdout)
  assert trained["steps"] == 2 and trained["model"] == "unet3d"
  assert np.isfinite(trained["final_val"]["loss"])
  meta = json.loads((work / "model" / "model.json").read_text())
  assert meta["patch_size_zyx"] == [16, 16, 16] and meta["predict_window"] == 16

  scan_name = trained["split"]["val"][0]
  out = tmp_path / "pred.zarr"
  r = _launch("predict.py", f"--model={work / 'model'}", f"--input={data / scan_name}",
              f"--output={out}")
  res = _json_line(r.stdout)
  assert res["mode"] == "3d_windows" and res["window"] == [16, 16, 16]
  assert res["windows"] == 27 and res["shape"] == [32, 32, 32]  # 3 starts per axis at 0.5

  scan = store.open_dataset(data).open_scan(scan_name)
  written = np.asarray(store.open_array(out).read().result())
  assert written.shape == scan.shape[:3] and written.dtype == np.uint8
  assert written.max() < len(meta["classes"])
  # The command's labels are the in-memory function's on the same bundle and scan.
  b = bundle.load_bundle(work / "model")
  mine = predict_volume_3d(b, scan.image, stats=scan.stats, window=16, overlap=0.5,
                           batch_size=2).labels
  np.testing.assert_array_equal(written, mine)

  # Plane sets and votes do not apply to a 3D model: refused with one line, before any work.
  from bonejax import predict
  from bonejax.core import errors
  try:
    predict.Predictor(work / "model", planes=1, axis=0)
    raise AssertionError("planes=1 accepted for a 3D model")
  except errors.UserError as e:
    assert "3D" in str(e) and "\n" not in str(e)

  report = tmp_path / "report.json"
  r = _launch("evaluate.py", f"--pred={out}", f"--truth={data / scan_name}", f"--out={report}")
  ev = _json_line(r.stdout)
  for key in ("miou_all", "miou_fg"):
    assert isinstance(ev[key], float) and 0.0 <= ev[key] <= 1.0
  assert json.loads(report.read_text())["miou_fg"] == ev["miou_fg"]
  # The scores are those of the written labels against the scan's own.
  truth = np.asarray(scan.read_labels())
  k = len(meta["classes"])
  inter = [np.sum((written == c) & (truth == c)) for c in range(k)]
  union = [np.sum((written == c) | (truth == c)) for c in range(k)]
  iou = [i / u for i, u in zip(inter, union) if u]
  assert np.isclose(ev["miou_all"], np.mean(iou), atol=1e-6)
