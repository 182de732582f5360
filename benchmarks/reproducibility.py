r"""BONe's reproducibility check: the same config trained twice, and on 1 vs 4 devices.

    python benchmarks/reproducibility.py                 # 3 runs of configs/demo.py, 150 steps
    python benchmarks/reproducibility.py --steps=400     # the demo's full budget

Trains `configs/demo.py` (same seed, same phantom dataset, made once) three times, each in its
own process through `launch/train.py`:

  A  1 CPU device
  B  1 CPU device again
  C  4 fake CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=4`): the batch of
     16 sharded 4 x 4 over a data-parallel mesh, gradients all-reduced

and compares their final weights (largest absolute difference over all parameters and
BatchNorm statistics of the saved bundle), their last training loss and their validation
miou_fg curves (every evaluation). Expected: A and B bitwise identical (bonejax's determinism
contract on the CPU: the same seed gives the same batches and the same weights); C draws the
same batches (the sampler does not depend on the device count) but sums gradients and
BatchNorm statistics in a different order, so its weights differ by float32 rounding that
training amplifies; the validation scores agree within the tolerance stated in the table.

Writes benchmarks/results/reproducibility_<machine>.{json,md}.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402
from bonejax.cli import runner  # noqa: E402
from bonejax.core import errors, outputs

_STEPS = flags.DEFINE_integer("steps", 150, "Training steps of each run (batch 16).")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/bonejax-repro", "Runs and the shared dataset.")
_RESULTS = flags.DEFINE_string("results_dir", str(common.RESULTS), "Where result files go.")
_TAG = flags.DEFINE_string("tag", "", "Machine tag of the result files (default: detected).")
_MIOU_TOL = flags.DEFINE_float("miou_tolerance", 0.01, "Largest |difference| of validation "
                               "miou_fg accepted between 1 and 4 devices.")

RUNS = (("A", "1 device", 1), ("B", "1 device, again", 1), ("C", "4 fake devices", 4))


def train_cmd(run_dir: Path, data: Path) -> list[str]:
  steps = _STEPS.value
  return [sys.executable, str(common.REPO / "launch" / "train.py"),
          f"--config={common.REPO / 'configs' / 'demo.py'}", f"--workdir={run_dir}",
          f"--config.dataset={data}", f"--config.num_steps={steps}",
          f"--config.eval_every={max(1, steps // 6)}", f"--config.checkpoint_every={steps}"]


def weights(bundle_dir: Path) -> dict[str, Any]:
  """Every array of a bundle's model state, by path (parameters and BatchNorm statistics)."""
  import jax
  import numpy as np
  from flax import nnx
  from bonejax.models import bundle
  b = bundle.load_bundle(bundle_dir)
  leaves = jax.tree_util.tree_flatten_with_path(nnx.state(b.model))[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def max_abs_diff(a: dict, b: dict) -> float:
  import numpy as np
  if a.keys() != b.keys():
    raise errors.UserError("the bundles hold different arrays: not the same architecture")
  return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64))))
             for k in a)


def last_json_line(log: Path) -> dict[str, Any]:
  """The result object a finished run printed (its last stdout line, kept in the log)."""
  import json
  lines = [l for l in (log.read_text().splitlines() if log.exists() else [])
           if l.startswith("{")]
  return json.loads(lines[-1]) if lines else {}


def read_curve(run_dir: Path) -> tuple[list[tuple[int, float]], float | None]:
  """(step, validation miou_fg) of each evaluation, and the last logged training loss."""
  import csv
  rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
  curve = [(int(r["step"]), float(r["val_miou_fg"])) for r in rows if r.get("val_miou_fg")]
  losses = [float(r["loss"]) for r in rows if r.get("loss")]
  return curve, (losses[-1] if losses else None)


def main(argv):
  del argv
  from bonejax import phantom
  work = Path(_WORKDIR.value)
  data = work / "data"
  if not (data / "dataset.json").exists():
    phantom.make_dataset(data, num_scans=5, shape=(96, 128, 128), seed=0, kind="bone",
                         overwrite=True)
  load_start = common.load_average()
  runs: dict[str, dict[str, Any]] = {}
  for key, what, devices in RUNS:
    run_dir = work / f"run_{key}"
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu"}
    log = work / f"run_{key}.log"
    if not (run_dir / "model" / "model.json").exists():
      out = common.run_json(train_cmd(run_dir, data), timeout=3600, env=env, log=log)
    else:  # trained by an earlier run of this script: its result line is in the log
      out = last_json_line(log)
    curve, loss = read_curve(run_dir)
    runs[key] = {"what": what, "devices": devices, "curve": curve, "last_loss": loss,
                 "best_val_miou": out.get("best_val_miou", max(v for _, v in curve)),
                 "seconds": out.get("seconds")}
  w = {k: weights(work / f"run_{k}" / "model") for k in runs}
  pairs = []
  for a, b in (("A", "B"), ("A", "C")):
    dv = max(abs(x[1] - y[1]) for x, y in zip(runs[a]["curve"], runs[b]["curve"]))
    pairs.append({"pair": f"{a} vs {b}", "what": f"{runs[a]['what']} vs {runs[b]['what']}",
                  "weights": max_abs_diff(w[a], w[b]),
                  "loss": abs(runs[a]["last_loss"] - runs[b]["last_loss"]),
                  "val": dv, "identical": max_abs_diff(w[a], w[b]) == 0.0,
                  "within": dv <= _MIOU_TOL.value})
  info = common.machine()
  tag = _TAG.value or common.machine_tag()
  info["tag"] = tag
  load = (load_start, common.load_average())
  rrows = [{"run": k, "what": r["what"], "best": r["best_val_miou"], "loss": r["last_loss"],
            "sec": r["seconds"], "curve": " ".join(f"{v:.4f}" for _, v in r["curve"])}
           for k, r in runs.items()]
  md = "\n".join([
      f"# Reproducibility: configs/demo.py, {_STEPS.value} steps, {tag}", "",
      common.machine_line(info), "", f"Load average when this report was made (start / end): "
      f"{load[0]} / {load[1]}; runs trained earlier are compared from their saved models.", "",
      "Same seed, same phantom dataset (5 bone scans of 96x128x128), each run in its own "
      "`launch/train.py` process.", "",
      common.markdown_table(rrows, ["run", "what", "best", "loss", "sec", "curve"],
                            ["run", "devices", "best val miou_fg", "last training loss",
                             "train s", "validation miou_fg at each evaluation"]), "",
      common.markdown_table(pairs, ["pair", "what", "weights", "loss", "val", "identical",
                                    "within"],
                            ["pair", "runs", "max abs Δ weight", "abs Δ last loss",
                             "max abs Δ val miou_fg", "bitwise identical",
                             f"val within {_MIOU_TOL.value}"])])
  print(md)
  paths = common.result_paths("reproducibility", tag, Path(_RESULTS.value))
  outputs.atomic_write_text(paths["md"], md + "\n")
  common.write_results("reproducibility", {"steps": _STEPS.value, "runs": runs, "pairs": pairs,
                                           "machine": info, "miou_tolerance": _MIOU_TOL.value,
                                           "load_average": {"start": load[0], "end": load[1]}},
                       None, tag=tag, results_dir=Path(_RESULTS.value))
  return {"md": paths["md"], "pairs": pairs}


if __name__ == "__main__":
  runner.run(main)
