"""cli and outputs: what --overwrite may replace, claims, temporaries, clean-up, one-line errors.

The many-process and kill -9 checks are in test_reliability.py; these run in one process.
"""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from bonejax.cli import runner
from bonejax.core import errors, outputs
from bonejax.data import store
from bonejax.io import tiff

REPO = Path(__file__).resolve().parents[1]


def dead_pid() -> int:
  """The pid of a process that has ended (and been reaped)."""
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def names(d: Path) -> list[str]:
  return sorted(p.name for p in d.iterdir())


# ---------------------------------------------------------------------------------------------
# What --overwrite may replace.
# ---------------------------------------------------------------------------------------------


def test_overwrite_refuses_what_bonejax_did_not_write(tmp_path):
  user = tmp_path / "thesis"
  (user / "photos").mkdir(parents=True)
  (user / "thesis.tex").write_text("chapter 1")
  notes = tmp_path / "notes.txt"
  notes.write_text("mine")
  foreign_zarr = tmp_path / "foreign.zarr"
  foreign_zarr.mkdir()
  (foreign_zarr / "zarr.json").write_text('{"zarr_format": 3, "node_type": "array"}')
  for p, match in [(user, "is a directory bonejax did not write"),
                   (notes, "is a file bonejax did not write"),
                   (foreign_zarr, "zarr node bonejax did not write")]:
    with pytest.raises(errors.UserError, match=match):
      outputs.check_output(p, overwrite=True)
    with pytest.raises(errors.UserError, match="exists; pass --overwrite"):
      outputs.check_output(p, overwrite=False)
    with pytest.raises(errors.UserError, match="replaces only bonejax outputs"):
      with outputs.atomic_output(p, overwrite=True) as tmp:
        tmp.write_text("new")
  assert (user / "thesis.tex").read_text() == "chapter 1" and (user / "photos").is_dir()
  assert notes.read_text() == "mine"
  assert names(tmp_path) == ["foreign.zarr", "notes.txt", "thesis"]  # no debris either


def test_overwrite_replaces_bonejax_outputs(tmp_path):
  vol = np.arange(4 * 5 * 6, dtype=np.uint16).reshape(4, 5, 6)
  data = tmp_path / "data"
  store.write_scan(data / "scan_000", vol, vol % 3)
  store.write_dataset_json(data, ["a", "b", "c"], ["scan_000"])
  scan = store.write_scan(tmp_path / "data2" / "scan_000", vol).path
  arr = tmp_path / "pred.zarr"
  store.create_array(arr, vol.shape, "uint8")
  store.set_array_attrs(arr, {"planes": 3})
  tiff.export_tiff(vol, tmp_path / "pred.tif")
  bundle = tmp_path / "model"
  bundle.mkdir()
  (bundle / "model.json").write_text(json.dumps({"model": "unet", "classes": ["a", "b"]}))
  report = tmp_path / "report.json"
  report.write_text(json.dumps({"iou": {}, "dice": {}, "miou_all": 0, "miou_fg": 0}))
  html = tmp_path / "report.html"
  html.write_text('<html><head><meta name="generator" content="bonejax 0.1"></head></html>')
  empty = tmp_path / "empty"
  empty.mkdir()
  for p in (scan, data, arr, tmp_path / "pred.tif", bundle, report, html, empty):
    assert outputs.foreign_reason(p) is None, p
    with outputs.atomic_output(p, overwrite=True) as tmp:
      tmp.write_text("replaced")
    assert p.read_text() == "replaced"


def test_a_dataset_or_scan_holding_foreign_files_is_not_replaced(tmp_path):
  vol = np.ones((4, 5, 6), np.uint8)
  data = tmp_path / "data"
  store.write_scan(data / "scan_000", vol)
  store.write_dataset_json(data, ["a", "b"], ["scan_000"])
  (data / "README.txt").write_text("how I scanned these")
  assert "README.txt" in outputs.foreign_reason(data)
  (data / "README.txt").unlink()
  (data / "scan_000" / "notes.txt").write_text("x")
  assert "notes.txt" in outputs.foreign_reason(data / "scan_000")
  assert outputs.foreign_reason(data) is not None  # scan_000 is no longer a plain scan
  (data / "scan_000" / "notes.txt").unlink()
  # bonejax's own leftovers (locks, temporaries, old-style temporaries) do not count.
  (data / ".scan_001.tmp-0a1b2c3d").mkdir()
  (data / ".dataset.json.lock").write_text("")
  assert outputs.foreign_reason(data) is None


def test_output_that_is_or_holds_or_lies_inside_an_input(tmp_path):
  src = tmp_path / "good.tif"
  src.write_bytes(b"precious")
  d = tmp_path / "scan"
  d.mkdir()
  link = tmp_path / "link.tif"
  link.symlink_to(src)
  for out, inputs, match in [
      (src, [src], "is the input"),
      (link, [src], "is the input"),
      (tmp_path / "." / "good.tif", [str(src)], "is the input"),
      (d / "pred.zarr", [d], "lies inside the input"),
      (tmp_path, [d], "holds the input"),
  ]:
    with pytest.raises(errors.UserError, match=match):
      outputs.check_output(out, overwrite=True, inputs=inputs)
  assert src.read_bytes() == b"precious"
  outputs.check_output(tmp_path / "other.tif", overwrite=True, inputs=[src, d, None])


