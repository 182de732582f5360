r"""BONe's 5-fold cross-validation by scan, nested, on a phantom of 10 scans.

    python benchmarks/crossval_phantom.py                       # 5 folds, 10 bone scans
    python benchmarks/crossval_phantom.py --folds=5 --num_scans=10 --steps=600

Runs `launch/crossval.py` (bonejax.train.crossval: outer folds by scan; each fold selects its best
checkpoint, stops and schedules on inner validation scans drawn from its training scans, and
is scored only on its outer scans, predicted whole with 3-plane soft voting) with
`configs/demo.py` (classic U-Net depth 4 width 16, 64-px patches, batch 16) on a phantom of
`--num_scans` scans, then writes the per-fold table and mean +- std miou_fg (sample std), as
BONe reports its cross-validation. The run resumes in --workdir: a rerun continues unfinished
folds and reuses scored ones.

Writes benchmarks/results/crossval_<kind>_<machine>.{json,md}.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402
from bonejax.cli import runner  # noqa: E402
from bonejax.core import errors, outputs

_FOLDS = flags.DEFINE_integer("folds", 5, "Outer folds (by scan).")
_SCANS = flags.DEFINE_integer("num_scans", 10, "Phantom scans (>= 2 per fold + 2).")
_KIND = flags.DEFINE_enum("kind", "bone", ["bone", "implant"], "Phantom kind.")
_STEPS = flags.DEFINE_integer("steps", 600, "Training steps per fold (batch 16).")
_SHAPE = flags.DEFINE_list("shape", ["96", "128", "128"], "Phantom scan shape Z,Y,X.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Fold runs (default /tmp/bonejax-crossval/KIND).")
_RESULTS = flags.DEFINE_string("results_dir", str(common.RESULTS), "Where result files go.")
_TAG = flags.DEFINE_string("tag", "", "Machine tag of the result files (default: detected).")
_TIMEOUT = flags.DEFINE_integer("timeout", 3 * 3600, "Seconds for the whole cross-validation.")


def command(workdir: Path) -> list[str]:
  shape = ",".join(_SHAPE.value)
  return [sys.executable, str(common.REPO / "launch" / "crossval.py"),
          f"--config={common.REPO / 'configs' / 'demo.py'}", f"--folds={_FOLDS.value}",
          f"--workdir={workdir}", f"--config.phantom.num_scans={_SCANS.value}",
          f"--config.phantom.kind={_KIND.value}", f"--config.phantom.shape=({shape})",
          f"--config.num_steps={_STEPS.value}",
          f"--config.eval_every={max(1, _STEPS.value // 6)}",
          f"--config.checkpoint_every={_STEPS.value}"]


def to_markdown(res: dict, cmd: list[str], info: dict, load) -> str:
  rows = [{"fold": r["fold"], "scored": ", ".join(r["test_scans"]),
           "inner": ", ".join(r["inner_val_scans"]), "train": len(r["train_scans"]),
           "best": r["best_step"], "inner_val": r["inner_val_miou_fg"],
           **{f"iou_{c}": v for c, v in r["iou"].items() if c != "background"},
           "fg": r["miou_fg"], "all": r["miou_all"]} for r in res["folds"]]
  classes = [c for c in res["folds"][0]["iou"] if c != "background"]
  table = common.markdown_table(
      rows, ["fold", "scored", "inner", "train", "best", "inner_val",
             *[f"iou_{c}" for c in classes], "fg", "all"],
      ["fold", "scored (outer) scans", "selected on (inner)", "train scans", "best step",
       "inner val miou_fg", *[f"IoU {c}" for c in classes], "miou_fg", "miou_all"])
  return "\n".join([
      f"# Cross-validation by scan: {_FOLDS.value} folds, {_KIND.value} phantom, {info['tag']}",
      "", common.machine_line(info), "", f"Load average at start / end: {load[0]} / {load[1]}.",
      "", "Command: `" + " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))
      + "`", "", f"Selection: {res['selection']}.", "", table, "",
      f"**miou_fg {res['mean_miou_fg']:.4f} ± {res['std_miou_fg']:.4f}** (mean ± sample std "
      f"over {len(res['folds'])} folds); miou_all {res['mean_miou_all']:.4f} ± "
      f"{res['std_miou_all']:.4f}. Wall time {res['seconds'] / 60:.1f} min."])


def main(argv):
  del argv
  if _SCANS.value < _FOLDS.value + 2:
    raise errors.UserError(f"--num_scans={_SCANS.value} must be >= --folds + 2")
  workdir = Path(_WORKDIR.value or f"/tmp/bonejax-crossval/{_KIND.value}")
  load_start = common.load_average()
  cmd = command(workdir)
  res = common.run_json(cmd, timeout=_TIMEOUT.value, log=workdir.parent /
                        f"{workdir.name}_crossval.log")
  info = common.machine()
  tag = _TAG.value or common.machine_tag()
  info["tag"] = tag
  load = (load_start, common.load_average())
  md = to_markdown(res, cmd, info, load)
  print(md)
  name = f"crossval_{_KIND.value}"
  paths = common.result_paths(name, tag, Path(_RESULTS.value))
  outputs.atomic_write_text(paths["md"], md + "\n")
  common.write_results(name, {"command": cmd[1:], "result": res, "machine": info,
                              "load_average": {"start": load[0], "end": load[1]}}, None,
                       tag=tag, results_dir=Path(_RESULTS.value))
  return {"md": paths["md"], "mean_miou_fg": res["mean_miou_fg"],
          "std_miou_fg": res["std_miou_fg"]}


if __name__ == "__main__":
  runner.run(main)
