r"""Sparse against full labels on the bone or implant phantom (issue 28), same steps, same seed.

    python benchmarks/sparse_labels.py --workdir=/tmp/bonejax-sparse --steps=300 --batch=8
    python benchmarks/sparse_labels.py --kind=implant --workdir=/tmp/bonejax-sparse-implant \
        --steps=400 --batch=8 --name=sparse_labels_implant

A phantom of 5 scans (96 x 128 x 128, seed 0: for bone, the demo's data): scan_000-002 train,
scan_003 validates (labelled by the same rule as the training scans), scan_004 is the test
scan, predicted whole with 3-plane soft voting and scored against its full labels. Variants
(`--variants`), each a copy of the dataset whose training and validation labels keep only:
- full: every voxel;
- every10 / every20: the planes z, y or x = 5 mod 10 (10 mod 20) of all three axes;
- zonly10: the planes z = 5 mod 10 only (one axis);
every other voxel is the dataset's unlabelled value 255. Each trains configs/demo.py (U-Net
depth 4 width 16, 64-px patches) for `--steps` steps of `--batch` patches: the demo's 400 x 16
would take ~20 min per variant on this shared machine, so the budget is cut (say so with the
numbers). The table reports test miou_fg, per-class IoU, the gap to full labels, and the
border band (outer 2 voxels) against the interior (bonejax.evaluate.border).

Writes benchmarks/results/sparse_labels_<machine>.{json,md}; each variant's run and score stay in
WORKDIR/<variant> (a rerun reuses finished variants).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402
from bonejax.cli import runner  # noqa: E402
from bonejax.core import outputs  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/bonejax-sparse", "Datasets and runs.")
_STEPS = flags.DEFINE_integer("steps", 300, "Training steps per variant.")
_BATCH = flags.DEFINE_integer("batch", 8, "Patches per step.")
_VARIANTS = flags.DEFINE_list("variants", ["full", "every10", "every20", "zonly10"],
                              "Label variants to train.")
_RESULTS = flags.DEFINE_string("results_dir", str(common.RESULTS), "Where result files go.")
_TAG = flags.DEFINE_string("tag", "", "Machine tag of the result files (default: detected).")
_NAME = flags.DEFINE_string("name", "sparse_labels", "Result file name.")
_KIND = flags.DEFINE_enum("kind", "bone", ["bone", "implant"], "Phantom kind.")

SHAPE = (96, 128, 128)
NUM_SCANS = 5
UNLABELLED = 255


def keep_mask(shape, rule: str):
  """bool (Z, Y, X): the voxels a variant keeps labelled."""
  import numpy as np
  if rule in ("full", "full_noedge"):
    return np.ones(shape, bool)
  step = {"every10": 10, "every20": 20, "zonly10": 10}[rule]
  z, y, x = (np.arange(n) % step == step // 2 for n in shape)
  if rule == "zonly10":
    return np.broadcast_to(z[:, None, None], shape).copy()
  return z[:, None, None] | y[None, :, None] | x[None, None, :]


def make_variant(full: Path, out: Path, rule: str, sparse_scans) -> None:
  """A copy of the dataset `full` whose `sparse_scans` keep the labels of `rule` only."""
  from bonejax.data import store
  if (out / store.DATASET_JSON).exists():
    return
  with outputs.atomic_output(out, overwrite=True) as tmp:
    shutil.copytree(full, tmp, dirs_exist_ok=True)
    ds = store.open_dataset(tmp)
    for name in sparse_scans:
      arr = store.open_array(Path(tmp) / name / "labels", write=True)
      lab = arr.read().result()
      lab[~keep_mask(lab.shape, rule)] = UNLABELLED
      arr.write(lab).result()
    store.write_dataset_json(tmp, ds.classes, ds.scans, UNLABELLED)


def run_variant(root: Path, full: Path, rule: str, steps: int, batch: int,
                edge_margin: float | None = None) -> dict:
  """Trains one variant (reusing a finished one) and scores the test scan."""
  import numpy as np
  from bonejax import predict
  from bonejax.data import store
  from bonejax.evaluate import border, metrics
  from bonejax.models import bundle
  from bonejax.train import trainer

  work = root / rule
  done = work / "score.json"
  if done.exists():
    return json.loads(done.read_text())
  ds_full = store.open_dataset(full)
  train, val, test = ds_full.scans[:3], ds_full.scans[3:4], ds_full.scans[4]
  data = full if rule in ("full", "full_noedge") else root / f"data_{rule}"
  if data != full:
    make_variant(full, data, rule, train + val)
  sys.path.insert(0, str(common.REPO / "configs"))
  import demo as demo_config  # configs/demo.py
  c = demo_config.get_config()
  with c.unlocked():
    c.dataset, c.train_scans, c.val_scans = str(data), tuple(train), tuple(val)
    c.num_steps, c.batch_size = int(steps), int(batch)
    c.eval_every = c.checkpoint_every = max(1, steps // 4)
    c.schedule.warmup_steps = min(25, steps // 10)
    if edge_margin is not None:
      c.edge_margin = float(edge_margin)  # 0: the "before the edge fix" run, crops inside
  t = time.perf_counter()
  run = trainer.train(c, work / "run")
  train_s = time.perf_counter() - t
  b = bundle.load_bundle(run.get("model_dir", work / "run" / "model"))
  scan = ds_full.open_scan(test)
  per_axis = predict.predict_planes(b.model, scan.image, stats=scan.stats, rule=b.normalization,
                                    planes=3)
  labels, _ = predict.fuse(per_axis, "soft")
  truth = scan.read_labels()
  s = metrics.scores(metrics.confusion_matrix(labels, truth, ds_full.num_classes),
                     ds_full.classes)
  edge = border.border_scores(labels, truth, ds_full.classes)
  kept = float(np.mean(keep_mask(truth.shape, rule)))
  out = {"variant": rule, "labelled_fraction": kept, "steps": steps, "batch": batch,
         "edge_margin": float(c.edge_margin),
         "best_step": run.get("best_step"), "best_val_miou": run.get("best_val_miou"),
         "test_miou_fg": s["miou_fg"], "test_iou": dict(zip(ds_full.classes, s["iou"])),
         "border_miou_fg": edge["border"]["miou_fg"],
         "interior_miou_fg": edge["interior"]["miou_fg"],
         "border_iou": dict(zip(ds_full.classes, edge["border"]["iou"])),
         "interior_iou": dict(zip(ds_full.classes, edge["interior"]["iou"])),
         "train_seconds": round(train_s, 1), "load_average": common.load_average()}
  outputs.atomic_write_json(done, out)
  print(json.dumps(out), file=sys.stderr, flush=True)
  return out


def full_dataset(root: Path) -> Path:
  from bonejax import phantom
  from bonejax.data import store
  full = root / "data_full"
  if not (full / store.DATASET_JSON).exists():
    phantom.make_dataset(full, num_scans=NUM_SCANS, shape=SHAPE, seed=0, kind=_KIND.value)
  return full


def to_markdown(title: str, rows: list[dict], info: dict, load, cmd: str, note: str) -> str:
  full = next((r for r in rows if r["variant"] == "full"), None)
  fg = [c for c in rows[0]["test_iou"] if c != "background"]  # foreground classes, in order
  last = fg[-1]  # the finest class (pore; residual material): its border IoU is shown
  table_rows = []
  for r in rows:
    table_rows.append({
        "variant": r["variant"], "labelled": f"{100 * r['labelled_fraction']:.1f}%",
        "margin": r["edge_margin"], "best": r["best_step"], "val": r["best_val_miou"],
        **{f"iou {c}": r["test_iou"].get(c) for c in fg},
        "fg": r["test_miou_fg"],
        "gap": (r["test_miou_fg"] - full["test_miou_fg"]) if full else None,
        "border": r["border_miou_fg"], "interior": r["interior_miou_fg"],
        "blast": r["border_iou"].get(last), "ilast": r["interior_iou"].get(last),
        "min": r["train_seconds"] / 60})
  table = common.markdown_table(
      table_rows, ["variant", "labelled", "margin", "best", "val", *(f"iou {c}" for c in fg),
                   "fg", "gap", "border", "interior", "blast", "ilast", "min"],
      ["labels", "voxels labelled", "edge margin", "best step", "val miou_fg",
       *(f"test IoU {c}" for c in fg), "test miou_fg", "minus full", "border-2 miou_fg",
       "interior miou_fg", f"border-2 IoU {last}", f"interior IoU {last}", "train min"])
  return "\n".join([f"# {title}", "", common.machine_line(info), "",
                    f"Load average at start / end: {load[0]} / {load[1]} (the machine was shared "
                    "with other agents' jobs: times are not idle-machine times).", "",
                    f"Command: `{cmd}`", "", note, "", table])


def main(argv):
  del argv
  root = Path(_WORKDIR.value)
  root.mkdir(parents=True, exist_ok=True)
  load_start = common.load_average()
  full = full_dataset(root)
  rows = [run_variant(root, full, v, _STEPS.value, _BATCH.value,
                      0.0 if v == "full_noedge" else None) for v in _VARIANTS.value]
  info = common.machine()
  tag = _TAG.value or common.machine_tag()
  info["tag"] = tag
  load = (load_start, common.load_average())
  cmd = " ".join(["python", "benchmarks/sparse_labels.py"] + sys.argv[1:])
  note = (f"Every variant: configs/demo.py, {_STEPS.value} steps x {_BATCH.value} patches (the "
          "demo's 400 x 16 cut for this busy machine), seed 0; test scan_004 predicted whole, "
          "3-plane soft vote, scored on its full labels. Border-2: voxels within 2 of a face.")
  md = to_markdown(f"Sparse against full labels, {_KIND.value} phantom", rows, info, load, cmd,
                   note)
  print(md)
  paths = common.write_results(_NAME.value, {"rows": rows, "machine": info, "command": cmd,
                                             "load_average": {"start": load[0], "end": load[1]}},
                               md, tag=tag, results_dir=Path(_RESULTS.value))
  return {"md": paths["md"], "rows": len(rows)}


if __name__ == "__main__":
  runner.run(main)