def test_unwritable_output_directory_fails_up_front(tmp_path, monkeypatch):
  # Root ignores permissions, so the check itself is what is exercised here.
  real = os.access
  monkeypatch.setattr(outputs.os, "access",
                      lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
  with pytest.raises(errors.UserError, match="permission denied"):
    outputs.check_output(tmp_path / "pred.tif", overwrite=False)
  monkeypatch.setattr(outputs.Path, "mkdir", lambda *a, **k: (_ for _ in ()).throw(
      PermissionError(13, "Permission denied")))
  with pytest.raises(errors.UserError, match="cannot create .*new.*: permission denied"):
    outputs.check_output(tmp_path / "new" / "deeper" / "pred.tif", overwrite=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_directory_is_refused(tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o555)
  try:
    with pytest.raises(errors.UserError, match="permission denied"):
      outputs.check_output(ro / "pred.zarr", overwrite=False)
  finally:
    ro.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# Parents, claims and temporaries.
# ---------------------------------------------------------------------------------------------


def test_failed_output_removes_the_parents_it_made(tmp_path):
  (tmp_path / "a").mkdir()
  out = tmp_path / "a" / "b" / "c" / "out.zarr"
  with pytest.raises(RuntimeError):
    with outputs.atomic_output(out) as tmp:
      tmp.mkdir()
      raise RuntimeError("boom")
  assert names(tmp_path) == ["a"] and names(tmp_path / "a") == []
  # A parent that gained other content meanwhile stays.
  made = outputs.make_parents(out)
  (tmp_path / "a" / "b" / "keep.txt").write_text("x")
  outputs.remove_made_dirs(made)
  assert names(tmp_path / "a" / "b") == ["keep.txt"]


def test_claims_are_exclusive_between_runs_and_reentrant_within_one(tmp_path):
  out = tmp_path / "out.zarr"
  with outputs.claim_output(out):
    assert (tmp_path / ".out.zarr.lock").exists() and outputs.is_claimed(out)
    with outputs.atomic_output(out) as tmp:  # the same process: the claim is reused
      tmp.write_text("x")
    # Another process is refused while this one holds the claim.
    code = ("import sys; from bonejax.core import errors, outputs\n"
            "try:\n"
            f"  cm = outputs.claim_output({str(out)!r}); cm.__enter__()\n"
            "except errors.UserError as e:\n"
            "  print(e); sys.exit(2)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert r.returncode == 2 and "being written by another bonejax run" in r.stdout
    assert f"process {os.getpid()}" in r.stdout
  assert not outputs.is_claimed(out)
  assert names(tmp_path) == ["out.zarr"]  # the lock file goes with the claim


def test_stale_temporaries_are_removed_and_the_old_output_restored(tmp_path, capsys):
  pid = dead_pid()
  tag = f"{outputs.HOST}-{pid}"
  out = tmp_path / "pred.zarr"
  (tmp_path / f".pred.zarr.tmp-{tag}-0123abcd").mkdir()       # a crashed write
  (tmp_path / f"..pred.zarr.tmp-{tag}-0123abcd.tmp-{tag}-4567").write_text("")  # nested
  (tmp_path / f".pred.zarr.old-{tag}-89abcdef").mkdir()       # crashed between the renames
  (tmp_path / f".pred.zarr.old-{tag}-89abcdef" / "zarr.json").write_text("{}")
  live = tmp_path / f".pred.zarr.tmp-{outputs.HOST}-{os.getpid()}-0badcafe"
  live.mkdir()  # this process's: alive, kept
  other_host = tmp_path / f".pred.zarr.tmp-abcdef-{pid}-0badcafe"
  other_host.mkdir()  # another machine's pid means nothing here: kept
  unrelated = tmp_path / f".pred.zarr2.tmp-{tag}-0123abcd"
  unrelated.mkdir()
  done = outputs.clean_stale(out)
  assert len(done) == 3
  assert (out / "zarr.json").exists()  # the complete old output is back
  assert names(tmp_path) == sorted([live.name, other_host.name, unrelated.name, "pred.zarr"])
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("note: removed 2 leftover(s)") and str(pid) in err[0]
  assert "restored the previous output" in err[0]


def test_scratch_dir_removes_stale_ones(tmp_path, capsys):
  pid = dead_pid()
  stale = tmp_path / f".bonejax-predict-{outputs.HOST}-{pid}-0123abcd"
  (stale / "input.zarr").mkdir(parents=True)
  legacy = tmp_path / ".bonejax-predict-k2j3_a9x"  # no owner in the name: left alone
  legacy.mkdir()
  with outputs.scratch_dir(tmp_path) as scratch:
    assert scratch.is_dir() and scratch.parent == tmp_path
    assert scratch.name.startswith(f".bonejax-predict-{outputs.HOST}-{os.getpid()}-")
    assert not stale.exists()
  assert not scratch.exists() and legacy.exists()
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "scratch directory" in err[0] and stale.name in err[0]


def test_atomic_write_text_cleans_its_own_stale_temporaries(tmp_path):
  pid = dead_pid()
  (tmp_path / f".dataset.json.tmp-{outputs.HOST}-{pid}-0123abcd").write_text("{")
  outputs.atomic_write_json(tmp_path / "dataset.json", {"a": 1})
  assert names(tmp_path) == ["dataset.json"]


# ---------------------------------------------------------------------------------------------
# runner.run: one line, whatever happened.
# ---------------------------------------------------------------------------------------------


def test_io_errors_are_bad_input_in_one_line():
  ts_error = ValueError(
      'FAILED_PRECONDITION: Error reading local file "/d/scan/image/c/0/0/0": '
      "ZSTD_decompressStream() failed [source locations='a.cc:1'] "
      "[tensorstore_spec='{\"driver\": \"zarr3\", \"kvstore\": {\"path\": \"/d\"}}']")
  line = errors.io_error(ts_error)
  assert line == ('Error reading local file "/d/scan/image/c/0/0/0": '
                  "ZSTD_decompressStream() failed")
  assert errors.io_error(PermissionError(13, "Permission denied", "/ro/x")) == (
      "cannot write or read '/ro/x': permission denied")
  assert errors.io_error(ValueError("INVALID_ARGUMENT: bad rank")) is None
  assert errors.io_error(RuntimeError("bug")) is None


SCRIPT = '''
import logging, sys
sys.path.insert(0, {repo!r})
from bonejax.cli import runner
from bonejax.core import errors, outputs
def main(argv):
  logging.getLogger("tifffile").error("TiffPage 3: truncated file")
  what = {what!r}
  if what == "user":
    raise errors.UserError("cannot read TIFF 'x.tif'")
  if what == "ts":
    raise ValueError('DATA_LOSS: Error reading local file "/d/c/0": bad '
                     '[tensorstore_spec=\\'{{}}\\']')
  if what == "bug":
    raise KeyError("oops")
  return {{"ok": 1}}
runner.run(main)
'''


@pytest.mark.parametrize("what,code,expect", [
    ("user", 2, "error: cannot read TIFF 'x.tif' (tifffile: TiffPage 3: truncated file)"),
    ("ts", 2, 'error: Error reading local file "/d/c/0": bad (tifffile: TiffPage 3: '
              'truncated file)'),
    ("bug", 3, "error: KeyError: 'oops' (set BONEJAX_DEBUG=1 for the traceback)"),
    ("ok", 0, "warning: tifffile: TiffPage 3: truncated file"),
])
def test_run_prints_one_stderr_line(tmp_path, what, code, expect):
  script = tmp_path / "script.py"
  script.write_text(SCRIPT.format(repo=str(REPO), what=what))
  r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                     env={k: v for k, v in os.environ.items() if k != "BONEJAX_DEBUG"})
  assert r.returncode == code
  assert r.stderr.strip().splitlines() == [expect], r.stderr
  if code == 0:
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"ok": 1}


def test_tifffile_logger_is_restored():
  logger = logging.getLogger("tifffile")
  before = (list(logger.handlers), logger.propagate)
  with runner._quiet_tifffile() as log:
    logger.warning("w")
  assert log.messages == ["w"] and (list(logger.handlers), logger.propagate) == before


def test_read_of_a_damaged_chunk_is_a_user_error(tmp_path):
  vol = np.random.default_rng(0).integers(1, 1000, (8, 8, 8)).astype(np.uint16)
  scan = store.write_scan(tmp_path / "s", vol, chunks=(4, 4, 4))
  chunk = next(p for p in sorted((tmp_path / "s" / "image" / "c").rglob("*")) if p.is_file())
  chunk.write_bytes(b"garbage" * 10)
  scan = store.open_scan(tmp_path / "s")
  with pytest.raises(errors.UserError, match=r"cannot read scan .*Error reading local file"):
    scan.read_image()
  with pytest.raises(errors.UserError, match="Error reading local file"):
    store.read_slab(scan.image, 0, 0, 4)
  (tmp_path / "s" / "image" / "zarr.json").write_text("{garbage")
  with pytest.raises(errors.UserError) as e:
    store.open_scan(tmp_path / "s")
  assert "tensorstore_spec" not in str(e.value) and len(str(e.value)) < 300


def test_tiff_export_is_marked(tmp_path):
  tiff.export_tiff(np.zeros((2, 3, 4), np.uint8), tmp_path / "a.tif")
  with tifffile.TiffFile(tmp_path / "a.tif") as tif:
    assert tif.pages.first.software.startswith("bonejax")
    assert "bonejax_version" in tif.pages.first.description
