"""Hostile inputs to the import side (issue 26 items 2, 5, 6, 8, 9): sizes claimed by flags or
headers are refused before allocation, damaged headers are named, outputs never land inside
inputs, and a failed or terminated import leaves nothing behind.

Memory bombs run in a subprocess under RLIMIT_AS, so a check that fails cannot take the
machine down: it ends in a MemoryError (exit 3) there, and the test fails.
"""

import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
import tifffile

from bonejax.core import errors, memory_plan, placement
from bonejax.data import importer, store
from bonejax.io import registry, resample

REPO = Path(__file__).resolve().parents[1]
AS_LIMIT = 3 << 29  # 1.5 GiB of address space: an import needs about 1 GiB


def _limited(as_bytes=None, fsize=None):
  def set_limits():
    if as_bytes is not None:
      resource.setrlimit(resource.RLIMIT_AS, (as_bytes, as_bytes))
    if fsize is not None:
      # The write fails with EFBIG (as on a full disk) instead of the process being killed.
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
      resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
  return set_limits


def _run(script, *args, as_bytes=AS_LIMIT, fsize=None, timeout=120):
  env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
  return subprocess.run([sys.executable, str(REPO / "launch" / script), *map(str, args)],
                        capture_output=True, text=True, cwd=REPO, timeout=timeout, env=env,
                        preexec_fn=_limited(as_bytes, fsize))


def _one_error(r, code=2):
  """The stderr's error line, checked to be the only one, with exit `code`."""
  lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert r.returncode == code, (r.returncode, r.stderr[-2000:])
  assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
  return lines[0]


def _listing(d):
  return sorted(os.listdir(d)) if os.path.isdir(d) else None


# ---------------------------------------------------------------------------------------------
# Memory: sizes from flags and headers are checked before allocation.
# ---------------------------------------------------------------------------------------------


def test_memory_plan_names_value_and_bytes():
  with pytest.raises(errors.UserError, match=r"--x=3: this needs 2\.0 GiB of memory, but "
                                             r"--memory_budget_gb=1 allows 1\.0 GiB"):
    memory_plan.require_fits("--x=3: this", 2 << 30, budget_gb=1)
  assert memory_plan.require_fits("small", 1 << 20, budget_gb=1) == 1 << 30
  with pytest.raises(errors.UserError, match="--memory_budget_gb=0 must be positive"):
    memory_plan.require_fits("x", 1, budget_gb=0)
  avail, why = memory_plan.available_bytes()
  assert avail is None or avail > 0, why
  assert memory_plan.largest_fitting(10, 5, 64, 45) == 4
  assert memory_plan.largest_fitting(10, 5, 64, 14) == 0
  assert memory_plan.largest_fitting(10, 5, 64, None) == 64
  assert memory_plan.format_bytes(1536) == "1.5 KiB"


def test_address_space_limit_counts():
  code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (1 << 34, 1 << 34)); "
          "from bonejax.core import memory_plan; n, why = memory_plan.available_bytes(); "
          "print(n, why)")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                     timeout=60)
  n, why = r.stdout.split(" ", 1)
  assert int(n) <= 1 << 34
  # The smaller of the machine's memory and the limit; the limit's words when it is the smaller.
  assert "address-space" in why or int(n) < 1 << 34


def test_resample_bomb_refused_before_allocation(tmp_path):
  np.save(tmp_path / "v.npy", np.zeros((8, 16, 16), np.uint8))
  out = tmp_path / "data"
  r = _run("import_volume.py", f"--image={tmp_path / 'v.npy'}", f"--out={out}", "--scan=s",
           "--voxel_size_um=1", "--resample_um=0.0001")
  line = _one_error(r)
  assert "--resample_um=0.0001" in line and "(80000, 160000, 160000)" in line
  assert "needs" in line and "GiB" in line
  assert not out.exists()


