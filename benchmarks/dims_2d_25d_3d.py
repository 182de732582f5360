r"""2D 3-plane against 2.5D against 3D U-Net / ResNet-18 at an equal training budget (issue 28).

    python benchmarks/dims_2d_25d_3d.py --workdir=/tmp/bonejax-dims --budget=1
    python benchmarks/dims_2d_25d_3d.py --smoke --workdir=/tmp/dims-smoke --results_dir=/tmp/r

Six cells: {2d, 2.5d, 3d} x {bone, implant phantom}, one seed (0), everything but the
dimension shared:
- 2d:   `unet_resnet18` on 2D patches of P2^2 px from planes of all three axes; the test scan is
        predicted whole plane by plane along the three axes and soft-voted (3-plane);
- 2.5d: the same network taking the 2k + 1 = 5 neighbouring planes as channels (BONe's 2.5D:
        `context_slices=2`), trained and predicted as 2d (3-plane soft vote);
- 3d:   `unet3d_resnet18` (smp-3d's `Unet("resnet18")`) on P3^3 patches (a third centred on
        foreground, 3D augmentation: `configs/unet3d.py`'s recipe), predicted by sliding
        windows of W^3 (overlap 0.5, Gaussian blending).
The training budget is counted in LABELLED voxels seen: steps x batch x P2^2 (2d, 2.5d: the
centre plane's pixels; 2.5d's context planes are input, not supervision) = steps x batch x
P3^3 (3d). With the defaults both sides are 32 and every step is 65,536 labelled voxels
(64 x 32^2 or 2 x 32^3; the 3D batch stays >= 2 so that BatchNorm at the 1^3 bottleneck has
more than one value), so every cell runs the same number of steps; `--budget` scales the steps.
Shared: float32, Adam 1e-3 on a cosine (warmup 10%, down to 5%), CE + Dice, the percentile
normalisation, seed 0, validation once at the end (the final weights are tested). Each
dimension keeps its own default augmentation (2D: the trainer's default; 3D: `augment3d`'s).

The default budget (30 steps, 2.0 Mvoxel per cell) is what fits the six cells in about an hour
on 2 CPU cores shared with other jobs (load average ~15): there a 3D step of 2 x 32^3 took ~15 s
(sizing run: 20 steps of the 3D cell, 8 min) and a 2D step of 64 x 32^2 ~12 s (the first 15
steps of a 60-step 2D cell). It is far below convergence for either network: read the table as
"what each learns from the same small number of labelled voxels", not as converged accuracy.

Phantoms (`--shape`, default 64^3; 5 scans, seed 0): scan_000-002 train, scan_003
validates, scan_004 is the test scan, scored against its full labels (miou_fg = mean IoU of the
classes > 0, and each class's IoU). Speeds: training voxels/s = the trainer's steady-state
patches/s (compilation and evaluation excluded) x labelled voxels per patch; prediction
voxels/s = the test scan's voxels / the seconds of a warm prediction (the second of
`--predict_runs`, the first compiling).

Each cell runs in its own process (`--cell=DIM --phantom=KIND`, this file) and its record goes
to benchmarks/results/dims_<tag>_cells/KIND_DIM.json atomically when it is done; a rerun skips
finished cells made with the same budget (and retries failed ones). The table and a "which wins
where" paragraph computed from the records are rewritten after every cell:
benchmarks/results/dims_<tag>.{json,md}.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from bonejax.cli import runner  # noqa: E402
from bonejax.core import errors, outputs  # noqa: E402

THIS = Path(__file__).resolve()
DIMS = ("2d", "2.5d", "3d")
PHANTOMS = ("bone", "implant")
CONTEXT_25D = 2           # 2.5D: planes each side (5 input planes; BONe uses 3 to 9)
TIE = 0.01                # miou_fg differences below this are called ties (one seed)
USABLE = 0.5              # below this best test miou_fg no model segments: the ranking is of
                          # barely trained models, and the summary says so



# ---------------------------------------------------------------------------------------------
# The plan: what every cell trains on, and the equal budget.
# ---------------------------------------------------------------------------------------------


def make_plan(steps: int, budget: float, shape, p2: int, b2: int, p3: int, window3d: int,
              smoke: bool = False) -> dict[str, Any]:
  """Patch, batch and steps of each dimension, with the same labelled voxels per step.

  The 3D batch is the 2D batch's voxels over P3^3; it must be a whole number (one error line
  otherwise), so that every cell runs the same steps and sees the same voxels."""
  if smoke:
    shape, p2, b2, p3, window3d, steps, budget = (32, 32, 32), 32, 32, 32, 32, 2, 1.0
  shape = tuple(int(s) for s in shape)
  per_step = b2 * p2 * p2
  b3, rest = divmod(per_step, p3 ** 3)
  if b3 < 1 or rest:
    raise errors.UserError(f"batch2d x patch2d^2 = {per_step:,} voxels is not a whole number "
                           f"of 3D patches of {p3}^3 (choose batch2d, patch2d, patch3d so it is)")
  if p3 % 32 or window3d % 32:
    raise errors.UserError(f"patch3d={p3} and window3d={window3d} must be multiples of 32 "
                           "(the 3D U-Net's stride)")
  if min(shape) < max(p3, 32) or min(shape[1:]) < p2:
    raise errors.UserError(f"shape {shape} is smaller than a patch (2D {p2}, 3D {p3})")
  n = max(1, round(steps * budget))
  dims = {"2d": dict(model="unet_resnet18", context=0, patch=p2, batch=b2),
          "2.5d": dict(model="unet_resnet18", context=CONTEXT_25D, patch=p2, batch=b2),
          "3d": dict(model="unet3d_resnet18", context=0, patch=p3, batch=b3,
                     window=min(window3d, max(32, min(shape) // 32 * 32)))}
  for d in dims.values():
    d["steps"] = n
    d["voxels_per_step"] = per_step
    d["voxels"] = n * per_step
  return {"steps": n, "budget": budget, "base_steps": steps, "shape": list(shape),
          "num_scans": 3 if smoke else 5, "voxels_per_step": per_step,
          "voxels": n * per_step, "dims": dims, "smoke": bool(smoke)}


def budget_text(plan: dict) -> str:
  d = plan["dims"]
  return (f"{plan['steps']} steps x {plan['voxels_per_step']:,} labelled voxels "
          f"({d['2d']['batch']} x {d['2d']['patch']}^2 in 2D and 2.5D, "
          f"{d['3d']['batch']} x {d['3d']['patch']}^3 in 3D) = {plan['voxels'] / 1e6:.1f} "
          "Mvoxel per cell")


def split(num_scans: int) -> dict[str, list[str]]:
  from bonejax.phantom import scan_name
  names = [scan_name(i) for i in range(num_scans)]
  return {"train": names[:-2], "val": [names[-2]], "test": [names[-1]]}


def cell_config(plan: dict, dim: str, data: Path):
  """The training config of one cell (shared settings, then the dimension's own)."""
  import dataclasses

  import ml_collections

  from bonejax.train import augment3d, configlib
  d = plan["dims"][dim]
  s = split(plan["num_scans"])
  c = configlib.default_config()
  c.dataset, c.train_scans, c.val_scans = str(data), tuple(s["train"]), tuple(s["val"])
  c.model.name, c.model.kwargs = d["model"], {}
  c.dtype, c.conv_lowering = "float32", "xla"
  c.seed = 0
  c.patch_size, c.batch_size, c.num_steps = d["patch"], d["batch"], d["steps"]
  c.loss = dict(ce=1.0, dice=1.0)
  c.optimizer.lr = 1e-3
  c.schedule.name = "cosine"
  c.schedule.warmup_steps = d["steps"] // 10
  c.schedule.final_lr_fraction = 0.05
  c.eval_every = 0                      # validation once, at the end: the final weights
  c.checkpoint_every = max(1, d["steps"] // 2)  # a killed cell resumes from here
  c.log_every = max(1, min(25, d["steps"] // 4))
  c.early_stopping_patience = 0
  if dim == "3d":
    c.augment = ml_collections.ConfigDict(dataclasses.asdict(augment3d.AugmentConfig3d()))
    c.patches_per_scan = 64
    c.foreground = 1 / 3
    c.val_max_crops = 0
    c.val_batch_size = 2
    c.predict_window = d["window"]
    c.predict_overlap = 0.5
  else:
    c.context_slices = d["context"]
    c.axes = (0, 1, 2)
    c.val_axes = (0,)
    c.val_stride = 4
    c.val_batch_size = 8
  return c


# ---------------------------------------------------------------------------------------------
# One cell, in its own process: train, then predict and score the test scan.
# ---------------------------------------------------------------------------------------------


def make_data(root: Path, kind: str, plan: dict) -> Path:
  from bonejax import phantom
  out = root / f"data_{kind}_{'x'.join(map(str, plan['shape']))}_n{plan['num_scans']}"
  if not (out / "dataset.json").exists():
    phantom.make_dataset(out, num_scans=plan["num_scans"], shape=tuple(plan["shape"]), seed=0,
                         kind=kind, overwrite=True, progress=False)
  return out


def run_cell(plan: dict, dim: str, kind: str, root: Path, predict_runs: int,
             score_only: bool = False) -> dict[str, Any]:
  """Trains the cell's model and scores it on the test scan; `score_only`: scores the model
  the cell trained before (its run directory) and returns the scoring fields alone."""
  from bonejax.models import bundle
  from bonejax.train import trainer
  d = plan["dims"][dim]
  data = make_data(root, kind, plan)
  run_dir = root / "runs" / f"{kind}_{dim}_s{d['steps']}_{'x'.join(map(str, plan['shape']))}"
  if score_only:
    return score_cell(bundle.load_bundle(run_dir / "model"), plan, dim, data, predict_runs)
  t0 = time.perf_counter()
  tr = trainer.train(cell_config(plan, dim, data), run_dir)
  train_wall = time.perf_counter() - t0
  b = bundle.load_bundle(tr.get("model_dir", run_dir / "model"))
  from bonejax import models
  pps = tr.get("patches_per_second")
  vox_patch = d["patch"] ** (3 if dim == "3d" else 2)
  return {
      "params": models.count_params(b.model),
      "steps": tr.get("steps"), "steps_this_run": tr.get("steps_this_run"),
      "resumed_from": tr.get("resumed_from"),
      "train_patches_per_s": pps,
      "train_voxels_per_s": pps * vox_patch if pps else None,
      "train_seconds": tr.get("seconds"), "train_wall_seconds": train_wall,
      "val_miou_fg": tr.get("best_val_miou"),
      **score_cell(b, plan, dim, data, predict_runs),
      "run_dir": str(run_dir),
  }


def score_cell(b, plan: dict, dim: str, data: Path, predict_runs: int) -> dict[str, Any]:
  """The test scan predicted (3D windows, or a 3-plane soft vote), timed and scored."""
  from bonejax import predict
  from bonejax.data import store
  from bonejax.evaluate import metrics
  d = plan["dims"][dim]
  scan = store.open_scan(data / split(plan["num_scans"])["test"][0])
  raw = scan.read_image()
  if dim == "3d":
    engine = predict.make_window_engine(b)

    def once():
      return predict.predict_volume_3d(engine, raw, stats=scan.stats, window=d["window"],
                                       overlap=0.5, batch_size=2).labels
  else:
    engine = predict.make_engine(b, batch_size=8, memory_budget_gb=4.0)

    def once():
      return predict.predict_volume(engine, raw, stats=scan.stats, rule=b.normalization,
                                    planes=3, vote="soft", memory_budget_gb=4.0)
  times, labels = [], None
  for _ in range(max(1, predict_runs)):
    t = time.perf_counter()
    labels = once()
    times.append(time.perf_counter() - t)
  sc = metrics.scores(metrics.confusion_matrix(labels, scan.read_labels(), b.num_classes),
                      b.classes)
  return {
      "test_miou_fg": sc["miou_fg"], "test_miou_all": sc["miou_all"],
      "test_iou": metrics.by_class(sc["iou"], sc["classes"]),
      "predict_voxels_per_s": raw.size / times[-1], "predict_seconds": times,
      "predict_mode": "3d windows %d^3, overlap 0.5" % d["window"] if dim == "3d"
                      else "3-plane soft vote",
      "test_voxels": int(raw.size), "test_scan": scan.name,
  }


# ---------------------------------------------------------------------------------------------
# The grid: cells in subprocesses, records kept, reports rewritten after each.
# ---------------------------------------------------------------------------------------------


def cell_name(kind: str, dim: str) -> str:
  return f"{kind}_{dim}"


def plan_key(plan: dict, dim: str) -> dict[str, Any]:
  """What a record must have been made with to be reused."""
  return {"shape": plan["shape"], "num_scans": plan["num_scans"], **plan["dims"][dim]}


def run_grid(plan: dict, cells: list[tuple[str, str]], cells_dir: Path, root: Path,
             run_one, on_record=None, rescore_one=None) -> list[dict[str, Any]]:
  """Runs the cells without a finished record of the same plan; saves each record atomically.

  `run_one(kind, dim)` returns the cell's measurements (raises on failure); `on_record(records)`
  is called after every cell (the partial report). `rescore_one(kind, dim)`, where given,
  scores a finished cell's model again (its training fields kept, `rescored` dated)."""
  cells_dir.mkdir(parents=True, exist_ok=True)
  records = []
  for kind, dim in cells:
    path = cells_dir / f"{cell_name(kind, dim)}.json"
    old = json.loads(path.read_text()) if path.exists() else None
    if old and old.get("status") == "ok" and old.get("plan") == plan_key(plan, dim):
      if rescore_one is not None:
        old.update(rescore_one(kind, dim), rescored=time.strftime("%Y-%m-%d %H:%M:%S"),
                   load_rescore=common.load_average())
        outputs.atomic_write_json(path, old)
      records.append(old)
      print(f"[dims] {path.name}: done before, " + ("rescored" if rescore_one else "kept"),
            file=sys.stderr, flush=True)
      if rescore_one is not None and on_record:
        on_record(records)
      continue
    rec: dict[str, Any] = {"cell": cell_name(kind, dim), "phantom": kind, "dim": dim,
                           "plan": plan_key(plan, dim), "load_start": common.load_average()}
    t0 = time.perf_counter()
    try:
      rec.update(run_one(kind, dim))
      rec["status"] = "ok"
    except common.JobFailed as e:
      rec.update(status="failed", error=str(e), stderr_tail=e.stderr_tail[-800:])
    except Exception as e:  # pylint: disable=broad-except  (one failed cell; the others go on)
      rec.update(status="failed", error=f"{type(e).__name__}: {e}")
    rec["cell_seconds"] = time.perf_counter() - t0
    rec["load_end"] = common.load_average()
    rec["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    outputs.atomic_write_json(path, rec)
    records.append(rec)
    print(f"[dims] {rec['cell']}: {rec['status']} "
          + (f"test miou_fg {rec['test_miou_fg']:.3f}" if rec["status"] == "ok"
             else rec.get("error", "")), file=sys.stderr, flush=True)
    if on_record:
      on_record(records)
  return records


# ---------------------------------------------------------------------------------------------
# Reports: the table and the "which wins where" paragraph, both from the records.
# ---------------------------------------------------------------------------------------------


def _ok(records):
  return [r for r in records if r.get("status") == "ok"]


def classes_of(records: list[dict], kind: str) -> list[str]:
  out: list[str] = []
  for r in _ok(records):
    if r["phantom"] == kind:
      out += [c for c in r.get("test_iou", {}) if c not in out and c != "background"]
  return out


def table(records: list[dict]) -> str:
  """One table per phantom: test miou_fg, each foreground class's IoU, the speeds."""
  parts = []
  for kind in dict.fromkeys(r["phantom"] for r in records):
    cls = classes_of(records, kind)
    rows = []
    for r in (r for r in records if r["phantom"] == kind):
      ok = r.get("status") == "ok"
      rows.append({"dim": r["dim"], "fg": r.get("test_miou_fg"),
                   **{c: (r.get("test_iou") or {}).get(c) for c in cls},
                   "bg": (r.get("test_iou") or {}).get("background"),
                   "tv": r.get("train_voxels_per_s"), "pv": r.get("predict_voxels_per_s"),
                   "params": r["params"] / 1e6 if r.get("params") else None,
                   "val": r.get("val_miou_fg"),
                   "min": r["cell_seconds"] / 60 if r.get("cell_seconds") else None,
                   "load": _load_range(r),
                   "status": "ok" if ok else r.get("status") if r.get("status") == "not run"
                             else f"failed: {str(r.get('error', ''))[:60]}"})
    parts += [f"### {kind} phantom", "", common.markdown_table(
        rows, ["dim", "fg", *cls, "bg", "tv", "pv", "params", "val", "min", "load", "status"],
        ["model", "test miou_fg", *[f"IoU {c}" for c in cls], "IoU background",
         "train voxels/s", "predict voxels/s", "params (M)", "val miou_fg", "cell min",
         "load (1 min) start-end", "status"]), ""]
  return "\n".join(parts).rstrip()


def _load_range(r: dict) -> str | None:
  """The 1-minute load average at the cell's start and end: speeds of cells run under different
  loads are not comparable (the machine is shared)."""
  a, b = r.get("load_start"), r.get("load_end")
  return f"{a[0]:.1f}-{b[0]:.1f}" if a and b else None


def _best(rows: list[dict], key) -> tuple[dict, float | None]:
  """The row with the highest key(row), and its margin over the next one."""
  ranked = sorted(rows, key=key, reverse=True)
  margin = key(ranked[0]) - key(ranked[1]) if len(ranked) > 1 else None
  return ranked[0], margin


def _speed_ratio(a: float, b: float) -> str:
  return f"{a / b:.1f}x" if b else "-"


def summary(records: list[dict], tie: float = TIE) -> str:
  """Which dimension wins where, in words, computed from the finished records."""
  out = []
  ok = _ok(records)
  for kind in dict.fromkeys(r["phantom"] for r in ok):
    rows = [r for r in ok if r["phantom"] == kind]
    best, margin = _best(rows, lambda r: r["test_miou_fg"])
    if margin is None:
      out.append(f"On the {kind} phantom only {best['dim']} has finished "
                 f"(test miou_fg {best['test_miou_fg']:.3f}).")
      continue
    tied = [r["dim"] for r in sorted(rows, key=lambda r: -r["test_miou_fg"])
            if best["test_miou_fg"] - r["test_miou_fg"] < tie]
    if len(tied) > 1:
      acc = (f"{' and '.join(tied)} tie on test miou_fg (within {tie}: "
             + ", ".join(f"{r['dim']} {r['test_miou_fg']:.3f}" for r in rows) + ")")
    else:
      acc = (f"{best['dim']} wins on test miou_fg ({best['test_miou_fg']:.3f}, "
             f"+{margin:.3f} over the next; "
             + ", ".join(f"{r['dim']} {r['test_miou_fg']:.3f}" for r in rows
                         if r is not best) + ")")
    per_class = []
    for c in classes_of(records, kind):
      have = [r for r in rows if (r.get("test_iou") or {}).get(c) is not None]
      if len(have) < 2:
        continue
      cb, cm = _best(have, lambda r, c=c: r["test_iou"][c])
      if cm < tie:
        near = [r["dim"] for r in have if cb["test_iou"][c] - r["test_iou"][c] < tie]
        per_class.append(f"{c}: {' = '.join(near)} ({cb['test_iou'][c]:.3f}, within {tie})")
      else:
        per_class.append(f"{c}: {cb['dim']} ({cb['test_iou'][c]:.3f}, +{cm:.3f})")
    speeds = []
    for key, what in (("train_voxels_per_s", "trains"), ("predict_voxels_per_s", "predicts")):
      have = [r for r in rows if r.get(key)]
      if len(have) > 1:
        fast = max(have, key=lambda r: r[key])
        slow = min(have, key=lambda r: r[key])
        speeds.append(f"{fast['dim']} {what} fastest ({fast[key] / 1e3:.3g} kvoxel/s, "
                      f"{_speed_ratio(fast[key], slow[key])} {slow['dim']})")
    caveat = ("" if best["test_miou_fg"] >= USABLE else
              f" (no model segments usably at this budget: the best test miou_fg is below "
              f"{USABLE}, so this ranks barely trained models)")
    out.append(f"On the {kind} phantom {acc}{caveat}. Best per class: " + "; ".join(per_class)
               + ". " + "; ".join(speeds) + ".")
  if not out:
    return "No cell has finished yet."
  out.append(f"(One seed per cell: differences below {tie} are called ties; the speeds were "
             "measured on a shared machine.)")
  return " ".join(out)


def lscpu() -> dict[str, Any]:
  """lscpu's fields (the CPU model first) and its text, for the result files."""
  try:
    text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
  except (OSError, subprocess.SubprocessError):
    return {"text": "", "model": None}
  fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
  return {"text": text, "model": (fields.get("Model name") or "").strip() or None,
          "cpus": (fields.get("CPU(s)") or "").strip() or None}


def to_markdown(records: list[dict], plan: dict, info: dict, cpu: dict, load, cmd: str) -> str:
  done = len(_ok(records))
  return "\n".join([
      "# 2D 3-plane against 2.5D against 3D U-Net / ResNet-18 at an equal training budget", "",
      common.machine_line(info), "",
      f"CPU (lscpu): {cpu.get('model')}, {cpu.get('cpus')} CPUs listed. Load average at start / "
      f"now: {load[0]} / {load[1]} (the machine was shared with other agents' jobs: the speeds "
      "are not idle-machine speeds; their ratios are taken at different times).", "",
      f"Command: `{cmd}`", "",
      f"Budget: {budget_text(plan)}; phantoms of {plan['num_scans']} scans of "
      f"{' x '.join(map(str, plan['shape']))} (all but 2 train, 1 validation, 1 test), seed 0. "
      f"2.5D: {2 * CONTEXT_25D + 1} planes as channels. 3D predicted by windows of "
      f"{plan['dims']['3d']['window']}^3 (overlap 0.5); 2D and 2.5D by a 3-plane soft vote. "
      f"Training voxels/s count labelled voxels (the trainer's steady-state patches/s x "
      f"voxels per patch); prediction voxels/s the test scan's voxels over a warm run.", "",
      f"Cells finished: {done} of {len(records)}.", "",
      *([f"Rescored (`--rescore`: the finished models' test predictions made and scored again, "
         f"training fields kept): {', '.join(r['cell'] + ' ' + r['rescored'] for r in records if r.get('rescored'))}. "
         "Before 2026-12-07 the CPU predictor padded planes whose deepest maps were smaller "
         "than a 3x3 kernel (64-px sides) by reflection, which changed 2D and 2.5D "
         "predictions on these 64^3 scans; it no longer does.", ""]
        if any(r.get("rescored") for r in records) else []),
      table(records), "",
      "## Which wins where (computed from the table)", "",
      summary(records)])


def load_records(plan: dict, cells: list[tuple[str, str]], cells_dir: Path) -> list[dict]:
  """The saved records of `cells` made with `plan` ("not run" for the others): --report_only."""
  out = []
  for kind, dim in cells:
    path = cells_dir / f"{cell_name(kind, dim)}.json"
    old = json.loads(path.read_text()) if path.exists() else None
    if old and old.get("plan") == plan_key(plan, dim):
      out.append(old)
    else:
      out.append({"cell": cell_name(kind, dim), "phantom": kind, "dim": dim,
                  "status": "not run", "error": "not run"})
  return out


def write_report(records: list[dict], plan: dict, load, cmd: str, tag: str,
                 results_dir: Path, name: str) -> dict[str, Path]:
  """`load`: the load average at the start, and at the end (None: now)."""
  info = common.machine()
  info["tag"] = tag
  cpu = lscpu()
  load = (load[0], load[1] or common.load_average())
  md = to_markdown(records, plan, info, cpu, load, cmd)
  return common.write_results(name, {"plan": plan, "cells": records, "machine": info,
                                     "lscpu": cpu, "command": cmd,
                                     "summary": summary(records),
                                     "load_average": {"start": load[0], "end": load[1]}},
                              md, tag=tag, results_dir=results_dir)


def main(argv):
  del argv
  root = Path(_WORKDIR.value)
  root.mkdir(parents=True, exist_ok=True)
  plan = make_plan(_STEPS.value, _BUDGET.value, _SHAPE.value, _P2.value, _B2.value, _P3.value,
                   _WINDOW3D.value, _SMOKE.value)
  for d in _DIMS.value:
    if d not in DIMS:
      raise errors.UserError(f"--dims: unknown {d!r} (known: {', '.join(DIMS)})")
  for k in _PHANTOMS.value + [_PHANTOM.value]:
    if k not in PHANTOMS:
      raise errors.UserError(f"--phantoms: unknown {k!r} (known: {', '.join(PHANTOMS)})")
  if _CELL.value:
    if _CELL.value not in DIMS:
      raise errors.UserError(f"--cell: unknown {_CELL.value!r} (known: {', '.join(DIMS)})")
    return run_cell(plan, _CELL.value, _PHANTOM.value, root, _PREDICT_RUNS.value,
                    score_only=_SCORE_ONLY.value)
  tag = _TAG.value or common.machine_tag()
  results_dir = Path(_RESULTS.value)
  cells_dir = results_dir / f"{_NAME.value}_{tag}_cells"
  cmd = " ".join(["python", "benchmarks/dims_2d_25d_3d.py"] + sys.argv[1:])
  load_start = common.load_average()
  passthrough = [f"--workdir={root}", f"--steps={_STEPS.value}", f"--budget={_BUDGET.value}",
                 f"--shape={','.join(_SHAPE.value)}", f"--patch2d={_P2.value}",
                 f"--batch2d={_B2.value}", f"--patch3d={_P3.value}",
                 f"--window3d={_WINDOW3D.value}", f"--predict_runs={_PREDICT_RUNS.value}",
                 "--smoke" if _SMOKE.value else "--nosmoke"]

  def run_one(kind, dim, score_only=False):
    log = f"{cell_name(kind, dim)}{'_rescore' if score_only else ''}.log"
    return common.run_json([sys.executable, str(THIS), f"--cell={dim}", f"--phantom={kind}",
                            *(["--score_only"] if score_only else []), *passthrough],
                           timeout=_CELL_TIMEOUT.value, log=root / "logs" / log)

  def rescore_one(kind, dim):
    return run_one(kind, dim, score_only=True)

  def report(records):
    write_report(records, plan, (load_start, None), cmd, tag, results_dir, _NAME.value)

  cells = [(k, d) for k in _PHANTOMS.value for d in DIMS if d in _DIMS.value]
  if _REPORT_ONLY.value:  # the report of the saved cells, with the command that ran them
    records = load_records(plan, cells, cells_dir)
    done = _ok(records)
    old = common.result_paths(_NAME.value, tag, results_dir)["json"]
    if old.exists():
      cmd = json.loads(old.read_text()).get("command", cmd)
    load = ((done[0].get("load_start"), done[-1].get("load_end")) if done
            else (load_start, None))
  else:
    old = common.result_paths(_NAME.value, tag, results_dir)["json"]
    if _RESCORE.value and old.exists():  # the command that trained the cells, then this one
      cmd = f"{json.loads(old.read_text()).get('command', '?')}`, rescored by `{cmd}"
    records = run_grid(plan, cells, cells_dir, root, run_one, on_record=report,
                       rescore_one=rescore_one if _RESCORE.value else None)
    load = (load_start, None)
  paths = write_report(records, plan, load, cmd, tag, results_dir, _NAME.value)
  print(Path(paths["md"]).read_text())
  return {"md": str(paths["md"]), "cells": len(records),
          "ok": len(_ok(records)), "summary": summary(records)}


if __name__ == "__main__":
  # Flags only when run (tests import this module next to other benchmarks' flags).
  from absl import flags
  _WORKDIR = flags.DEFINE_string("workdir", "/tmp/bonejax-dims", "Datasets, runs, logs.")
  _STEPS = flags.DEFINE_integer("steps", 30, "Training steps at --budget=1 (each step 65,536 "
                                "labelled voxels with the default patches).")
  _BUDGET = flags.DEFINE_float("budget", 1.0, "Scale of the training budget (steps x budget).")
  _DIMS = flags.DEFINE_list("dims", list(DIMS), "Which of 2d, 2.5d, 3d to run.")
  _PHANTOMS = flags.DEFINE_list("phantoms", list(PHANTOMS), "Phantom kinds.")
  _SHAPE = flags.DEFINE_list("shape", ["64", "64", "64"], "Phantom scan shape Z,Y,X.")
  _P2 = flags.DEFINE_integer("patch2d", 32, "2D / 2.5D patch side.")
  _B2 = flags.DEFINE_integer("batch2d", 64, "2D / 2.5D patches per step.")
  _P3 = flags.DEFINE_integer("patch3d", 32, "3D patch side (a multiple of 32).")
  _WINDOW3D = flags.DEFINE_integer("window3d", 64, "3D prediction window side.")
  _PREDICT_RUNS = flags.DEFINE_integer("predict_runs", 2, "Predictions of the test scan (the "
                                       "first compiles; the last is timed).")
  _SMOKE = flags.DEFINE_bool("smoke", False, "Seconds: 3 scans of 32^3, 32-px patches, 2 steps.")
  _CELL_TIMEOUT = flags.DEFINE_float("cell_timeout", 3600, "Seconds before a cell is killed.")
  _RESULTS = flags.DEFINE_string("results_dir", str(common.RESULTS), "Where result files go.")
  _TAG = flags.DEFINE_string("tag", "", "Machine tag of the result files (default: detected).")
  _NAME = flags.DEFINE_string("name", "dims", "Result file name.")
  _CELL = flags.DEFINE_string("cell", "", "Internal: run this one dimension's cell here.")
  _PHANTOM = flags.DEFINE_string("phantom", "bone", "Internal: the cell's phantom kind.")
  _RESCORE = flags.DEFINE_bool("rescore", False, "Score finished cells' models again (their "
                               "training fields kept); cells without a record are run.")
  _SCORE_ONLY = flags.DEFINE_bool("score_only", False, "Internal: with --cell, score only.")
  _REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Run no cell: rewrite the report from "
                                   "the saved cell records.")
  runner.run(main)
