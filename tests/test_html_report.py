"""The HTML report: self-contained, complete, and rendered by a real browser (headless Chromium,
Debian's package; `.ci/run` installs it, so only a machine without it skips the render test)."""

import base64
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bonejax.data import store
from bonejax.evaluate import html_report, report
from bonejax.train import curves

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["background", "bone", "pore"]
SHAPE = (14, 20, 18)
WINDOW = (1000, 1400)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A truth scan, a prediction with a few errors, an uncertainty map, a workdir's metrics.csv,
  and the evaluate.py command that reports on them."""
  root = tmp_path_factory.mktemp("html")
  rng = np.random.default_rng(0)
  z, y, x = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
  truth = ((np.sin(z / 3) + np.cos(y / 4) + np.sin(x / 3)) > 0.5).astype(np.uint8)
  truth[(truth == 1) & (rng.random(SHAPE) < 0.1)] = 2
  image = (1000 + 1500 * (truth == 1) + rng.normal(0, 100, SHAPE)).astype(np.float32)
  store.write_scan(root / "data" / "scan_000", image, truth)
  store.write_dataset_json(root / "data", CLASSES, ["scan_000"])
  pred = truth.copy()
  pred[:, :3] = 0  # a band of errors
  workdir = root / "run"
  (workdir / "model").mkdir(parents=True)
  (workdir / "model" / "model.json").write_text(json.dumps({"model": "unet",
                                                            "classes": CLASSES}))
  log = curves.MetricsLog(workdir / "metrics.csv", CLASSES, None)
  for step in range(0, 60, 10):
    log.append({"step": step, "loss": 1 / (step + 1), "lr": 1e-3, "val_loss": 1 / (step + 2),
                "val_miou_fg": step / 60, "val_miou_all": step / 60})
  arr = store.create_array(root / "pred.zarr", SHAPE, np.uint8)
  arr.write(pred).result()
  store.set_array_attrs(root / "pred.zarr", {"model": str(workdir / "model"), "planes": 3,
                                             "vote": "soft", "classes": CLASSES})
  unc = store.create_array(root / "unc.zarr", SHAPE + (2,), np.uint8)
  unc.write(np.stack([(pred != truth) * 200, (pred != truth) * 85], -1).astype(np.uint8)).result()
  out = root / "report.json"
  cmd = [sys.executable, str(REPO / "launch" / "evaluate.py"), f"--pred={root / 'pred.zarr'}",
         f"--truth={root / 'data' / 'scan_000'}", f"--out={out}",
         f"--html={root / 'report.html'}", f"--uncertainty={root / 'unc.zarr'}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return root, json.loads(proc.stdout.strip().splitlines()[-1]), cmd


def test_report_is_self_contained_and_complete(run):
  root, result, _ = run
  page = (root / "report.html").read_text()
  assert result["html"] == str(root / "report.html")
  assert '<meta name="generator" content="bonejax' in page
  # Self-contained: no external resource of any kind, every picture inlined.
  assert not re.search(r'(src|href)="(?!data:)', page)
  images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
  # profile, training curves, and the middle slices across Z, Y and X
  assert len(images) == 5
  for b64 in images:
    assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
  for heading in ("Per class", "Confusion matrix", "Per-slice foreground IoU",
                  "Training curves", "Middle slices", "Bone measures", "Border band vs interior"):
    assert f"<h2>{heading}</h2>" in page
  # The prediction's errors are a band at Y < 3, mostly in the outer 2 voxels: border worse.
  sec = result["border_band"]
  assert sec["band_voxels"] == 2 and sec["miou_fg"]["difference"] > 0
  assert f'{sec["miou_fg"]["difference"]:+.4f}' in page
  for name in CLASSES:
    assert f"{result['iou'][name]:.4f}" in page
  assert page.count("uncertainty (entropy)") == 3 and page.count("errors (prediction") == 3


def test_rerun_needs_overwrite_and_html_is_ours(run):
  root, _, cmd = run
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 2 and "exists; pass --overwrite" in proc.stderr
  proc = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, cwd=REPO,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_voting_table_and_no_curves(tmp_path, run):
  root = run[0]
  ev = report.evaluate(root / "pred.zarr", root / "data" / "scan_000", progress=False)
  voting = [("axis 0 only", {"iou": [0.9, 0.8, 0.5], "miou_fg": 0.65}),
            ("3-plane max-probability", {"iou": [0.95, 0.9, 0.7], "miou_fg": 0.8})]
  page = html_report.render(ev, voting=voting)
  assert "<h2>Voting comparison</h2>" in page and "<b>0.8000</b>" in page
  assert "Training curves" not in page and "Middle slices" not in page


def _png_size(path: Path) -> tuple[int, int]:
  head = path.read_bytes()[:24]
  assert head[:8] == b"\x89PNG\r\n\x1a\n"
  return struct.unpack(">II", head[16:24])


def _chromium() -> str | None:
  return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_headless_chromium(run, tmp_path):
  browser = _chromium()
  if browser is None:
    pytest.skip("Debian's chromium is not installed here (.ci/run installs it with apt-get)")
  root, result, _ = run
  url = (root / "report.html").as_uri()
  flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
  shot = tmp_path / "shot.png"
  proc = subprocess.run([browser, *flags, f"--window-size={WINDOW[0]},{WINDOW[1]}",
                         f"--screenshot={shot}", url], capture_output=True, text=True,
                        timeout=180, env={**os.environ, "HOME": str(tmp_path)})
  assert shot.exists(), proc.stderr[-2000:]
  assert _png_size(shot) == WINDOW
  from PIL import Image
  pixels = np.asarray(Image.open(shot).convert("L"))
  assert pixels.std() > 10  # text and tables drawn, not a blank page
  dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True,
                       timeout=180, env={**os.environ, "HOME": str(tmp_path)}).stdout
  assert '<table id="scores">' in dom and '<table id="confusion">' in dom
  for name in CLASSES:
    assert f"{result['iou'][name]:.4f}" in dom and name in dom


def test_header_names_the_run_and_numbers_come_before_pictures(run):
  root = run[0]
  page = (root / "report.html").read_text()
  header = page[page.index('<table id="header">'):page.index("</table>")]
  for text in ("prediction", "truth", "model", "planes", "vote", "voxel size", "soft",
               str(root / "run" / "model")):
    assert text in header
  assert page.index("<h2>Bone measures</h2>") < page.index("<h2>Per-slice foreground IoU</h2>")
  assert page.index("<h2>Per class</h2>") < page.index("<h2>Middle slices</h2>")


def _largest_blob_shape(uri: str, rgb: str) -> tuple[int, int]:
  """(height, width) in pixels of the largest patch of colour `rgb` in an inlined PNG."""
  import io
  from PIL import Image
  from scipy import ndimage
  png = base64.b64decode(uri.split(",", 1)[1])
  px = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
  want = np.array([int(rgb.lstrip("#")[i:i + 2], 16) for i in (0, 2, 4)])
  blobs, n = ndimage.label(np.abs(px - want).sum(-1) < 30)
  biggest = np.argmax(np.bincount(blobs.ravel())[1:]) + 1
  ys, xs = np.nonzero(blobs == biggest)
  return np.ptp(ys) + 1, np.ptp(xs) + 1


def test_slices_keep_the_physical_aspect_of_anisotropic_voxels():
  from bonejax.io import colours
  lab = np.ones((20, 20), np.uint8)  # a Y slice: Z rows, X columns; all class 1, no image
  m = {"index": 10, "truth": lab, "pred": lab, "uncertainty": lab * 10}
  for voxel, ratio in (((8.0, 4.0, 4.0), 2.0), ((4.0, 4.0, 4.0), 1.0)):
    h, w = _largest_blob_shape(html_report._slices_png(1, m, CLASSES, voxel), colours.colour(1))
    assert h / w == pytest.approx(ratio, rel=0.05)