def test_resample_slabs_shrink_to_the_budget(tmp_path):
  """A budget too small for the asked slab still imports (fewer slices per slab), the same
  voxels as with the full slab."""
  rng = np.random.default_rng(0)
  np.save(tmp_path / "v.npy", rng.integers(0, 255, (6, 20, 24), dtype=np.uint8))
  a = importer.import_volume(tmp_path / "v.npy", tmp_path / "a", "s", voxel_size_um=1.0,
                             resample_um=0.5, slab=64, progress_every_s=1e9)
  src = registry.open_volume(tmp_path / "v.npy")
  src.voxel_size_um = (1.0, 1.0, 1.0)
  fixed, per = importer.slab_cost(resample.ResampledSource(src, 0.5, order=1))
  budget_gb = (importer.STATS_BYTES + fixed + 3 * per) / 2**30  # three slices, not 64
  assert importer.plan_slab(resample.ResampledSource(src, 0.5, order=1), None, 64,
                            budget_gb) == 3
  b = importer.import_volume(tmp_path / "v.npy", tmp_path / "b", "s", voxel_size_um=1.0,
                             resample_um=0.5, slab=64, progress_every_s=1e9,
                             memory_budget_gb=budget_gb)
  assert a["shape"] == b["shape"] == [12, 40, 48]
  np.testing.assert_array_equal(store.open_scan(tmp_path / "a" / "s").read_image(),
                                store.open_scan(tmp_path / "b" / "s").read_image())


def _huge_zarr(path, side=100000):
  """A zarr v3 array whose metadata claims side^3 voxels; no chunk is stored."""
  ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)},
           "metadata": {"shape": [side] * 3, "data_type": "uint8",
                        "chunk_grid": {"name": "regular",
                                       "configuration": {"chunk_shape": [64] * 3}}},
           "create": True}).result()


def test_zarr_claiming_huge_shape_refused(tmp_path):
  _huge_zarr(tmp_path / "huge.zarr")
  out = tmp_path / "data"
  r = _run("import_volume.py", f"--image={tmp_path / 'huge.zarr'}", f"--out={out}",
           "--scan=s", "--memory_budget_gb=1")
  line = _one_error(r)
  assert "(100000, 100000, 100000)" in line and "--memory_budget_gb=1 allows 1.0 GiB" in line
  assert not out.exists()
  # Without a budget: the machine's memory (here the test's address-space limit) bounds it.
  r = _run("import_volume.py", f"--image={tmp_path / 'huge.zarr'}", f"--out={out}", "--scan=s")
  assert "(100000, 100000, 100000)" in _one_error(r)
  assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Damaged headers are named.
# ---------------------------------------------------------------------------------------------


def _imagej_tiff(path, n_pages, description):
  data = np.arange(n_pages * 16 * 16, dtype=np.uint8).reshape(n_pages, 16, 16)
  tifffile.imwrite(path, data, description=description, metadata=None, compression="zlib")


def test_imagej_tiff_claiming_2e9_images(tmp_path):
  path = tmp_path / "claims.tif"
  _imagej_tiff(path, 1, "ImageJ=1.11a\nimages=2000000000\nslices=2000000000\n")
  with pytest.raises(errors.UserError, match=r"claims.tif' claims 2,000,000,000 images"):
    registry.open_volume(path)
  out = tmp_path / "data"
  r = _run("import_volume.py", f"--image={path}", f"--out={out}", "--scan=s")
  assert str(path) in _one_error(r)
  assert not out.exists()


def test_tiff_incompatible_keyframe_named(tmp_path):
  """Pages of different strip layouts: tifffile raises RuntimeError('incompatible keyframe')."""
  path = tmp_path / "mixed.tif"
  data = np.arange(4 * 16 * 16, dtype=np.uint8).reshape(4, 16, 16)
  with tifffile.TiffWriter(path) as tw:
    tw.write(data[0], description="ImageJ=1.11a\nimages=4\nslices=4\n", metadata=None,
             contiguous=False)
    for page in data[1:]:
      tw.write(page, metadata=None, rowsperstrip=4, contiguous=False)
  with pytest.raises(errors.UserError, match=r"cannot read TIFF '.*mixed.tif': damaged file "
                                             r"\(RuntimeError: incompatible keyframe\)"):
    registry.open_volume(path)


def _mrc(path, dims):
  import mrcfile
  with mrcfile.new(path, overwrite=True) as m:
    m.set_data(np.zeros((4, 16, 16), np.float32))
  raw = bytearray(path.read_bytes())
  raw[0:12] = struct.pack("<3i", *dims)  # nx, ny, nz
  path.write_bytes(bytes(raw))


