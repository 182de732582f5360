"""Nothing lost, nothing destroyed: parallel runs, hostile paths and values, kill -9 debris.

Each test is one of the adversarial cases of issue 13, run the way a user would (the launch
scripts as subprocesses) where that stays cheap. Workers that only need bonejax.cli / store
do not import jax, so the many-process tests stay light.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from bonejax.core import errors, outputs
from bonejax.data import store

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def launch(script, *args, timeout=300):
  return subprocess.run([sys.executable, str(REPO / "launch" / script), *map(str, args)],
                        capture_output=True, text=True, cwd=REPO, env=ENV, timeout=timeout)


def assert_one_line_error(proc, match, code=2):
  assert proc.returncode == code, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], proc.stderr
  assert proc.stdout.strip() == ""


def start_worker(code: str) -> subprocess.Popen:
  """A Python process running `code` (bonejax importable); it prints 'ready' when set up."""
  proc = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r})"
                           f"\n{code}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=REPO, env=ENV)
  line = proc.stdout.readline()
  assert line.strip() == "ready", proc.stderr.read() if proc.poll() is not None else line
  return proc


def kill9(proc: subprocess.Popen) -> None:
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  proc.stdout.close()
  proc.stderr.close()


def tiny_volume(seed=0, shape=(4, 5, 6)):
  return np.random.default_rng(seed).integers(1, 1000, shape).astype(np.uint16)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
  from flax import nnx
  from bonejax import models
  from bonejax.models import bundle
  root = tmp_path_factory.mktemp("bundle")
  abstract = nnx.eval_shape(lambda: models.create("unet", num_classes=3, in_channels=1,
                                                  rngs=nnx.Rngs(0), depth=2, width=4))
  meta = bundle.make_meta(model_name="unet", model_kwargs={"depth": 2, "width": 4},
                          classes=["background", "bone", "pore"], in_channels=1,
                          normalization="percentile", patch_size=32, train_axes=[0, 1, 2])
  bundle.save_bundle(root / "model", models.fill_from_numpy(abstract, 0), meta)
  return root / "model"


# ---------------------------------------------------------------------------------------------
# 1. Parallel imports lose no scans.
# ---------------------------------------------------------------------------------------------


def test_two_processes_register_all_400_scans(tmp_path):
  go = tmp_path / "go"
  code = ("import os, time\nfrom bonejax.data import store\nprint('ready', flush=True)\n"
          f"while not os.path.exists({str(go)!r}): time.sleep(0.005)\n"
          "for i in range(200):\n"
          f"  store.add_scan_to_dataset({str(tmp_path)!r}, f'w{{sys.argv[-1]}}_{{i:03d}}', "
          "['background', 'bone'])\n")
  workers = [subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, "
                               f"{str(REPO)!r})\n{code}", str(k)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO) for k in range(2)]
  for w in workers:
    assert w.stdout.readline().strip() == "ready"
  go.touch()
  for w in workers:
    out, err = w.communicate(timeout=300)
    assert w.returncode == 0, err
  scans = store.open_dataset(tmp_path).scans
  assert len(scans) == 400
  assert set(scans) == {f"w{k}_{i:03d}" for k in range(2) for i in range(200)}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset.json", "go"]


def test_sixteen_parallel_imports_list_all_sixteen_scans(tmp_path):
  data, go = tmp_path / "D", tmp_path / "go"
  np.save(tmp_path / "v.npy", tiny_volume())
  # launch/import_volume.py itself, started together once every process has imported its
  # modules, so that the imports really overlap.
  code = ("import os, runpy, time\nimport bonejax.data.importer\n"
          "sys.argv = ['import_volume.py'] + sys.argv[1:]\nprint('ready', flush=True)\n"
          f"while not os.path.exists({str(go)!r}): time.sleep(0.005)\n"
          "runpy.run_path('launch/import_volume.py', run_name='__main__')\n")
  procs = [subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, "
                             f"{str(REPO)!r})\n{code}", f"--image={tmp_path / 'v.npy'}",
                             f"--out={data}", f"--scan=s{i:02d}", "--voxel_size_um=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
           for i in range(16)]
  for p in procs:
    assert p.stdout.readline().strip() == "ready"
  go.touch()
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["scan"].startswith("s")
    assert "warning" not in err  # no in-flight import was mistaken for an orphan
  ds = store.open_dataset(data)
  assert sorted(ds.scans) == [f"s{i:02d}" for i in range(16)]
  assert sorted(p.name for p in data.iterdir()) == sorted(ds.scans + ["dataset.json"])
  go.unlink()


def test_unlisted_scan_directory_is_registered_with_a_warning(tmp_path, capsys):
  data = tmp_path / "D"
  store.write_scan(data / "lost", tiny_volume())  # an import killed before registering
  store.add_scan_to_dataset(data, "new", ["a", "b"])
  assert store.open_dataset(data).scans == ["lost", "new"]
  err = capsys.readouterr().err
  assert "warning:" in err and "'lost'" not in err and "lost existed but was not listed" in err
  # ... and dataset.json can be rebuilt from the scan directories alone.
  (data / "dataset.json").unlink()
  with pytest.raises(errors.UserError, match="give the class names"):
    store.rebuild_dataset(data)
  assert store.rebuild_dataset(data, ["a", "b"]).scans == ["lost"]  # "new" was only a name


def test_import_killed_before_registering_leaves_a_scan_the_next_import_lists(tmp_path):
  data = tmp_path / "D"
  np.save(tmp_path / "v.npy", tiny_volume())
  worker = start_worker(
      "import time\nfrom bonejax.data import store\nfrom bonejax.data import importer\n"
      "def hang(*a, **k):\n  print('ready', flush=True); time.sleep(600)\n"
      "store.add_scan_to_dataset = hang\n"
      f"importer.import_volume({str(tmp_path / 'v.npy')!r}, {str(data)!r}, 'first', "
      "progress_every_s=1e9)\n")
  # While the first import is alive its scan is in flight, not an orphan: no warning.
  ok = launch("import_volume.py", f"--image={tmp_path / 'v.npy'}", f"--out={data}",
              "--scan=second", "--voxel_size_um=1")
  assert ok.returncode == 0 and "warning" not in ok.stderr, ok.stderr
  assert store.open_dataset(data).scans == ["second"]
  kill9(worker)
  ok = launch("import_volume.py", f"--image={tmp_path / 'v.npy'}", f"--out={data}",
              "--scan=third")
  assert ok.returncode == 0, ok.stderr
  assert "first existed but was not listed" in ok.stderr
  assert store.open_dataset(data).scans == ["second", "first", "third"]


# ---------------------------------------------------------------------------------------------
# 2. --overwrite destroys nothing that is not ours; an output is never an input.
# ---------------------------------------------------------------------------------------------


def test_make_phantom_overwrite_keeps_a_users_directory(tmp_path):
  mine = tmp_path / "DIR"
  (mine / "photos").mkdir(parents=True)
  (mine / "photos" / "cat.jpg").write_bytes(b"cat")
  (mine / "thesis.tex").write_text("\\chapter{One}")
  r = launch("make_phantom.py", f"--out={mine}", "--overwrite", "--num_scans=1",
             "--shape=32,32,32")
  assert_one_line_error(r, "is a directory bonejax did not write")
  assert (mine / "thesis.tex").read_text() == "\\chapter{One}"
  assert (mine / "photos" / "cat.jpg").read_bytes() == b"cat"
  # A phantom it made itself is replaced.
  ph = tmp_path / "ph"
  for _ in range(2):
    r = launch("make_phantom.py", f"--out={ph}", "--overwrite", "--num_scans=1",
               "--shape=32,32,32")
    assert r.returncode == 0, r.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == ["DIR", "ph"]


def test_import_overwrite_keeps_a_users_directory(tmp_path):
  data = tmp_path / "D"
  (data / "mynotes").mkdir(parents=True)
  (data / "mynotes" / "todo.txt").write_text("buy milk")
  np.save(tmp_path / "v.npy", tiny_volume())
  r = launch("import_volume.py", f"--image={tmp_path / 'v.npy'}", f"--out={data}",
             "--scan=mynotes", "--overwrite")
  assert_one_line_error(r, "is a directory bonejax did not write")
  assert (data / "mynotes" / "todo.txt").read_text() == "buy milk"
  assert sorted(p.name for p in data.iterdir()) == ["mynotes"]
  # Importing a scan over itself is refused too.
  ok = launch("import_volume.py", f"--image={tmp_path / 'v.npy'}", f"--out={data}", "--scan=s")
  assert ok.returncode == 0, ok.stderr
  r = launch("import_volume.py", f"--image={data / 's'}", f"--out={data}", "--scan=s",
             "--overwrite")
  assert_one_line_error(r, "is the input")


def test_predict_output_cannot_be_its_input(tmp_path, bundle_dir):
  good = tmp_path / "good.tif"
  tifffile.imwrite(good, tiny_volume(shape=(8, 8, 8)), photometric="minisblack")
  before = good.read_bytes()
  r = launch("predict.py", f"--model={bundle_dir}", f"--input={good}", f"--output={good}",
             "--overwrite", "--planes=1")
  assert_one_line_error(r, "is the input")
  r = launch("predict.py", f"--model={bundle_dir}", f"--input={good}",
             f"--output={bundle_dir / 'pred.zarr'}", "--planes=1")
  assert_one_line_error(r, "lies inside the input")
  assert good.read_bytes() == before


def test_evaluate_report_cannot_go_inside_its_input(tmp_path):
  vol = tiny_volume()
  store.write_scan(tmp_path / "scan", vol, vol % 3)
  np.save(tmp_path / "pred.npy", (vol % 3).astype(np.uint8))
  r = launch("evaluate.py", f"--pred={tmp_path / 'pred.npy'}", f"--truth={tmp_path / 'scan'}",
             f"--out={tmp_path / 'scan' / 'report.json'}")
  assert_one_line_error(r, "lies inside the input")
  assert sorted(p.name for p in (tmp_path / "scan").iterdir()) == ["image", "labels", "zarr.json"]


# ---------------------------------------------------------------------------------------------
# 3. A second writer of the same output is refused.
# ---------------------------------------------------------------------------------------------


HOLD = ("import time\nfrom bonejax.core import outputs\n"
        "with outputs.atomic_output({out!r}) as tmp:\n"
        "  tmp.mkdir(); (tmp / 'zarr.json').write_text('{{}}')\n"
        "  print('ready', flush=True); time.sleep(600)\n")


def test_second_predict_to_one_output_is_refused(tmp_path, bundle_dir):
  out = tmp_path / "pred.zarr"
  first = start_worker(HOLD.format(out=str(out)))  # a run writing pred.zarr
  try:
    np.save(tmp_path / "v.npy", tiny_volume(shape=(8, 8, 8)))
    r = launch("predict.py", f"--model={bundle_dir}", f"--input={tmp_path / 'v.npy'}",
               f"--output={out}", "--overwrite", "--planes=1")
    assert_one_line_error(r, "is being written by another bonejax run")
    assert f"process {first.pid}" in r.stderr
    r = launch("make_phantom.py", f"--out={out}", "--num_scans=1", "--shape=32,32,32")
    assert_one_line_error(r, "is being written by another bonejax run")
  finally:
    kill9(first)


def test_claim_of_a_killed_run_is_free_again(tmp_path):
  out = tmp_path / "ph"
  first = start_worker(HOLD.format(out=str(out)))
  kill9(first)
  r = launch("make_phantom.py", f"--out={out}", "--num_scans=1", "--shape=32,32,32")
  assert r.returncode == 0, r.stderr
  assert "note: removed 1 leftover(s)" in r.stderr and str(first.pid) in r.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ph"]


# ---------------------------------------------------------------------------------------------
# 4. Debris after kill -9 is cleaned by the next run.
# ---------------------------------------------------------------------------------------------


def test_killed_import_leaves_a_temporary_the_next_import_removes(tmp_path):
  data = tmp_path / "D"
  np.save(tmp_path / "v.npy", tiny_volume(shape=(12, 5, 6)))
  worker = start_worker(
      "import time\nfrom bonejax.data import store\nfrom bonejax.data import importer\nreal = store.write_slab\n"
      "def slow(*a, **k):\n  f = real(*a, **k); f.result(); print('ready', flush=True)\n"
      "  time.sleep(600)\n"
      "store.write_slab = slow\n"
      f"importer.import_volume({str(tmp_path / 'v.npy')!r}, {str(data)!r}, 's', slab=4, "
      "progress_every_s=1e9)\n")
  kill9(worker)
  left = sorted(p.name for p in data.iterdir())
  assert len(left) == 2 and left[0] == ".s.lock" and left[1].startswith(".s.tmp-")
  assert f"-{worker.pid}-" in left[1]
  r = launch("import_volume.py", f"--image={tmp_path / 'v.npy'}", f"--out={data}", "--scan=s")
  assert r.returncode == 0, r.stderr
  assert "note: removed 1 leftover(s)" in r.stderr and left[1] in r.stderr
  assert sorted(p.name for p in data.iterdir()) == ["dataset.json", "s"]


def test_killed_scratch_directory_is_removed_by_the_next_run(tmp_path, capsys):
  worker = start_worker(
      "import time\nfrom bonejax.core import outputs\n"
      f"with outputs.scratch_dir({str(tmp_path)!r}) as d:\n"
      "  (d / 'input.zarr').mkdir(); print('ready', flush=True); time.sleep(600)\n")
  kill9(worker)
  (left,) = tmp_path.iterdir()
  assert left.name.startswith(".bonejax-predict-") and f"-{worker.pid}-" in left.name
  with outputs.scratch_dir(tmp_path):
    assert not left.exists()
  assert left.name in capsys.readouterr().err
  assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 5. A failed run leaves no directories it made.
# ---------------------------------------------------------------------------------------------


def test_failed_runs_remove_the_directories_they_made(tmp_path):
  (tmp_path / "bad.tif").write_bytes(b"garbage" * 30)
  r = launch("import_volume.py", f"--image={tmp_path / 'bad.tif'}",
             f"--out={tmp_path / 'a' / 'b' / 'D'}", "--scan=s")
  assert_one_line_error(r, "cannot read TIFF")
  (tmp_path / "model").mkdir()
  r = launch("predict.py", f"--model={tmp_path / 'model'}", f"--input={tmp_path / 'nope.tif'}",
             f"--output={tmp_path / 'x' / 'y' / 'pred.zarr'}")
  assert_one_line_error(r, "does not exist")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tif", "model"]


# ---------------------------------------------------------------------------------------------
# 6, 7. Bad values are named, up front, as bad input.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,match", [
    (["--seed=-1"], "--seed=-1 must be a non-negative integer"),
    (["--shape=100000,100000,100000"], "needs about"),
    (["--num_scans=0"], "--num_scans=0 must be >= 1"),
])
def test_make_phantom_bad_values(tmp_path, args, match):
  r = launch("make_phantom.py", f"--out={tmp_path / 'ph'}", *args)
  assert_one_line_error(r, match)
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,match", [
    (["--tile_size=0"], "--tile_size=0 must be positive"),
    (["--tile_size=-5"], "--tile_size=-5 must be positive"),
    (["--tile_overlap=-1"], "--tile_overlap=-1 must be >= 0"),
    (["--tile_size=64", "--tile_overlap=64"], "must be smaller than --tile_size=64"),
    (["--device_memory_gb=0"], "--device_memory_gb=0.0 must be positive"),
])
def test_predict_absurd_values(tmp_path, args, match):
  r = launch("predict.py", f"--model={tmp_path}", f"--input={tmp_path}",
             f"--output={tmp_path / 'p.zarr'}", *args)
  assert_one_line_error(r, match)


# ---------------------------------------------------------------------------------------------
# 8. Damaged inputs: one line, exit 2; a lost chunk is not silently zeros.
# ---------------------------------------------------------------------------------------------


def test_predict_on_damaged_inputs_is_one_line_bad_input(tmp_path, bundle_dir):
  vol = tiny_volume(shape=(8, 8, 8))
  store.write_scan(tmp_path / "scan", vol, chunks=(4, 4, 4))
  chunk = next(p for p in sorted((tmp_path / "scan" / "image" / "c").rglob("*")) if p.is_file())
  chunk.write_bytes(b"garbage" * 10)
  r = launch("predict.py", f"--model={bundle_dir}", f"--input={tmp_path / 'scan'}",
             f"--output={tmp_path / 'p.zarr'}", "--planes=1")
  assert_one_line_error(r, "Error reading local file")
  assert "tensorstore_spec" not in r.stderr
  # A truncated TIFF: tifffile's own log line is not printed beside the error.
  tifffile.imwrite(tmp_path / "v.tif", vol, photometric="minisblack")
  data = (tmp_path / "v.tif").read_bytes()
  (tmp_path / "cut.tif").write_bytes(data[:len(data) // 2])
  r = launch("predict.py", f"--model={bundle_dir}", f"--input={tmp_path / 'cut.tif'}",
             f"--output={tmp_path / 'p.zarr'}", "--planes=1")
  assert_one_line_error(r, "cut.tif")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.tif", "scan", "v.tif"]


def test_a_deleted_chunk_is_reported(tmp_path, capsys):
  vol = tiny_volume(shape=(8, 8, 8))
  labels = np.zeros(vol.shape, np.uint8)  # all background: no labels chunk is stored
  labels[:4, :4, :4] = 1
  scan = store.write_scan(tmp_path / "s", vol, labels, chunks=(4, 4, 4))
  assert scan.attrs["stored_chunks"] == {"image": 8, "labels": 1}
  store.open_scan(tmp_path / "s")
  assert capsys.readouterr().err == ""  # absent all-background chunks are not losses
  chunk = next(p for p in sorted((tmp_path / "s" / "image" / "c").rglob("*")) if p.is_file())
  chunk.unlink()
  store.open_scan(tmp_path / "s")
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("warning: scan") and "image has 7 of its 8" in err[0]
  # Importing the damaged scan says so too.
  r = launch("import_volume.py", f"--image={tmp_path / 's'}", f"--out={tmp_path / 'D'}",
             "--scan=copy")
  assert r.returncode == 0 and "image has 7 of its 8 chunk files" in r.stderr, r.stderr
  # The import records its own chunk count (one 64^3 chunk here).
  assert store.open_scan(tmp_path / "D" / "copy").attrs["stored_chunks"] == {"image": 1}
