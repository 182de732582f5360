"""The experiment grids' bookkeeping (benchmarks/efficiency_vs_iou.py), without training.

The real cells train for minutes each; here the `--fake` runner stands in, so what is checked is
what the committed tables rest on: seeds aggregated into mean +- half-range, the convergence
check from each cell's validation curve, Pareto fronts over the aggregated rows, the scaling
grid's per-class and compound-scaling tables, resumption (finished cells of the same budget are
kept, cells of another budget rerun), the pixel budget across patch sizes, and failed
cells recorded as failed.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import efficiency_vs_iou as ev  # noqa: E402


def test_parse_model_and_cells():
  assert ev.parse_model("unet_resnet18") == ("unet_resnet18", {})
  assert ev.parse_model("unet-d4w16") == ("unet", {"depth": 4, "width": 16})
  grid = dict(models=("a", "b"), patches=(64, 128), seeds=(0, 1))
  cells = ev.grid_cells(grid)
  assert len(cells) == 8 and cells[0] == ("a", 64, 0) and cells[-1] == ("b", 128, 1)
  assert ev.grid_cells(dict(models=("a",), patches=(64,))) == [("a", 64, None)]
  assert ev.cell_name("a", 64, 1) == "a_p64_s1" and ev.cell_name("a", 64) == "a_p64"


def test_late_gain_flags_a_budget_cut_short():
  plateau = [(25, 0.5), (50, 0.9), (75, 0.95), (100, 0.955), (125, 0.956), (150, 0.957)]
  rising = [(25, 0.3), (50, 0.5), (75, 0.6), (100, 0.7), (125, 0.8), (150, 0.9)]
  assert ev.late_gain(plateau, 150) == pytest.approx(0.957 - 0.955)
  assert ev.late_gain(rising, 150) == pytest.approx(0.9 - 0.7)
  assert ev.late_gain([(150, 0.9)], 150) is None  # one evaluation: nothing to compare


def test_aggregate_over_seeds_and_pareto():
  recs = [dict(cell="m_p64_s0", model="m", patch=64, seed=0, status="ok", test_miou_fg=0.90,
               predict_voxels_per_s=10.0, late_gain=0.0, test_iou={"bone": 0.8}),
          dict(cell="m_p64_s1", model="m", patch=64, seed=1, status="ok", test_miou_fg=0.94,
               predict_voxels_per_s=12.0, late_gain=0.02, test_iou={"bone": 0.9}),
          dict(cell="n_p64_s0", model="n", patch=64, seed=0, status="ok", test_miou_fg=0.80,
               predict_voxels_per_s=5.0, late_gain=0.0),
          dict(cell="n_p64_s1", model="n", patch=64, seed=1, status="failed", error="boom")]
  rows = {r["cell"]: r for r in ev.aggregate(recs)}
  m, n = rows["m_p64"], rows["n_p64"]
  assert m["test_miou_fg"] == pytest.approx(0.92) and m["test_spread"] == pytest.approx(0.02)
  assert m["predict_voxels_per_s"] == pytest.approx(11.0) and m["max_late_gain"] == 0.02
  assert m["train_mpixel_per_s"] is None  # no training speed recorded in these records
  assert m["test_iou"]["bone"] == pytest.approx(0.85) and m["seeds"] == 2
  assert n["seeds"] == 1 and n["seeds_planned"] == 2 and n["test_spread"] is None
  assert "boom" in n["error"] and n["status"] == "ok"
  assert ev.pareto(list(rows.values()), "predict_voxels_per_s") == {"m_p64"}


def _run(tmp_path, *args):
  out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "efficiency_vs_iou.py"),
                        "--fake", f"--results_dir={tmp_path / 'res'}", "--tag=t",
                        f"--workdir={tmp_path / 'work'}", *args],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_cpu_grid_fake_end_to_end_and_resume(tmp_path):
  res = _run(tmp_path, "--grid=cpu", "--models=unet,segformer_b0", "--fake_fail=segformer_b0")
  assert res["cells"] == 8 and res["ok"] == 4 and len(res["failed"]) == 4
  md = Path(res["md"]).read_text()
  assert "mean ± half the range over seeds" in md and "## Validation curves" in md
  assert "unet_p64_s1" in md and "failed: error: fake failure of segformer_b0" in md
  assert "1-min load average at the end of each cell" in md  # each record keeps its load
  cells = tmp_path / "res" / "efficiency_cpu_t_cells"
  first = json.loads((cells / "unet_p64_s0.json").read_text())
  assert first["seed"] == 0 and first["val_curve"]
  res2 = _run(tmp_path, "--grid=cpu", "--models=unet,segformer_b0", "--noretry_failed")
  assert res2["ok"] == 4
  assert json.loads((cells / "unet_p64_s0.json").read_text())["finished"] == first["finished"]


def test_scaling_grid_tables(tmp_path):
  res = _run(tmp_path, "--grid=scaling")
  assert res["cells"] == 12 and res["ok"] == 12
  md = Path(res["md"]).read_text()
  assert "## Scaling one dimension or all three" in md
  assert "depth + width + input" in md and "| base | 1 | unet-d3w8 @ 64 px (base)" in md
  # Each kind's best cell is the one with the best validation score, not the best test score.
  rows = [dict(model="unet-d4w8", patch=64, status="ok", val_miou_fg=0.70, test_miou_fg=0.90),
          dict(model="unet-d3w16", patch=64, status="ok", val_miou_fg=0.80, test_miou_fg=0.60),
          dict(model="unet-d3w8", patch=64, status="ok", val_miou_fg=0.5, test_miou_fg=0.5)]
  ev.label_scaling(rows)
  one = next(line for line in ev.compound_summary(rows).splitlines() if "one dimension" in line)
  assert "unet-d3w16 @ 64 px (width)" in one and "0.700-0.800" in one


def test_seed_zero_alone_runs_part_of_a_grid(tmp_path):
  res = _run(tmp_path, "--grid=cpu", "--models=unet", "--seeds=0")
  assert res["cells"] == 2 and res["ok"] == 2
  assert sorted(p.name for p in (tmp_path / "res" / "efficiency_cpu_t_cells").iterdir()) == [
      "unet_p128_s0.json", "unet_p64_s0.json"]


def test_report_only_runs_nothing(tmp_path):
  _run(tmp_path, "--grid=cpu", "--models=unet", "--seeds=0", "--patches=64")
  res = _run(tmp_path, "--grid=cpu", "--models=unet,segformer_b0", "--seeds=0", "--report_only")
  assert res["cells"] == 4 and res["ok"] == 1
  md = Path(res["md"]).read_text()
  assert md.count("| not run |") == 3
  assert not (tmp_path / "res" / "efficiency_cpu_t_cells" / "segformer_b0_p64_s0.json").exists()


def test_pixel_budget_keeps_pixels_per_step_equal_across_patch_sizes():
  grid = dict(ev.GRIDS["cpu"])
  assert ev.batch_for(grid, 64) == 16 and ev.batch_for(grid, 128) == 4
  assert ev.batch_for(grid, 64) * 64**2 == ev.batch_for(grid, 128) * 128**2
  assert ev.batch_for(dict(batch=16), 128) == 16  # a grid with a fixed batch
  with pytest.raises(Exception, match="not a whole number of patches"):
    ev.batch_for(grid, 96)
  assert "26.2 Mpixel" in ev.budget_text(grid)
  # The training config a cell runs gets the same batch and the grid's lowering.
  c = ev.get_config("grid=cpu,model=unet,patch=128,seed=1")
  assert (c.batch_size, c.num_steps, c.conv_lowering, c.seed) == (4, 400, "auto", 1)


def test_cell_recorded_with_another_budget_is_rerun(tmp_path):
  args = ("--grid=cpu", "--models=unet", "--seeds=0", "--patches=64")
  _run(tmp_path, *args)
  path = tmp_path / "res" / "efficiency_cpu_t_cells" / "unet_p64_s0.json"
  rec = json.loads(path.read_text())
  assert rec["budget"]["batch"] == 16 and rec["budget"]["steps"] == 400
  row = ev.aggregate([rec])[0]
  assert row["train_mpixel_per_s"] == pytest.approx(rec["train_patches_per_s"] * 64 * 64 / 1e6)
  # Same budget: kept. A record from an older budget: not this grid's cell, so it is rerun.
  kept = path.read_text()
  _run(tmp_path, *args)
  assert path.read_text() == kept
  rec["budget"]["steps"] = 150
  rec["finished"] = "old"
  path.write_text(json.dumps(rec))
  old_run = tmp_path / "work" / "runs" / "unet_p64_s0"  # its training run, another config
  old_run.mkdir(parents=True, exist_ok=True)
  (old_run / "config.json").write_text("{}")
  assert _run(tmp_path, *args, "--report_only")["ok"] == 0  # reported as not run
  assert (old_run / "config.json").exists()  # a report touches no run
  _run(tmp_path, *args)
  assert json.loads(path.read_text())["finished"] != "old"
  # The old run is kept aside, out of the new run's way.
  assert not (old_run / "config.json").exists()
  aside = list((tmp_path / "work" / "superseded" / "runs").glob("unet_p64_s0-*/config.json"))
  assert len(aside) == 1 and aside[0].read_text() == "{}"


def test_budget_check_grid_compares_with_its_base_grid(tmp_path):
  _run(tmp_path, "--grid=cpu", "--models=unet_resnet18", "--seeds=0", "--patches=64")
  res = _run(tmp_path, "--grid=cpu_x2", "--patches=64")
  md = Path(res["md"]).read_text()
  assert "## Budget check: these cells against the same cells of `cpu`" in md
  row = next(line for line in md.splitlines() if line.startswith("| unet_resnet18_p64_s0 |"))
  assert "| 6,400 |" in row and "| 12,800 |" in row  # patches seen at 1x and 2x
  assert "segformer_b0_p64_s0 |" not in md.split("## Budget check")[1].split("##")[0]