@pytest.mark.parametrize("dims, words", [
    ((16, 16, -4), r"\(Z, Y, X\) = \(-4, 16, 16\); they must be positive"),
    ((100000, 100000, 100000), r"\(Z, Y, X\) = \(100000, 100000, 100000\), "
                               r"4,000,000,000,000,000 bytes of float32 data, but the file "
                               r"holds 4,096"),
])
def test_mrc_absurd_dimensions_named(tmp_path, dims, words):
  path = tmp_path / "bad.mrc"
  _mrc(path, dims)
  with pytest.raises(errors.UserError, match=words):
    registry.open_volume(path)


def test_mrc_still_reads(tmp_path):
  path = tmp_path / "ok.mrc"
  _mrc(path, (16, 16, 4))
  with registry.open_volume(path) as src:
    assert src.shape == (4, 16, 16)


# ---------------------------------------------------------------------------------------------
# No output inside an input.
# ---------------------------------------------------------------------------------------------


def test_refuse_inside(tmp_path):
  scan = tmp_path / "DATA" / "s"
  store.write_scan(scan, np.zeros((4, 8, 8), np.uint8))
  (tmp_path / "bundle").mkdir()
  (tmp_path / "bundle" / "model.json").write_text("{}")
  for out, inputs, words in [
      (tmp_path / "in", [tmp_path / "in"], "is the input"),
      (tmp_path / "in" / "x", [tmp_path / "in"], "lies inside the input"),
      (scan / "r.json", [], "lies inside the scan"),
      (scan / "image" / "x", [], "lies inside the zarr node"),
      (tmp_path / "bundle" / "weights" / "x.pth", [], "lies inside the model bundle")]:
    with pytest.raises(errors.UserError, match=words):
      placement.refuse_inside(out, inputs, "--out")
  placement.refuse_inside(tmp_path / "DATA" / "t", [scan], "--out")  # beside it: fine
  placement.refuse_inside(tmp_path / "DATA", [scan], "--out")  # a dataset holding the input


def test_import_out_equal_to_image_folder(tmp_path):
  folder = tmp_path / "slices"
  folder.mkdir()
  for i in range(3):
    tifffile.imwrite(folder / f"s{i}.tif", np.zeros((8, 8), np.uint8))
  before = _listing(folder)
  with pytest.raises(errors.UserError, match="--out .*slices' is the input"):
    importer.import_volume(folder, folder, "s")
  assert _listing(folder) == before


def test_evaluate_and_phantom_refuse_outputs_inside_a_scan(tmp_path):
  scan = tmp_path / "DATA" / "s"
  store.write_scan(scan, np.zeros((4, 8, 8), np.uint8), np.zeros((4, 8, 8), np.uint8))
  before = _listing(scan)
  r = _run("evaluate.py", f"--pred={scan}", f"--truth={scan}", f"--out={scan / 'r.json'}",
           as_bytes=None)
  assert "lies inside the input" in _one_error(r)
  r = _run("make_phantom.py", f"--out={scan / 'ph'}", "--num_scans=1", "--shape=32,32,32",
           as_bytes=None)
  assert "lies inside the scan" in _one_error(r)
  assert _listing(scan) == before  # not even a lock file came and went


# ---------------------------------------------------------------------------------------------
# Failed and terminated imports leave nothing; missing chunks are said.
# ---------------------------------------------------------------------------------------------


class _Future:
  def __init__(self, log, name, error=None):
    self.log, self.name, self.error = log, name, error

  def result(self):
    self.log.append(self.name)
    if self.error:
      raise self.error


def test_wait_finishes_every_write_before_raising():
  log = []
  with pytest.raises(OSError, match="disk full"):
    importer._wait([_Future(log, "image", OSError("disk full")), _Future(log, "labels")])
  assert log == ["image", "labels"]
  log.clear()
  importer._settle([[_Future(log, "a", ValueError("x"))], [_Future(log, "b")]])
  assert log == ["a", "b"]


def _slabs(tmp_path, depth=96):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (depth, 64, 64), dtype=np.uint8)
  labels = rng.integers(0, 3, image.shape, dtype=np.uint8)
  np.save(tmp_path / "image.npy", image)
  np.save(tmp_path / "labels.npy", labels)
  return tmp_path / "image.npy", tmp_path / "labels.npy"


