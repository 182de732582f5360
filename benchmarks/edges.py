r"""Border band against interior IoU before and after the edge fix (issue 28), bone phantom.

    python benchmarks/edges.py --workdir=/tmp/bonejax-edges --steps=400 --batch=8 --seeds=0,1

Why edges were worse: prediction feeds whole planes, so a voxel on a volume face sits at the
network's input edge (the convolutions' zero padding). Training cut its P-pixel crops at
origins uniform over the n - P + 1 positions inside the plane, so a border row was inside 1 of
every n - P + 1 crops and an interior row inside P of them: with the demo's 64-px patches in
128-px planes, the outer rows were trained 64x less often than the interior
(tests/test_edges.py measures the ratio on the records themselves). The fix
(config.edge_margin = 0.5, the default): origins are drawn from a range widened by P/2 beyond
each border and clamped back: a border row is inside about a third as many crops as an interior
row ((P/2 + 1) / (P + P/2)), with the same zero-padded context as at prediction.

Runs of configs/demo.py (full labels; scan_000-002 train, scan_003 validates, scan_004 is the
test scan, 96 x 128 x 128) for each `--margins` value (0: the old rule, 0.5: the fix) and each
`--seeds` value, the same steps and batch. The test scan is predicted whole with 3-plane soft
voting. Per run the table gives miou_fg in the outer 2 voxels (bonejax.evaluate.border) and
inside, and two controls that say where a gap comes from:
- faces: the bone phantom keeps a margin of background around the shaft in Y and X, so the
  border band's bone and pore voxels are (nearly) all in the outer 2 Z slices; z0 / z1 give
  those two ends apart (one of them is the trabecular metaphysis, the harder content);
- matched content: the test scan cropped by `--crop` voxels on every side, predicted alone, so
  its outer 2 voxels are at the volume's faces; the same voxels cut from the whole-scan
  prediction were predicted with the full context around them. The difference is the edge
  effect alone (same voxels, same model), free of what the phantom's outer slices contain.

Writes benchmarks/results/edges_<machine>.{json,md}; each run stays in WORKDIR/m<margin>_s<seed>
(a rerun reuses finished runs).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import sparse_labels as sl  # noqa: E402  (--workdir --steps --batch --tag ...)
from bonejax.cli import runner  # noqa: E402
from bonejax.core import outputs  # noqa: E402

_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Training seeds (config.seed) per margin.")
_MARGINS = flags.DEFINE_list("margins", ["0", "0.5"],
                             "config.edge_margin values (0: before the fix).")
_CROP = flags.DEFINE_integer("crop", 8, "Matched-content control: voxels cut from every side.")
_RESCORE = flags.DEFINE_bool("rescore", False, "Score finished runs again from their models.")
_NAME = flags.DEFINE_string("edges_name", "edges", "Result file name (edges_<machine>).")
DEPTH_BINS = ((0, 2), (2, 4), (4, 8), (8, 16), (16, 32), (32, 1 << 30))


def _fg(pred, truth, mask, classes):
  from bonejax.evaluate import metrics
  s = metrics.scores(metrics.confusion_matrix(pred[mask], truth[mask], len(classes)), classes)
  return s["miou_fg"], dict(zip(classes, s["iou"]))


def diagnose(model, normalization, scan, classes, crop: int) -> dict:
  """Border / interior scores of the whole-scan 3-plane soft vote, per Z face, and the
  matched-content control (a crop predicted alone against the same voxels in the whole)."""
  import numpy as np
  from bonejax import predict
  from bonejax.evaluate import border
  image, truth = scan.read_image(), scan.read_labels()

  def vote(vol):
    per = predict.predict_planes(model, vol, stats=scan.stats, rule=normalization, planes=3)
    return predict.fuse(per, "soft")[0]

  labels = vote(image)
  edge = border.border_scores(labels, truth, classes)
  out = {"border_miou_fg": edge["border"]["miou_fg"],
         "interior_miou_fg": edge["interior"]["miou_fg"],
         "border_iou": dict(zip(classes, edge["border"]["iou"])),
         "interior_iou": dict(zip(classes, edge["interior"]["iou"]))}
  # miou_fg by distance to the nearest face: how deep an edge effect reaches.
  dist = np.minimum.reduce(np.meshgrid(*[np.minimum(np.arange(n), n - 1 - np.arange(n))
                                         for n in truth.shape], indexing="ij"))
  out["by_depth"] = {f"{lo}-{hi}": _fg(labels, truth, (dist >= lo) & (dist < hi), classes)[0]
                     for lo, hi in DEPTH_BINS}
  z = np.arange(truth.shape[0])[:, None, None]
  for name, sel in (("z0", z < border.BAND), ("z1", z >= truth.shape[0] - border.BAND)):
    out[f"{name}_miou_fg"] = _fg(labels, truth, np.broadcast_to(sel, truth.shape), classes)[0]
  c = int(crop)
  box = tuple(slice(c, n - c) for n in truth.shape)
  sub_truth = truth[box]
  alone = vote(np.ascontiguousarray(image[box]))
  band = border.band_mask(sub_truth.shape, border.BAND)
  out["crop"] = c
  out["crop_shape"] = list(sub_truth.shape)
  out["crop_band_alone_miou_fg"] = _fg(alone, sub_truth, band, classes)[0]
  out["crop_band_inside_miou_fg"] = _fg(labels[box], sub_truth, band, classes)[0]
  out["crop_interior_alone_miou_fg"] = _fg(alone, sub_truth, ~band, classes)[0]
  return out


def run_one(root: Path, full: Path, margin: float, seed: int, steps: int, batch: int) -> dict:
  """Trains configs/demo.py with this edge margin and seed (reusing a finished run), scores."""
  from bonejax.data import store
  from bonejax.models import bundle

  work = root / f"m{margin:g}_s{seed}"
  done, trained = work / "score.json", work / "train.json"
  if done.exists() and not _RESCORE.value:
    out = json.loads(done.read_text())
    if trained.exists():  # a note written after scoring (a reused model) is kept
      out.setdefault("reused_from", json.loads(trained.read_text())["run"].get("reused_from"))
    return out
  ds = store.open_dataset(full)
  if trained.exists():  # scored again (--rescore) from the trained model
    t = json.loads(trained.read_text())
    run, train_s, load = t["run"], t["train_seconds"], t["load_average"]
  else:
    run, train_s = _train(ds, full, margin, seed, steps, batch, work)
    load = common.load_average()
    outputs.atomic_write_json(trained, {"run": run, "train_seconds": train_s,
                                        "load_average": load})
  b = bundle.load_bundle(run.get("model_dir", work / "run" / "model"))
  out = {"margin": float(margin), "seed": int(seed), "steps": steps, "batch": batch,
         "best_step": run.get("best_step"), "best_val_miou": run.get("best_val_miou"),
         **diagnose(b.model, b.normalization, ds.open_scan(ds.scans[4]), ds.classes,
                    _CROP.value),
         "train_seconds": train_s, "load_average": load,
         "reused_from": run.get("reused_from")}
  out["gap"] = out["interior_miou_fg"] - out["border_miou_fg"]
  out["crop_gap"] = out["crop_band_inside_miou_fg"] - out["crop_band_alone_miou_fg"]
  outputs.atomic_write_json(done, out)
  print(json.dumps(out), file=sys.stderr, flush=True)
  return out


def _train(ds, full: Path, margin: float, seed: int, steps: int, batch: int, work: Path):
  from bonejax.train import trainer
  sys.path.insert(0, str(common.REPO / "configs"))
  import demo as demo_config  # configs/demo.py
  c = demo_config.get_config()
  with c.unlocked():
    c.dataset, c.train_scans, c.val_scans = str(full), tuple(ds.scans[:3]), tuple(ds.scans[3:4])
    c.num_steps, c.batch_size, c.seed = int(steps), int(batch), int(seed)
    c.eval_every = c.checkpoint_every = max(1, steps // 4)
    c.schedule.warmup_steps = min(25, steps // 10)
    c.edge_margin = float(margin)
  t = time.perf_counter()
  run = trainer.train(c, work / "run")
  return {k: v for k, v in run.items() if k in ("model_dir", "best_step", "best_val_miou",
                                                 "steps")}, round(time.perf_counter() - t, 1)


def summary(rows: list[dict]) -> list[dict]:
  """Per margin: mean and spread (max - min) over seeds of the gaps and scores."""
  import numpy as np
  out = []
  for m in sorted({r["margin"] for r in rows}):
    rs = [r for r in rows if r["margin"] == m]
    row = {"margin": m, "seeds": ",".join(str(r["seed"]) for r in rs)}
    for k in ("best_val_miou", "interior_miou_fg", "border_miou_fg", "gap", "crop_gap"):
      v = np.array([r[k] for r in rs], float)
      row[k] = float(v.mean())
      row[k + "_spread"] = float(v.max() - v.min())
    out.append(row)
  return out


def to_markdown(rows, summ, info, load, cmd) -> str:
  f = common.fmt
  per_run = common.markdown_table(
      [dict(r, bpore=r["border_iou"]["pore"], ipore=r["interior_iou"]["pore"],
            min=r["train_seconds"] / 60) for r in rows],
      ["margin", "seed", "best_step", "best_val_miou", "interior_miou_fg", "border_miou_fg", "gap",
       "bpore", "ipore", "z0_miou_fg", "z1_miou_fg", "crop_band_inside_miou_fg",
       "crop_band_alone_miou_fg", "crop_gap", "min"],
      ["edge margin", "seed", "best step", "val miou_fg", "interior miou_fg", "border-2 miou_fg",
       "gap (interior - border)", "border-2 IoU pore", "interior IoU pore", "z0 slabs miou_fg",
       "z1 slabs miou_fg", "crop band, whole-scan context", "crop band, predicted alone",
       "edge effect (crop)", "train min"])
  summ_rows = [{"margin": s["margin"], "seeds": s["seeds"],
                **{k: f"{f(s[k], 4)} ± {f(s[k + '_spread'] / 2, 4)}"
                   for k in ("best_val_miou", "interior_miou_fg", "border_miou_fg", "gap",
                             "crop_gap")}} for s in summ]
  table = common.markdown_table(
      summ_rows, ["margin", "seeds", "best_val_miou", "interior_miou_fg", "border_miou_fg", "gap",
                  "crop_gap"],
      ["edge margin", "seeds", "val miou_fg", "interior miou_fg", "border-2 miou_fg",
       "gap (goal <= 0.01)", "edge effect (crop)"])
  depth = ""
  if all("by_depth" in r for r in rows):
    keys = list(rows[0]["by_depth"])
    depth = common.markdown_table(
        [dict(margin=r["margin"], seed=r["seed"], **r["by_depth"]) for r in rows],
        ["margin", "seed"] + keys,
        ["edge margin", "seed"] + [f"d {k.replace('-1073741824', '+')}" for k in keys])
  r0 = rows[0]
  return "\n".join([
      "# Border band against interior, before and after the edge fix", "",
      common.machine_line(info), "",
      f"Load average at start / end: {load[0]} / {load[1]} (the machine was shared with other "
      "agents' jobs: times are not idle-machine times).", "",
      f"Command: `{cmd}`", "",
      f"configs/demo.py, {r0['steps']} steps x {r0['batch']} patches, full labels, test scan_004 "
      "(96 x 128 x 128) predicted whole, 3-plane soft vote. Border-2: voxels within 2 of a "
      "face; gap = interior - border miou_fg. z0 / z1: the outer 2 Z slices of each end. "
      f"Crop: the scan less {r0['crop']} voxels on every side ({' x '.join(map(str, r0['crop_shape']))}), "
      "predicted alone; its outer 2 voxels scored as predicted alone (at the faces) and as cut "
      "from the whole-scan prediction (same voxels, full context): edge effect = the "
      "difference.", "",
      "Mean ± half the spread (max - min) over seeds:", "", table, "", "Per run:", "", per_run]
      + (["", "miou_fg by distance d (voxels) to the nearest face, whole-scan prediction:", "",
          depth] if depth else [])
      + [f"\nRun margin {r['margin']:g} seed {r['seed']}: trained model reused from "
         f"{r['reused_from']}." for r in rows if r.get("reused_from")])


def main(argv):
  del argv
  F = flags.FLAGS
  root = Path(F.workdir)
  root.mkdir(parents=True, exist_ok=True)
  load_start = common.load_average()
  full = sl.full_dataset(root)
  rows = [run_one(root, full, float(m), int(s), F.steps, F.batch)
          for m in _MARGINS.value for s in _SEEDS.value]
  summ = summary(rows)
  info = common.machine()
  tag = F.tag or common.machine_tag()
  info["tag"] = tag
  load = (load_start, common.load_average())
  cmd = " ".join(["python", "benchmarks/edges.py"] + sys.argv[1:])
  md = to_markdown(rows, summ, info, load, cmd)
  print(md)
  record = {"rows": rows, "summary": summ, "machine": info, "command": cmd,
            "load_average": {"start": load[0], "end": load[1]}}
  paths = common.write_results(_NAME.value, record, md, tag=tag,
                               results_dir=Path(F.results_dir))
  return {"md": paths["md"], "rows": len(rows)}


if __name__ == "__main__":
  runner.run(main)
