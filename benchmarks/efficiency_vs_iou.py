r"""Accuracy against cost over architectures x patch sizes (BONe's 30-experiment benchmark).

    python benchmarks/efficiency_vs_iou.py --grid=smoke       # 2 CPU cores, <= 20 min
    python benchmarks/efficiency_vs_iou.py --grid=cpu         # 6 models x 64/128 px x 2 seeds
    python benchmarks/efficiency_vs_iou.py --grid=scaling     # classic U-Net, depth x width x input
    python benchmarks/efficiency_vs_iou.py --grid=full        # the GPU grid, 27 cells
    python benchmarks/efficiency_vs_iou.py --grid=full --models=unet_resnet18 --patches=256

Every cell (model, patch size) trains on the same phantom dataset for the same budget (the same
number of patches seen: same batch, same steps), keeps the checkpoint with the best validation
miou_fg, then predicts a held-out test scan with a 3-plane soft vote and scores it. A cell
reports: parameters, forward GFLOP per patch (XLA, FLOP = 2 x MAC), training patches/s (the
trainer's own figure: steady-state steps, data pipeline included, compilation and evaluation
excluded), prediction voxels/s (warm: the median of the passes after the first, compiling one),
peak memory (each subprocess's peak RSS; on a GPU also XLA's estimate of one training step's
device memory), validation and test miou_fg.

Each cell runs as subprocesses (`launch/train.py --config=benchmarks/efficiency_vs_iou.py:...`
(this file is also the grid's training config), then this script's `--eval_bundle` mode), so a
failing cell is recorded as failed and the others go on. Per-cell records go to
`benchmarks/results/efficiency_<grid>_<machine>_cells/CELL.json`; a rerun skips cells that
finished (and retries failed ones unless --noretry_failed). Training runs live under --workdir
and resume from their checkpoints. Outputs: benchmarks/results/efficiency_<grid>_<machine>.
{csv,md,png,json}; the PNG plots test miou_fg against prediction voxels/s and training
patches/s with the Pareto fronts marked.

`--fake` replaces the cell runner by a deterministic stand-in (no training) to test the grid's
bookkeeping; `--fake_fail=MODEL` makes that model's cells fail.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from bonejax.cli import runner  # noqa: E402
from bonejax.core import errors, jsonable, outputs
from bonejax.core.progress import Progress

THIS = Path(__file__).resolve()
SMOKE_MODELS = ("unet", "unet_resnet18", "unet_resnet34", "unetpp_resnet18",
                "deeplabv3plus_resnet18", "segformer_b0")
FULL_MODELS = ("unet", "unet_resnet18", "unet_resnet34", "unet_resnet50", "unetpp_resnet18",
               "unetpp_resnet34", "deeplabv3plus_resnet18", "deeplabv3plus_resnet34",
               "segformer_b0")

# Everything a grid fixes. The training budget is `steps` x `batch` patches for every cell, or,
# in a grid with `pixels_per_step`, `steps` batches of that many pixels: every patch size then
# sees the same pixels per step and in all (16 patches of 64 px or 4 of 128 px per step), so a
# larger patch buys context, not more data.
GRIDS: dict[str, dict[str, Any]] = {
    "smoke": dict(models=SMOKE_MODELS, patches=(64, 128), batch=4, steps=24,
                  phantom=dict(num_scans=4, shape=(32, 128, 128), kind="bone", seed=0),
                  dtype="float32", lr=2e-3, warmup_steps=4, eval_every=0, checkpoint_every=0,
                  val_stride=8, predict_batch=8, predict_runs=2, cell_timeout=900),
    # The phantom-scale experiment of issue 16 on 2 CPU cores: every cell sees 26.2 Mpixel
    # (400 steps of 16 x 64^2 or 4 x 128^2 pixels: 6,400 patches of 64 px, the budget in which
    # the demo's U-Net reaches miou_fg ~0.95); each cell's validation curve (every 25 steps) is
    # kept to show whether that budget let it converge. Two seeds per cell (init and patch
    # order). bf16 with the dot lowering (config.conv_lowering=auto): on a CPU with AMX the
    # ResNet encoders' 64-px steps run 3.4-3.8x faster than float32 (benchmarks/README.md), which
    # is what makes this budget fit two CPU cores. (The first version of this grid, float32 and
    # 2,400 patches of either size, left most U-Nets still improving: superseded.)
    "cpu": dict(models=SMOKE_MODELS, patches=(64, 128), seeds=(0, 1),
                pixels_per_step=16 * 64 * 64, steps=400,
                phantom=dict(num_scans=5, shape=(128, 128, 128), kind="bone", seed=0),
                dtype="bfloat16", conv_lowering="auto", lr=1e-3, warmup_steps=20, eval_every=25,
                checkpoint_every=0, val_stride=4, predict_batch=8, predict_runs=2,
                cell_timeout=2400),
    # Scaling the U-net's compound scaling on the implant phantom (4 classes): the classic U-Net
    # at depth x width (`unet-dDwW`) x input size, one seed, the same pixel budget for every cell:
    # 1,000 steps of 65,536 pixels (16 x 64^2 or 4 x 128^2) = 65.5 Mpixel, 16,000 patches of
    # 64 px. Widths 8 / 16 (the paper: 32-112) keep the 12 cells within ~1 h on 2 CPU cores;
    # the phantom's structures are simpler than a synchrotron scan's. (The first version, 250
    # steps x 16 patches of either size, was shown too small by its budget check: superseded.)
    "scaling": dict(models=tuple(f"unet-d{d}w{w}" for w in (8, 16) for d in (3, 4, 5)),
                    patches=(64, 128), seeds=(0,), pixels_per_step=16 * 64 * 64, steps=1000,
                    phantom=dict(num_scans=5, shape=(128, 128, 128), kind="implant", seed=0),
                    dtype="float32", lr=1e-3, warmup_steps=10, eval_every=50,
                    checkpoint_every=0, val_stride=4, predict_batch=8, predict_runs=2,
                    cell_timeout=3600),
    "full": dict(models=FULL_MODELS, patches=(128, 256, 512), batch=32, steps=2000,
                 phantom=dict(num_scans=6, shape=(192, 512, 512), kind="bone", seed=0),
                 dtype="bfloat16", lr=1e-3, warmup_steps=100, eval_every=250,
                 checkpoint_every=500, val_stride=4, predict_batch=16, predict_runs=2,
                 cell_timeout=3 * 3600),
}


def budget_check(base: str, models: tuple, patches: tuple, **changes) -> dict[str, Any]:
  """A grid that trains some cells of grid `base` at another budget, seed 0, everything else
  as `base`; its report sets each cell against the same cell of `base`. A change to None
  drops that key (e.g. a fixed `batch` in place of the base's `pixels_per_step`)."""
  grid = {**GRIDS[base], "models": models, "patches": patches, "seeds": (0,),
          "check_of": base, **changes}
  return {k: v for k, v in grid.items() if v is not None}


# The budget check of `cpu`: the same cells at twice its budget (800 steps). The late-gain flag
# cannot settle convergence under a cosine schedule (the decay itself lifts the last third);
# whether a doubled budget changes the test IoU does.
GRIDS["cpu_x2"] = budget_check("cpu", ("unet_resnet18", "segformer_b0"), (64, 128), steps=800,
                               eval_every=50, cell_timeout=3600)
# The budget checks of `scaling`: two of its 64-px cells at half its budget (500 steps x 16 =
# 8,000 patches) and at twice it (2,000 steps). With the first grid's 250 steps these make a
# 1x / 2x / 4x / 8x ladder (4x = `scaling`) that shows where the returns flatten.
GRIDS["scaling_half"] = budget_check("scaling", ("unet-d3w8", "unet-d4w16"), (64,),
                                     pixels_per_step=None, batch=16, steps=500, cell_timeout=1800)
GRIDS["scaling_x2"] = budget_check("scaling", ("unet-d3w8", "unet-d4w16"), (64,), steps=2000,
                                   eval_every=100)


# ---------------------------------------------------------------------------------------------
# The training config of a cell (launch/train.py loads this file as its config).
# ---------------------------------------------------------------------------------------------


def batch_for(grid: dict, patch: int) -> int:
  """Patches per step of a cell: the grid's `batch`, or its `pixels_per_step` / patch^2."""
  if "pixels_per_step" not in grid:
    return int(grid["batch"])
  batch, rest = divmod(int(grid["pixels_per_step"]), patch * patch)
  if batch < 1 or rest:
    raise errors.UserError(f"patch {patch}: the grid's {grid['pixels_per_step']:,} pixels per step "
                        "are not a whole number of patches")
  return batch


def budget(grid: dict, patch: int) -> dict[str, Any]:
  """What a cell's training saw: a recorded cell is reused only if this still matches."""
  return {"steps": int(grid["steps"]), "batch": batch_for(grid, patch), "dtype": grid["dtype"],
          "conv_lowering": grid.get("conv_lowering", "xla"), "lr": grid["lr"],
          "warmup_steps": grid["warmup_steps"], "phantom": dict(grid["phantom"])}


def budget_text(grid: dict) -> str:
  """The budget in words, for the reports."""
  if "pixels_per_step" not in grid:
    return (f"{grid['steps']} steps x batch {grid['batch']} = "
            f"{grid['steps'] * grid['batch']:,} patches")
  per = ", ".join(f"{batch_for(grid, p)} x {p}^2" for p in grid["patches"])
  return (f"{grid['steps']} steps of {grid['pixels_per_step']:,} pixels ({per}) = "
          f"{grid['steps'] * grid['pixels_per_step'] / 1e6:.1f} Mpixel")


def parse_model(spec: str) -> tuple[str, dict[str, int]]:
  """`unet_resnet18` -> (name, {}); `unet-d4w16` -> ("unet", {"depth": 4, "width": 16})."""
  name, _, shape = spec.partition("-")
  if not shape:
    return name, {}
  d, _, w = shape.lstrip("d").partition("w")
  try:
    return name, {"depth": int(d), "width": int(w)}
  except ValueError:
    raise errors.UserError(f"model {spec!r}: expected NAME or NAME-dDEPTHwWIDTH") from None


def get_config(arg=None):
  """`--config=benchmarks/efficiency_vs_iou.py:grid=smoke,model=unet,patch=64,seed=0`."""
  from bonejax.train import configlib
  a = configlib.parse_arg(arg, grid="smoke", model="unet_resnet18", patch=64, seed=0)
  if a.grid not in GRIDS:
    raise errors.UserError(f"unknown grid {a.grid!r} (known: {', '.join(GRIDS)})")
  g = GRIDS[a.grid]
  c = configlib.default_config()
  c.model.name, kwargs = parse_model(a.model)
  if kwargs:
    c.model.kwargs = kwargs
  c.seed = int(a.seed)
  c.patch_size = int(a.patch)
  c.batch_size = batch_for(g, c.patch_size)
  c.num_steps = g["steps"]
  c.dtype = g["dtype"]
  c.conv_lowering = g.get("conv_lowering", "xla")
  c.loss = dict(ce=1.0, dice=1.0)
  c.optimizer.name = "adam"
  c.optimizer.lr = g["lr"]
  c.schedule.name = "cosine"
  c.schedule.warmup_steps = g["warmup_steps"]
  c.schedule.final_lr_fraction = 0.05
  c.eval_every = g["eval_every"]
  c.val_axes = (0,)
  c.val_stride = g["val_stride"]
  c.val_batch_size = g["predict_batch"]
  c.checkpoint_every = g["checkpoint_every"] or g["steps"]  # 0: only at the end
  c.log_every = max(1, min(50, g["steps"] // 4))
  c.best_metric = "miou_fg"
  return c


# ---------------------------------------------------------------------------------------------
# Cells.
# ---------------------------------------------------------------------------------------------


def cell_name(model: str, patch: int, seed: int | None = None) -> str:
  """`MODEL_pPATCH`, with `_sSEED` in grids that repeat cells over seeds."""
  return f"{model}_p{patch}" + ("" if seed is None else f"_s{seed}")


def grid_cells(grid: dict) -> list[tuple[str, int, int | None]]:
  """(model, patch, seed) of every cell; seed None where the grid has no seeds."""
  seeds = grid.get("seeds") or (None,)
  return [(m, p, s) for s in seeds for p in grid["patches"] for m in grid["models"]]


def read_val_curve(run_dir: Path) -> list[tuple[int, float]]:
  """(step, validation miou_fg) of every evaluation in the run's metrics.csv."""
  path = run_dir / "metrics.csv"
  if not path.exists():
    return []
  rows = csv.DictReader(io.StringIO(path.read_text()))
  return [(int(r["step"]), float(r["val_miou_fg"])) for r in rows if r.get("val_miou_fg")]


def late_gain(curve: list[tuple[int, float]], steps: int) -> float | None:
  """How much the best validation miou_fg still rose in the budget's last third.

  The convergence check of a cell: a gain below ~0.01 means more steps would not have
  changed its ranking; a larger one means the budget cut it short (the report flags it).
  """
  early = [v for s, v in curve if s <= 2 * steps // 3]
  if not early or len(early) == len(curve):
    return None
  return max(v for _, v in curve) - max(early)


def split_scans(num_scans: int) -> dict[str, list[str]]:
  """All but the last two scans train, one validates, the last is the held-out test scan."""
  from bonejax.phantom import scan_name
  if num_scans < 3:
    raise errors.UserError(f"the grid needs >= 3 phantom scans, got {num_scans}")
  names = [scan_name(i) for i in range(num_scans)]
  return {"train": names[:-2], "val": [names[-2]], "test": [names[-1]]}


def make_data(grid: dict, data_dir: Path) -> Path:
  """The grid's phantom dataset, made once (reused when dataset.json is there)."""
  if (data_dir / "dataset.json").exists():
    return data_dir
  from bonejax import phantom
  p = grid["phantom"]
  phantom.make_dataset(data_dir, num_scans=p["num_scans"], shape=p["shape"], seed=p["seed"],
                       kind=p["kind"], overwrite=True)
  return data_dir


def run_cell_real(grid_name: str, grid: dict, model: str, patch: int, data: Path,
                  run_dir: Path, log_dir: Path, timeout: float,
                  seed: int | None = None) -> dict[str, Any]:
  """Trains (launch/train.py) then evaluates (--eval_bundle) one cell in subprocesses."""
  scans = split_scans(grid["phantom"]["num_scans"])
  train_cmd = [sys.executable, str(common.REPO / "launch" / "train.py"),
               f"--config={THIS}:grid={grid_name},model={model},patch={patch},seed={seed or 0}",
               f"--workdir={run_dir}", f"--config.dataset={data}",
               f"--config.train_scans={','.join(scans['train'])}",
               f"--config.val_scans={','.join(scans['val'])}"]
  t0 = time.perf_counter()
  train = common.run_json(train_cmd, timeout=timeout, log=log_dir / "train.log")
  remaining = max(60.0, timeout - (time.perf_counter() - t0))
  eval_cmd = [sys.executable, str(THIS), f"--eval_bundle={run_dir / 'model'}",
              f"--eval_scan={data / scans['test'][0]}", f"--eval_patch={patch}",
              f"--eval_batch={grid['predict_batch']}", f"--eval_runs={grid['predict_runs']}",
              f"--eval_train_batch={batch_for(grid, patch)}"]
  ev = common.run_json(eval_cmd, timeout=remaining, log=log_dir / "eval.log")
  curve = read_val_curve(run_dir)
  return {
      "seed": seed,
      "val_curve": curve,
      "late_gain": late_gain(curve, grid["steps"]),
      "params": ev.get("params", train.get("params")),
      "gflop_fwd": ev.get("gflop_fwd"),
      "train_patches_per_s": train.get("patches_per_second"),
      "train_seconds": train.get("seconds"),
      "steps": train.get("steps"),
      "patches_seen": (train.get("steps") or 0) * batch_for(grid, patch),
      "val_miou_fg": train.get("best_val_miou"),
      "best_step": train.get("best_step"),
      "test_miou_fg": ev.get("miou_fg"),
      "test_miou_all": ev.get("miou_all"),
      "test_iou": ev.get("iou"),
      "predict_voxels_per_s": ev.get("voxels_per_second"),
      "predict_cold_s": ev.get("cold_seconds"),
      "predict_seconds": ev.get("seconds"),
      "train_peak_rss_mb": train.get("child_peak_rss_mb"),
      "predict_peak_rss_mb": ev.get("child_peak_rss_mb"),
      "train_step_device_mb": ev.get("train_step_device_mb"),
      "predict_device_mb": ev.get("peak_device_mb"),
      "test_scan": scans["test"][0],
  }


def run_cell_fake(grid_name: str, grid: dict, model: str, patch: int, data: Path, run_dir: Path,
                  log_dir: Path, timeout: float, fail: str = "",
                  seed: int | None = None) -> dict[str, Any]:
  """A deterministic stand-in for testing the bookkeeping (no jax, no training)."""
  del grid_name, data, run_dir, timeout
  log_dir.mkdir(parents=True, exist_ok=True)
  (log_dir / "fake.log").write_text("fake cell\n")
  if fail and model == fail:
    raise common.JobFailed(f"error: fake failure of {model}", 3, "")
  h = int(hashlib.sha256(f"{model}{patch}".encode()).hexdigest()[:8], 16) / 16**8
  jitter = 0.0 if seed is None else 0.01 * seed
  speed = 1e6 / (1 + 10 * h) * (128 / patch)
  return {"params": int(1e6 * (5 + 20 * h)), "gflop_fwd": 10 * h * (patch / 256) ** 2,
          "train_patches_per_s": speed / 1e3, "predict_voxels_per_s": speed,
          "seed": seed, "val_curve": [(grid["steps"] // 2, 0.4 + 0.4 * h),
                                      (grid["steps"], 0.5 + 0.4 * h)],
          "late_gain": 0.1 * h,
          "val_miou_fg": 0.5 + 0.4 * h,
          "test_miou_fg": 0.5 + 0.45 * (1 - h) * h * 4 * 0.9 + jitter,
          "test_miou_all": 0.7, "steps": grid["steps"],
          "patches_seen": grid["steps"] * batch_for(grid, patch),
          "train_peak_rss_mb": 500 + 100 * h,
          "predict_peak_rss_mb": 400.0}


def set_aside(work_dir: Path, name: str) -> None:
  """Moves a cell's training run and logs from another budget to WORKDIR/superseded/ (kept, not
  deleted: a run is hours of CPU), so the cell trains afresh under its own name."""
  stamp = time.strftime("%Y%m%d-%H%M%S")
  for kind in ("runs", "logs"):
    src = work_dir / kind / name
    if src.exists():
      dst = work_dir / "superseded" / kind / f"{name}-{stamp}"
      dst.parent.mkdir(parents=True, exist_ok=True)
      src.rename(dst)
      print(f"[efficiency] {src} was trained with another budget: moved to {dst}",
            file=sys.stderr, flush=True)


def run_grid(cells: list[tuple], runner: Callable[..., dict], *, cells_dir: Path,
             work_dir: Path, retry_failed: bool = True, report_only: bool = False,
             budget_of: Callable[[int], dict] | None = None) -> list[dict[str, Any]]:
  """Runs the cells not yet finished; each record is saved as cells_dir/CELL.json at once.

  A cell is (model, patch) or (model, patch, seed); seed None means the grid has no seeds.
  `report_only`: run nothing; cells without a record are reported as "not run".
  `budget_of(patch)`: the training budget a record must have been made with to be kept (a
  record from another budget is rerun, or reported as "not run").
  """
  cells_dir.mkdir(parents=True, exist_ok=True)
  records = []
  bar = Progress(total=len(cells), desc="efficiency", unit="cells", every_s=0)
  for cell in cells:
    model, patch, seed = (tuple(cell) + (None,))[:3]
    name = cell_name(model, patch, seed)
    seed_kw = {} if seed is None else {"seed": seed}
    path = cells_dir / f"{name}.json"
    old = json.loads(path.read_text()) if path.exists() else None
    want = None if budget_of is None else jsonable.to_jsonable(budget_of(patch))
    stale = bool(old and want is not None and old.get("budget") != want)
    if stale:
      old = None  # made with another budget: not this grid's cell
    if old and (old.get("status") == "ok" or (old.get("status") == "failed"
                                              and not retry_failed)):
      records.append(old)
      bar.update(1, extra=f"{name} {old['status']} (kept)")
      continue
    if report_only:
      records.append(old or {"cell": name, "model": model, "patch": patch, **seed_kw,
                             "status": "not run", "error": "not run"})
      bar.update(1, extra=f"{name} {records[-1]['status']}")
      continue
    if stale:  # its training run has another config, which the trainer would refuse to resume
      set_aside(work_dir, name)
    t0 = time.perf_counter()
    load_start = common.load_average()
    rec: dict[str, Any] = {"cell": name, "model": model, "patch": patch, **seed_kw}
    if want is not None:
      rec["budget"] = want
    try:
      rec.update(runner(model=model, patch=patch, run_dir=work_dir / "runs" / name,
                        log_dir=work_dir / "logs" / name, **seed_kw))
      rec["status"] = "ok"
    except common.JobFailed as e:
      rec.update(status="failed", error=str(e), stderr_tail=e.stderr_tail[-600:])
    except Exception as e:  # pylint: disable=broad-except
      rec.update(status="failed", error=f"{type(e).__name__}: {e}")
    rec["cell_seconds"] = time.perf_counter() - t0
    rec["load_start"], rec["load_end"] = load_start, common.load_average()
    rec["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    outputs.atomic_write_json(path, rec)
    records.append(rec)
    bar.update(1, extra=f"{name} {rec['status']}"
               + (f" test miou_fg {common.fmt(rec.get('test_miou_fg'))}" if rec["status"] == "ok"
                  else f": {rec.get('error')}"))
  bar.close()
  return records


# ---------------------------------------------------------------------------------------------
# Reports: Pareto fronts, CSV, Markdown, PNG.
# ---------------------------------------------------------------------------------------------

CSV_COLUMNS = ("cell", "model", "patch", "seed", "status", "params", "gflop_fwd",
               "train_patches_per_s", "predict_voxels_per_s", "train_peak_rss_mb",
               "predict_peak_rss_mb", "train_step_device_mb", "val_miou_fg", "test_miou_fg",
               "test_miou_all", "late_gain", "patches_seen", "steps", "best_step",
               "train_seconds", "predict_cold_s", "pareto_predict", "pareto_train", "error")
LATE_GAIN_LIMIT = 0.01  # best validation miou_fg rising more than this in the last third: cut short
_MEAN_KEYS = ("params", "gflop_fwd", "train_patches_per_s", "predict_voxels_per_s",
              "train_peak_rss_mb", "predict_peak_rss_mb", "train_step_device_mb", "val_miou_fg",
              "test_miou_fg", "test_miou_all", "late_gain")


def pareto(records: list[dict], x: str, y: str = "test_miou_fg") -> set[str]:
  """Cells no other cell beats on both x and y (higher is better for both)."""
  pts = [(r[x], r[y], r["cell"]) for r in records
         if r.get("status") == "ok" and r.get(x) is not None and r.get(y) is not None]
  front = set()
  for xi, yi, ci in pts:
    if not any(xj >= xi and yj >= yi and (xj > xi or yj > yi) for xj, yj, _ in pts):
      front.add(ci)
  return front


def aggregate(records: list[dict]) -> list[dict[str, Any]]:
  """One row per (model, patch): means over the seeds that finished, and the spread.

  `test_spread` is half the range of test miou_fg over seeds (with two seeds: |a - b| / 2);
  per-class test IoUs are averaged too. A row is ok when at least one seed finished.
  """
  groups: dict[tuple[str, int], list[dict]] = {}
  for r in records:
    groups.setdefault((r["model"], r["patch"]), []).append(r)
  rows = []
  for (model, patch), rs in groups.items():
    ok = [r for r in rs if r.get("status") == "ok"]
    row: dict[str, Any] = {"cell": cell_name(model, patch), "model": model, "patch": patch,
                           "seeds": len(ok), "seeds_planned": len(rs),
                           "status": "ok" if ok else "failed",
                           "error": "; ".join(str(r.get("error", ""))[:80] for r in rs
                                              if r.get("status") != "ok")}
    for k in _MEAN_KEYS:
      vals = [r[k] for r in ok if r.get(k) is not None]
      row[k] = sum(vals) / len(vals) if vals else None
    # Training speed in pixels: patches of different sizes are different amounts of work and
    # data (the cpu grid's budget is counted in pixels for the same reason).
    row["train_mpixel_per_s"] = (row["train_patches_per_s"] * patch * patch / 1e6
                                 if row.get("train_patches_per_s") else None)
    tests = [r["test_miou_fg"] for r in ok if r.get("test_miou_fg") is not None]
    row["test_spread"] = (max(tests) - min(tests)) / 2 if len(tests) > 1 else None
    gains = [r["late_gain"] for r in ok if r.get("late_gain") is not None]
    row["max_late_gain"] = max(gains) if gains else None
    iou: dict[str, list[float]] = {}
    for r in ok:
      for c, v in (r.get("test_iou") or {}).items():
        iou.setdefault(c, []).append(v)
    row["test_iou"] = {c: sum(v) / len(v) for c, v in iou.items()}
    rows.append(row)
  return rows


def to_csv(records: list[dict]) -> str:
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
  w.writeheader()
  for r in records:
    w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
  return buf.getvalue()


def _test_cell(r: dict) -> str:
  t = r.get("test_miou_fg")
  if t is None:
    return "-"
  spread = r.get("test_spread")
  return f"{t:.3f}" + (f" ± {spread:.3f}" if spread is not None else "")


def budget_check_table(records: list[dict], base: dict[str, dict], base_grid: str) -> str:
  """Each cell at this grid's budget next to the same cell of `base_grid` (its records by name)."""
  out = []
  for r in records:
    b = base.get(r["cell"])
    if r.get("status") != "ok" or not b or b.get("status") != "ok":
      continue
    delta = (r["test_miou_fg"] - b["test_miou_fg"]
             if r.get("test_miou_fg") is not None and b.get("test_miou_fg") is not None else None)
    out.append({"cell": r["cell"], "base_patches": b.get("patches_seen"),
                "base_test": b.get("test_miou_fg"), "patches": r.get("patches_seen"),
                "test": r.get("test_miou_fg"), "delta": delta,
                "base_val": b.get("val_miou_fg"), "val": r.get("val_miou_fg")})
  if not out:
    return f"No cell of `{base_grid}` with the same name has finished yet."
  return common.markdown_table(
      out, ["cell", "base_patches", "base_val", "base_test", "patches", "val", "test", "delta"],
      ["cell", f"`{base_grid}` patches", "val miou_fg", "test miou_fg", "patches here",
       "val miou_fg", "test miou_fg", "test change"])


def _summary_table(rows: list[dict]) -> str:
  out = []
  for r in rows:
    mem = max(r.get("train_peak_rss_mb") or 0, r.get("predict_peak_rss_mb") or 0) / 1024
    gain = r.get("max_late_gain")
    out.append({
        "model": r["model"], "patch": r["patch"],
        "params": r.get("params") / 1e6 if r.get("params") else None,
        "gflop": r.get("gflop_fwd"), "tps": r.get("train_patches_per_s"),
        "tmps": r.get("train_mpixel_per_s"),
        "mvps": r["predict_voxels_per_s"] / 1e6 if r.get("predict_voxels_per_s") else None,
        "mem": mem or None,
        "dev": r.get("train_step_device_mb") / 1024 if r.get("train_step_device_mb") else None,
        "val": r.get("val_miou_fg"), "test": _test_cell(r),
        "seeds": f"{r.get('seeds', 1)}/{r.get('seeds_planned', 1)}",
        "conv": ("-" if gain is None
                 else "yes" if gain <= LATE_GAIN_LIMIT else f"no (+{gain:.3f})"),
        "front": ("P" if r.get("pareto_predict") else "") + ("T" if r.get("pareto_train") else ""),
        "status": "ok" if r.get("status") == "ok" else
                  ("not run" if r.get("error") == "not run" else
                   f"failed: {r.get('error', '')[:60]}"),
    })
  cols = ["model", "patch", "params", "gflop", "tps", "tmps", "mvps", "mem", "dev", "val", "test",
          "seeds", "conv", "front", "status"]
  heads = ["model", "patch", "params (M)", "GFLOP/patch", "train patches/s", "train Mpixel/s",
           "predict Mvoxel/s",
           "peak RSS (GB)", "train step device (GB)", "val miou_fg", "test miou_fg",
           "seeds", "plateaued", "Pareto", "status"]
  return common.markdown_table(out, cols, heads)


def _curve_table(records: list[dict]) -> str:
  """Each cell's validation curve: the evidence that its budget was (or was not) enough."""
  out = []
  for r in records:
    if r.get("status") != "ok":
      continue
    curve = r.get("val_curve") or []
    out.append({"cell": r["cell"], "best": r.get("best_step"),
                "curve": " ".join(f"{v:.3f}" for _, v in curve) or "-",
                "gain": r.get("late_gain"), "test": r.get("test_miou_fg")})
  return common.markdown_table(out, ["cell", "best", "curve", "gain", "test"],
                               ["cell", "best step", "validation miou_fg at each evaluation",
                                "gain in the last third", "test miou_fg"])


def class_table(rows: list[dict]) -> str:
  """Per-class test IoU against forward GFLOP (Scaling the U-net's view), cheapest first."""
  classes = []
  for r in rows:
    for c in r.get("test_iou") or {}:
      if c not in classes and c != "background":
        classes.append(c)
  out = []
  for r in sorted((r for r in rows if r.get("status") == "ok"),
                  key=lambda r: r.get("gflop_fwd") or 0):
    out.append({"model": r["model"], "patch": r["patch"], "gflop": r.get("gflop_fwd"),
                "scaled": scaled_dims(r), **{c: (r.get("test_iou") or {}).get(c) for c in classes},
                "fg": r.get("test_miou_fg")})
  return common.markdown_table(out, ["model", "patch", "gflop", "scaled", *classes, "fg"],
                               ["model", "input", "GFLOP/patch", "scaled from the base",
                                *[f"IoU {c}" for c in classes], "test miou_fg"])


def scaled_dims(row: dict) -> str:
  """Which of depth / width / input a scaling-grid cell scales above the grid's smallest
  (`label_scaling` writes it; "" outside scaling grids)."""
  return row.get("scaled", "")


def label_scaling(rows: list[dict]) -> None:
  """Sets each row's `scaled`: the dimensions it scales above the grid's smallest depth, width
  and input ("base" for none), when every model of the grid is a `unet-dDwW`."""
  kws = [(parse_model(r["model"])[1], r["patch"]) for r in rows]
  if not kws or not all(k for k, _ in kws):
    return
  base = {"depth": min(k["depth"] for k, _ in kws), "width": min(k["width"] for k, _ in kws),
          "input": min(p for _, p in kws)}
  for r, (kw, patch) in zip(rows, kws):
    dims = [d for d, v in (("depth", kw["depth"]), ("width", kw["width"]), ("input", patch))
            if v > base[d]]
    r["scaled"] = " + ".join(dims) if dims else "base"


def compound_summary(rows: list[dict]) -> str:
  """The best cell per kind of scaling, chosen on validation miou_fg (choosing on the test scan
  would select on what is being measured), with its test miou_fg and the GFLOP it costs: does
  scaling all three dimensions together beat scaling one (Scaling the U-net's finding)? The
  range of validation miou_fg within each kind shows how much the choice matters."""
  kinds: dict[str, list[dict]] = {}
  for r in rows:
    if r.get("status") != "ok" or r.get("test_miou_fg") is None:
      continue
    kind = scaled_dims(r)
    n = 0 if kind == "base" else kind.count("+") + 1
    key = {0: "base", 1: "one dimension", 2: "two dimensions", 3: "all three"}[n]
    kinds.setdefault(key, []).append(r)
  out = []
  for k in ("base", "one dimension", "two dimensions", "all three"):
    if k not in kinds:
      continue
    cells = kinds[k]
    b = max(cells, key=lambda r: r.get("val_miou_fg") or 0.0)
    vals = [r.get("val_miou_fg") for r in cells if r.get("val_miou_fg") is not None]
    out.append({"kind": k, "n": len(cells),
                "cell": f"{b['model']} @ {b['patch']} px ({scaled_dims(b)})",
                "gflop": b.get("gflop_fwd"), "val": b.get("val_miou_fg"),
                "range": f"{min(vals):.3f}-{max(vals):.3f}" if vals else "-",
                "test": b.get("test_miou_fg")})
  return common.markdown_table(
      out, ["kind", "n", "cell", "gflop", "val", "range", "test"],
      ["scaling", "cells", "best cell by validation", "GFLOP/patch", "val miou_fg",
       "val miou_fg of the kind's cells", "test miou_fg"])


def _load_line(records: list[dict], load) -> str:
  """The machine's load while cells ran (each record keeps its own), and during this report."""
  ends = [r["load_end"][0] for r in records if r.get("load_end")]
  cells = (f"1-min load average at the end of each cell: {min(ends)}-{max(ends)} "
           f"({len(ends)} cells recorded it). " if ends else "")
  return cells + f"This invocation's load average at start / end: {load[0]} / {load[1]}."


def to_markdown(rows: list[dict], records: list[dict], grid_name: str, grid: dict, info: dict,
                load, base_records: dict[str, dict] | None = None) -> str:
  p = grid["phantom"]
  seeds = grid.get("seeds")
  lines = [f"# Efficiency vs IoU: grid `{grid_name}`, {info['tag']}", "",
           common.machine_line(info), "", _load_line(records, load),
           "", f"Phantom `{p['kind']}`: {p['num_scans']} scans of "
           f"{'x'.join(map(str, p['shape']))} (train {p['num_scans'] - 2}, validation 1, test 1)."
           f" Same budget for every cell: {budget_text(grid)}; {grid['dtype']}"
           + (f" (convolutions: {grid['conv_lowering']} lowering)"
              if grid.get("conv_lowering", "xla") != "xla" else "")
           + f"; Adam lr {grid['lr']} "
           "cosine; CE + Dice; best checkpoint by validation miou_fg. Test: 3-plane soft vote on "
           "the held-out scan. Pareto: P = on the front of test miou_fg vs prediction voxels/s, "
           "T = vs training Mpixel/s (patches/s x patch^2)."
           + (f" Seeds {', '.join(map(str, seeds))}: test miou_fg is the mean ± half the range "
              "over seeds; the other columns are means." if seeds and len(seeds) > 1 else "")
           + f" Plateaued: the best validation miou_fg rose by at most {LATE_GAIN_LIMIT} in the "
           "budget's last third (per cell curves below); `no (+gain)` marks a cell the budget "
           "cut short, whose IoU understates the model.", "", _summary_table(rows)]
  if any(parse_model(r["model"])[1] for r in rows):
    lines += ["", "## Per-class test IoU against cost", "", class_table(rows), "",
              "## Scaling one dimension or all three", "", compound_summary(rows)]
  if grid.get("check_of"):
    lines += ["", "## Budget check: these cells against the same cells of "
              f"`{grid['check_of']}`",
              "", budget_check_table(records, base_records or {}, grid["check_of"])]
  lines += ["", "## Validation curves", "", _curve_table(records)]
  return "\n".join(lines)


def _save(fig, path: Path, title: str) -> None:
  """Titles, lays out and writes the figure atomically (temporary file, then rename)."""
  import matplotlib.pyplot as plt
  fig.suptitle(title)
  fig.tight_layout()
  tmp = path.with_name(f".{path.name}.tmp.png")
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)


def to_png(records: list[dict], path: Path, title: str) -> bool:
  ok = [r for r in records if r.get("status") == "ok" and r.get("test_miou_fg") is not None]
  if not ok:
    return False
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  models = sorted({r["model"] for r in ok})
  patches = sorted({r["patch"] for r in ok})
  colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(models)}
  markers = {p: "osD^v<>"[i % 7] for i, p in enumerate(patches)}
  fig, axes = plt.subplots(1, 2, figsize=(15, 5.2))
  for ax, key, label, flag in ((axes[0], "predict_voxels_per_s", "prediction voxels/s "
                                "(3-plane soft vote)", "pareto_predict"),
                               (axes[1], "train_mpixel_per_s", "training Mpixel/s "
                                "(patches/s x patch^2)",
                                "pareto_train")):
    pts = [r for r in ok if r.get(key)]
    for r in pts:
      ax.scatter(r[key], r["test_miou_fg"], color=colors[r["model"]], marker=markers[r["patch"]],
                 s=70 if r.get(flag) else 40, edgecolors="black" if r.get(flag) else "none",
                 linewidths=1.2, zorder=3)
      if r.get("test_spread"):
        ax.errorbar(r[key], r["test_miou_fg"], yerr=r["test_spread"], color=colors[r["model"]],
                    lw=1, capsize=2, zorder=2)
    front = sorted((r for r in pts if r.get(flag)), key=lambda r: r[key])
    if front:
      ax.plot([r[key] for r in front], [r["test_miou_fg"] for r in front], "k--", lw=1,
              zorder=2, label="Pareto front")
      for r in front:
        ax.annotate(r["cell"], (r[key], r["test_miou_fg"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    if pts and min(r[key] for r in pts) > 0:
      ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("test miou_fg")
    ax.grid(alpha=0.3)
  handles = [plt.Line2D([], [], color=colors[m], marker="o", ls="", label=m) for m in models]
  handles += [plt.Line2D([], [], color="gray", marker=markers[p], ls="", label=f"{p} px")
              for p in patches]
  handles += [plt.Line2D([], [], color="k", ls="--", label="Pareto front")]
  axes[1].legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
  _save(fig, path, title)
  return True


def to_class_png(rows: list[dict], path: Path, title: str) -> bool:
  """Per-class test IoU against forward GFLOP/patch, one panel per foreground class."""
  ok = [r for r in rows if r.get("status") == "ok" and r.get("test_iou") and r.get("gflop_fwd")]
  classes = [c for c in (ok[0]["test_iou"] if ok else {}) if c != "background"]
  if not classes:
    return False
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  kinds = ["base", "one dimension", "two dimensions", "all three"]
  colors = dict(zip(kinds, ("black", "tab:blue", "tab:orange", "tab:red")))
  fig, axes = plt.subplots(1, len(classes), figsize=(5 * len(classes), 4.4), squeeze=False)
  for ax, c in zip(axes[0], classes):
    for r in ok:
      dims = scaled_dims(r)
      n = 0 if dims == "base" else dims.count("+") + 1
      ax.scatter(r["gflop_fwd"], r["test_iou"].get(c), color=colors[kinds[n]], s=40, zorder=3)
      ax.annotate(f"{r['model'].partition('-')[2]} {r['patch']}",
                  (r["gflop_fwd"], r["test_iou"].get(c)), textcoords="offset points",
                  xytext=(3, 3), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("forward GFLOP / patch")
    ax.set_ylabel(f"test IoU: {c}")
    ax.grid(alpha=0.3)
  axes[0][-1].legend(handles=[plt.Line2D([], [], color=colors[k], marker="o", ls="",
                                         label=f"scaled: {k}") for k in kinds], fontsize=8)
  _save(fig, path, title)
  return True


# ---------------------------------------------------------------------------------------------
# --eval_bundle: one cell's test evaluation, in its own process.
# ---------------------------------------------------------------------------------------------


def eval_bundle(bundle_dir: str, scan_dir: str, patch: int, batch: int, runs: int,
                train_batch: int, step_memory: bool | None) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp
  from bonejax import models, predict
  from bonejax.data import store
  from bonejax.evaluate import metrics
  from bonejax.models import bundle
  gpu = jax.default_backend() != "cpu"
  dtype = jnp.bfloat16 if gpu else jnp.float32
  b = bundle.load_bundle(bundle_dir, dtype=dtype)
  scan = store.open_scan(scan_dir)
  raw = scan.read_image()
  budget = 16.0  # GB: the test scan stays in memory (the predictor's default is 4)
  engine = predict.make_engine(b.model, in_channels=b.in_channels, batch_size=batch,
                               memory_budget_gb=budget)
  times, labels = [], None
  for _ in range(max(1, runs)):
    t0 = time.perf_counter()
    labels = predict.predict_volume(engine, raw, stats=scan.stats, rule=b.normalization,
                                    planes=3, vote="soft", memory_budget_gb=budget)
    times.append(time.perf_counter() - t0)
  warm = times[1:] or times
  sc = metrics.scores(metrics.confusion_matrix(labels, scan.read_labels(), b.num_classes),
                      b.classes)
  out = {"miou_fg": sc["miou_fg"], "miou_all": sc["miou_all"],
         "iou": metrics.by_class(sc["iou"], sc["classes"]),
         "voxels_per_second": raw.size / common.median(warm), "seconds": common.median(warm),
         "cold_seconds": times[0], "run_seconds": times, "dtype": jnp.dtype(dtype).name,
         "params": models.count_params(b.model),
         "gflop_fwd": models.forward_gflops(b.model, patch, b.in_channels),
         "peak_device_mb": common.jax_peak_device_mb(), "peak_rss_mb": common.peak_rss_mb()}
  if step_memory if step_memory is not None else gpu:
    model = common.bonejax_model(b.meta["model"], jnp.dtype(dtype).name,
                                 num_classes=b.num_classes, in_channels=b.in_channels,
                                 **b.meta.get("model_kwargs", {}))
    step, state, _ = common.bonejax_train_step(model)
    x = jax.ShapeDtypeStruct((train_batch, patch, patch, b.in_channels), jnp.float32)
    y = jax.ShapeDtypeStruct((train_batch, patch, patch), jnp.int32)
    out["train_step_device_mb"] = common.xla_memory_mb(step, state, x, y)
  return out


# ---------------------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------------------


def main(argv):
  del argv
  if _EVAL_BUNDLE.value:
    return eval_bundle(_EVAL_BUNDLE.value, _EVAL_SCAN.value, _EVAL_PATCH.value, _EVAL_BATCH.value,
                       _EVAL_RUNS.value, _EVAL_TRAIN_BATCH.value,
                       {"auto": None, "yes": True, "no": False}[_STEP_MEMORY.value])
  if _GRID.value not in GRIDS:
    raise errors.UserError(f"--grid={_GRID.value!r}: one of {', '.join(GRIDS)}")
  grid = dict(GRIDS[_GRID.value])
  if _MODELS.value:
    grid["models"] = tuple(_MODELS.value)
  if _PATCHES.value:
    grid["patches"] = tuple(errors.parse_ints(",".join(_PATCHES.value), name="patches"))
  if _SEEDS.value:
    # Not errors.parse_ints: that one wants sizes (positive), and seed 0 is a seed.
    if not all(v.strip().isdigit() for v in _SEEDS.value):
      raise errors.UserError(f"--seeds={','.join(_SEEDS.value)}: non-negative integers")
    grid["seeds"] = tuple(int(v) for v in _SEEDS.value)
  for patch in grid["patches"]:
    batch_for(grid, patch)  # a patch size the budget cannot split: one line, nothing written
  if not _FAKE.value:
    from bonejax import models as models_lib
    unknown = [m for m in grid["models"] if parse_model(m)[0] not in models_lib.MODEL_NAMES]
    if unknown:
      raise errors.UserError(f"unknown model(s) {', '.join(unknown)}; known: "
                          f"{', '.join(models_lib.MODEL_NAMES)}")
  tag = _TAG.value or common.machine_tag()
  stem = f"efficiency_{_GRID.value}"
  results_dir = Path(_RESULTS.value)
  cells_dir = results_dir / f"{stem}_{tag}_cells"
  work = Path(_WORKDIR.value or f"/tmp/bonejax-efficiency/{_GRID.value}_{tag}")
  load_start = common.load_average()
  cells = grid_cells(grid)
  timeout = _CELL_TIMEOUT.value or grid["cell_timeout"]

  if _FAKE.value:
    data = work / "data"

    def runner(**kw):
      return run_cell_fake(_GRID.value, grid, data=data, timeout=timeout, fail=_FAKE_FAIL.value,
                           **kw)
  else:
    data = make_data(grid, Path(_DATA.value) if _DATA.value else work / "data")

    def runner(**kw):
      return run_cell_real(_GRID.value, grid, data=data, timeout=timeout, **kw)

  records = run_grid(cells, runner, cells_dir=cells_dir, work_dir=work,
                     retry_failed=_RETRY.value, report_only=_REPORT_ONLY.value,
                     budget_of=lambda patch: budget(grid, patch))
  rows = aggregate(records)
  label_scaling(rows)
  front_p = pareto(rows, "predict_voxels_per_s")
  front_t = pareto(rows, "train_mpixel_per_s")
  for r in rows + records:
    key = cell_name(r["model"], r["patch"])
    r["pareto_predict"] = key in front_p
    r["pareto_train"] = key in front_t
  info = common.machine()
  info["tag"] = tag
  load = (load_start, common.load_average())
  paths = common.result_paths(stem, tag, results_dir)
  base_records = None
  if grid.get("check_of"):
    base_dir = results_dir / f"efficiency_{grid['check_of']}_{tag}_cells"
    base_records = {p.stem: json.loads(p.read_text()) for p in sorted(base_dir.glob("*.json"))}
  md = to_markdown(rows, records, _GRID.value, grid, info, load, base_records)
  print(md)
  outputs.atomic_write_text(paths["csv"], to_csv(records))
  outputs.atomic_write_text(paths["md"], md + "\n")
  png = to_png(rows, paths["png"], f"bonejax efficiency vs IoU: grid {_GRID.value}, {tag}")
  class_png = None
  if any(parse_model(r["model"])[1] for r in rows):
    class_png = paths["png"].with_name(paths["png"].stem + "_classes.png")
    if not to_class_png(rows, class_png, f"bonejax scaling grid {_GRID.value}: per-class test "
                        f"IoU vs cost, {tag}"):
      class_png = None
  grid_json = {k: (list(v) if isinstance(v, tuple) else v) for k, v in grid.items()}
  common.write_results(stem, {"grid": _GRID.value, "config": grid_json, "cells": records,
                              "summary": rows, "fake": _FAKE.value,
                              "load_average": {"start": load[0], "end": load[1]},
                              "machine": info}, None, tag=tag, results_dir=results_dir)
  n_ok = sum(r.get("status") == "ok" for r in records)
  return {"csv": paths["csv"], "md": paths["md"], "png": paths["png"] if png else None,
          "class_png": class_png,
          "json": paths["json"], "cells": len(records), "ok": n_ok,
          "failed": [r["cell"] for r in records if r.get("status") != "ok"],
          "pareto_predict": sorted(front_p)}


if __name__ == "__main__":
  from absl import flags
  _GRID = flags.DEFINE_string("grid", "smoke",
                              "smoke | cpu | cpu_x2 | scaling | scaling_half | scaling_x2 | full.")
  _MODELS = flags.DEFINE_list("models", [], "Override the grid's models.")
  _PATCHES = flags.DEFINE_list("patches", [], "Override the grid's patch sizes.")
  _SEEDS = flags.DEFINE_list("seeds", [], "Override the grid's seeds (cells of other seeds "
                             "already recorded stay out of this run's report).")
  _WORKDIR = flags.DEFINE_string("workdir", "", "Training runs and logs (default "
                                 "/tmp/bonejax-efficiency/GRID_MACHINE).")
  _DATA = flags.DEFINE_string("data", "", "Use this dataset instead of making the grid's "
                              "phantom (needs the grid's scan names).")
  _RESULTS = flags.DEFINE_string("results_dir", str(common.RESULTS), "Where result files go.")
  _TAG = flags.DEFINE_string("tag", "", "Machine tag of the result files (default: detected).")
  _RETRY = flags.DEFINE_bool("retry_failed", True, "Rerun cells recorded as failed.")
  _CELL_TIMEOUT = flags.DEFINE_integer("cell_timeout", 0, "Seconds per cell (0: the grid's).")
  _REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Run no cell: write the reports of "
                                    "the cells recorded so far (the others: not run).")
  _FAKE = flags.DEFINE_bool("fake", False, "Fake cell runner (tests the bookkeeping only).")
  _FAKE_FAIL = flags.DEFINE_string("fake_fail", "", "With --fake: this model's cells fail.")
  _EVAL_BUNDLE = flags.DEFINE_string("eval_bundle", "", "Internal: evaluate this bundle.")
  _EVAL_SCAN = flags.DEFINE_string("eval_scan", "", "Internal: the test scan.")
  _EVAL_PATCH = flags.DEFINE_integer("eval_patch", 256, "Internal: patch for GFLOP/patch.")
  _EVAL_BATCH = flags.DEFINE_integer("eval_batch", 8, "Internal: planes per predictor call.")
  _EVAL_RUNS = flags.DEFINE_integer("eval_runs", 2, "Internal: prediction passes.")
  _EVAL_TRAIN_BATCH = flags.DEFINE_integer("eval_train_batch", 32, "Internal: batch for the "
                                           "train-step memory estimate.")
  _STEP_MEMORY = flags.DEFINE_enum("step_memory", "auto", ["auto", "yes", "no"],
                                   "Internal: XLA memory estimate of a training step "
                                   "(auto: on GPUs).")
  runner.run(main)