def test_failed_writes_leave_no_temporary(tmp_path):
  """Chunk files over 2 KB fail to write (as on a full disk): every other chunk is noise (fails),
  the rest constant (written), so a failed slab write still has chunks in flight when its
  future reports the error. Before the fix, about one such import in three left its
  temporary behind (2 of 6 runs on this input)."""
  rng = np.random.default_rng(0)
  image = np.full((64, 128, 128), 7, np.uint8)
  for z in range(16, 64, 16):
    for y in range(0, 128, 16):
      for x in range(16 * (z // 16 % 2), 128, 32):
        image[z:z + 16, y:y + 16, x:x + 16] = rng.integers(0, 255, (16,) * 3, dtype=np.uint8)
  np.save(tmp_path / "image.npy", image)
  np.save(tmp_path / "labels.npy", image % 3)
  out = tmp_path / "data"
  out.mkdir()
  for _ in range(3):
    r = _run("import_volume.py", f"--image={tmp_path / 'image.npy'}",
             f"--labels={tmp_path / 'labels.npy'}", f"--out={out}", "--scan=s",
             "--chunks=16,16,16", "--slab=32", as_bytes=None, fsize=2000)
    assert "File too large" in _one_error(r) or "file too large" in _one_error(r)
    assert _listing(out) == []


def test_sigterm_during_import_leaves_nothing(tmp_path):
  image, labels = _slabs(tmp_path, depth=512)
  out = tmp_path / "data"
  out.mkdir()
  proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "import_volume.py"),
                           f"--image={image}", f"--labels={labels}", f"--out={out}", "--scan=s",
                           "--chunks=16,16,16", "--slab=4"],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 60
  while not any(".tmp-" in n for n in os.listdir(out)) and proc.poll() is None:
    assert time.monotonic() < deadline
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=60)
  if proc.returncode == 0:
    pytest.fail("the import finished before SIGTERM reached it: make the test volume larger")
  assert proc.returncode == 143, stderr[-2000:]
  assert stderr.strip().splitlines()[-1] == "error: terminated"
  assert "Traceback" not in stderr and stdout == ""
  assert _listing(out) == []


def test_missing_chunk_warned_by_every_reader(tmp_path, capsys):
  """open_volume (what predict reads scans with) warns about a deleted chunk, as import,
  evaluate and training do."""
  scan = tmp_path / "s"
  rng = np.random.default_rng(0)
  store.write_scan(scan, rng.integers(1, 255, (32, 32, 32), dtype=np.uint8), chunks=(16, 16, 16))
  chunk = next(p for p in (scan / "image").rglob("*") if p.is_file() and p.name != "zarr.json")
  chunk.unlink()
  store._WARNED.clear()
  with registry.open_volume(scan) as src:
    assert src.shape == (32, 32, 32)
  err = capsys.readouterr().err
  assert "is damaged: image has 7 of its 8 chunk files" in err


@pytest.mark.parametrize("suffix", [".isq", ".h5", ".mrc", ".npy", ".tif"])
def test_garbage_files_are_named_bad_input(tmp_path, suffix):
  """Whatever a parser raises on a hostile file becomes one UserError naming the file."""
  rng = np.random.default_rng(0)
  heads = {".isq": b"CTDATA-HEADER_V1", ".npy": b"\x93NUMPY", ".tif": b"II*\x00"}
  path = tmp_path / f"x{suffix}"
  path.write_bytes(heads.get(suffix, b"") + rng.integers(0, 256, 600, dtype=np.uint8).tobytes())
  with pytest.raises(errors.UserError, match=str(path)):
    registry.open_volume(path).close()


def test_planes_of_a_claimed_shape_refused():
  """What predict checks (issue 26: a zarr.json claiming 100000^3 under
  --memory_budget_gb=1): one plane of the volume must fit the budget."""
  with pytest.raises(errors.UserError, match=r"input 'huge.zarr': one plane of its "
                                             r"\(100000, 100000, 100000\) voxels needs 186\.3 GiB "
                                             r"of memory, but --memory_budget_gb=1 allows"):
    memory_plan.require_planes_fit("input 'huge.zarr'", (100000,) * 3, 20, budget_gb=1)
  memory_plan.require_planes_fit("input 'ok.zarr'", (64, 512, 512), 20, budget_gb=1)
