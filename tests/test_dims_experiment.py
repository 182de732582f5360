"""The 2D / 2.5D / 3D experiment's bookkeeping (benchmarks/dims_2d_25d_3d.py), without training:
the equal voxel budget, resumable cells (finished cells of the same plan kept, failed and
other-plan cells rerun, each record written as it finishes), and the table and "which wins
where" paragraph computed from fake cell records."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import dims_2d_25d_3d as dims  # noqa: E402
from bonejax.core import errors  # noqa: E402


def test_plan_gives_every_dimension_the_same_labelled_voxels():
  plan = dims.make_plan(300, 0.5, (64, 96, 96), p2=64, b2=16, p3=32, window3d=64)
  d2, d25, d3 = (plan["dims"][k] for k in ("2d", "2.5d", "3d"))
  assert plan["steps"] == 150 and d2["steps"] == d25["steps"] == d3["steps"] == 150
  assert d3["batch"] == 2 and d3["patch"] == 32 and d25["context"] == dims.CONTEXT_25D
  assert d2["batch"] * 64 ** 2 == d3["batch"] * 32 ** 3 == plan["voxels_per_step"] == 65536
  assert d2["voxels"] == d3["voxels"] == 150 * 65536
  assert "150 steps x 65,536 labelled voxels" in dims.budget_text(plan)
  with pytest.raises(errors.UserError, match="whole number"):
    dims.make_plan(10, 1, (64, 96, 96), p2=64, b2=3, p3=32, window3d=64)
  with pytest.raises(errors.UserError, match="multiples of 32"):
    dims.make_plan(10, 1, (64, 96, 96), p2=64, b2=64, p3=64, window3d=48)
  # The smoke plan is its own tiny one whatever the flags say.
  smoke = dims.make_plan(300, 4, (64, 96, 96), 64, 16, 32, 64, smoke=True)
  assert smoke["shape"] == [32, 32, 32] and smoke["steps"] == 2 and smoke["num_scans"] == 3


def _rec(kind, dim, fg, ious, tv, pv):
  return {"cell": f"{kind}_{dim}", "phantom": kind, "dim": dim, "status": "ok",
          "test_miou_fg": fg, "test_iou": {"background": 0.99, **ious},
          "train_voxels_per_s": tv, "predict_voxels_per_s": pv, "params": 14.3e6,
          "val_miou_fg": fg - 0.01, "cell_seconds": 120.0, "load_start": [2.0, 1, 1],
          "load_end": [3.25, 1, 1]}


FAKE = [
    _rec("bone", "2d", 0.900, {"bone": 0.93, "pore": 0.87}, 40_000.0, 300_000.0),
    _rec("bone", "2.5d", 0.905, {"bone": 0.95, "pore": 0.87}, 38_000.0, 280_000.0),
    _rec("bone", "3d", 0.950, {"bone": 0.93, "pore": 0.97}, 10_000.0, 100_000.0),
    _rec("implant", "2d", 0.800, {"bone": 0.9, "layer": 0.6, "residual": 0.9}, 40_000.0, 3e5),
    _rec("implant", "2.5d", 0.806, {"bone": 0.9, "layer": 0.62, "residual": 0.9}, 38e3, 2.8e5),
    {"cell": "implant_3d", "phantom": "implant", "dim": "3d", "status": "failed",
     "error": "timed out after 3600 s"},
]


def test_summary_says_which_wins_where_from_the_numbers():
  text = dims.summary(FAKE)
  # bone: 3d ahead by 0.045 (> the tie threshold); pore decided by 3d, bone by 2.5d.
  assert "On the bone phantom 3d wins on test miou_fg (0.950, +0.045 over the next" in text
  assert "pore: 3d (0.970, +0.100)" in text and "bone: 2.5d (0.950, +0.020)" in text
  assert "2d trains fastest (40 kvoxel/s, 4.0x 3d)" in text
  assert "2d predicts fastest (300 kvoxel/s, 3.0x 3d)" in text
  # implant: 3d failed; 2d and 2.5d within 0.01 -> a tie, the failed cell left out.
  assert "On the implant phantom 2.5d and 2d tie on test miou_fg" in text
  assert "layer: 2.5d (0.620, +0.020)" in text
  assert "residual: 2d = 2.5d (0.900, within 0.01)" in text
  # Change the numbers, the words follow (nothing hard-coded).
  lifted = [dict(r, test_miou_fg=0.99) if r["cell"] == "bone_2d" else r for r in FAKE]
  assert "On the bone phantom 2d wins on test miou_fg (0.990, +0.040 over" in dims.summary(lifted)
  assert "no model segments usably" not in text
  # A budget too small to learn: the words say the ranking is of barely trained models.
  low = [dict(r, test_miou_fg=r["test_miou_fg"] / 4) if r["phantom"] == "bone" else r
         for r in FAKE]
  lines = dims.summary(low).split("On the implant")
  assert "no model segments usably at this budget" in lines[0]
  assert "no model segments usably" not in lines[1]
  assert dims.summary([FAKE[-1]]) == "No cell has finished yet."


def test_table_lists_every_cell_with_its_classes_and_failures():
  md = dims.table(FAKE)
  assert md.index("### bone phantom") < md.index("### implant phantom")
  bone = md.split("### implant phantom")[0]
  assert "IoU pore" in bone and "IoU layer" not in bone
  assert "| 3d | 0.95 | 0.93 | 0.97 | 0.99 | 10,000 | 100,000 | 14.3 |" in bone
  assert "| 14.3 | 0.94 | 2 | 2.0-3.2 | ok |" in bone  # params, val, min, load, status
  assert "| 3d | - |" in md and "failed: timed out after 3600 s" in md


def test_grid_resumes_finished_cells_and_reruns_failed_ones(tmp_path):
  plan = dims.make_plan(4, 1, (64, 96, 96), 64, 16, 32, 64)
  calls, reports = [], []

  def run_one(kind, dim):
    calls.append((kind, dim))
    if (kind, dim) == ("implant", "3d") and len(calls) < 7:
      raise RuntimeError("boom")
    return {"test_miou_fg": 0.5, "test_iou": {"background": 1.0, "bone": 0.5},
            "train_voxels_per_s": 1.0, "predict_voxels_per_s": 2.0}

  cells = [(k, d) for k in dims.PHANTOMS for d in dims.DIMS]
  recs = dims.run_grid(plan, cells, tmp_path / "cells", tmp_path, run_one,
                       on_record=lambda r: reports.append(len(r)))
  assert calls == cells and reports == [1, 2, 3, 4, 5, 6]
  assert [r["status"] for r in recs] == ["ok"] * 5 + ["failed"]
  saved = json.loads((tmp_path / "cells" / "bone_3d.json").read_text())
  assert saved["plan"]["batch"] == 2 and saved["status"] == "ok"
  assert "boom" in json.loads((tmp_path / "cells" / "implant_3d.json").read_text())["error"]
  # Rerun: only the failed cell runs again.
  recs = dims.run_grid(plan, cells, tmp_path / "cells", tmp_path, run_one)
  assert calls[6:] == [("implant", "3d")] and all(r["status"] == "ok" for r in recs)
  # The report of saved cells: records of this plan, "not run" for the others.
  rows = dims.load_records(plan, cells + [("bone", "4d")], tmp_path / "cells")
  assert [r["status"] for r in rows] == ["ok"] * 6 + ["not run"]
  assert "| 4d | - |" in dims.table(rows) and "| not run |" in dims.table(rows)
  # Another budget: every cell is stale and reruns.
  bigger = dims.make_plan(8, 1, (64, 96, 96), 64, 16, 32, 64)
  dims.run_grid(bigger, cells[:1], tmp_path / "cells", tmp_path, run_one)
  assert calls[-1] == ("bone", "2d") and len(calls) == 8
