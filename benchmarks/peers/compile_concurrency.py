"""Does compiling the predictor's plane shapes concurrently shorten a cold start? Measured.

    python benchmarks/peers/compile_concurrency.py                        # 64 x 384 x 384's shapes
    python benchmarks/peers/compile_concurrency.py --shapes=384x384,64x384 --repeats=3

A 3-plane prediction compiles one function per plane shape (two for a 64 x 384 x 384 scan:
384 x 384 and 64 x 384). XLA releases the GIL while it compiles, so a thread pool could compile
them side by side. Each repeat starts two fresh processes (no persistent compilation cache),
one compiling the shapes one after another (`engine.plan`), one in a thread pool, alternating;
medians of the compile seconds. Writes benchmarks/results/compile_concurrency_<machine>.{json,md}.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402
from bonejax.cli import runner  # noqa: E402
from bonejax.core import errors  # noqa: E402

_SHAPES = flags.DEFINE_list("shapes", ["384x384", "64x384"], "Plane shapes HxW to compile.")
_MODEL = flags.DEFINE_string("model", "unet_resnet18", "bonejax model.")
_BATCH = flags.DEFINE_integer("batch", 4, "Planes per call.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Process pairs (sequential, concurrent).")
_CHILD = flags.DEFINE_enum("child", "", ["", "sequential", "concurrent"], "internal.")
_RESULTS = flags.DEFINE_string("results_dir", str(common.RESULTS), "Where result files go.")


def child(mode: str, shapes: list[tuple[int, int]]) -> dict:
  import concurrent.futures as cf
  import numpy as np
  from flax import nnx
  from bonejax import models, predict
  # weights drawn by numpy: random initialisation would compile an RNG kernel per shape first
  model = models.fill_from_numpy(nnx.eval_shape(lambda: models.create(
      _MODEL.value, num_classes=3, in_channels=1, rngs=nnx.Rngs(0))), 0)
  model.eval()
  engine = predict.make_engine(model, in_channels=1, batch_size=_BATCH.value,
                               memory_budget_gb=16)
  t0 = time.perf_counter()
  if mode == "sequential":
    for s in shapes:
      engine.plan(s, np.uint8)
  else:
    with cf.ThreadPoolExecutor(len(shapes)) as pool:
      list(pool.map(lambda s: engine.plan(s, np.uint8), shapes))
  return {"mode": mode, "compile_seconds": time.perf_counter() - t0}


def main(argv):
  del argv
  shapes = [errors.parse_ints(s, 2, "shapes") for s in _SHAPES.value]
  if _CHILD.value:
    import os
    os.environ["BONEJAX_COMPILATION_CACHE"] = "0"
    return child(_CHILD.value, shapes)
  load = [common.load_average()]
  runs = []
  for _ in range(_REPEATS.value):
    for mode in ("sequential", "concurrent"):
      cmd = [sys.executable, __file__, f"--child={mode}", f"--shapes={','.join(_SHAPES.value)}",
             f"--model={_MODEL.value}", f"--batch={_BATCH.value}"]
      runs.append(common.run_json(cmd, timeout=1800, env={"BONEJAX_COMPILATION_CACHE": "0"}))
      print(f"{mode}: {runs[-1]['compile_seconds']:.1f} s", file=sys.stderr)
  load.append(common.load_average())
  rows = []
  for mode in ("sequential", "concurrent"):
    vals = [r["compile_seconds"] for r in runs if r["mode"] == mode]
    rows.append({"mode": mode, "median": common.median(vals),
                 "values": ", ".join(f"{v:.1f}" for v in vals)})
  info = common.machine()
  md = "\n".join([f"# Plane-shape compilation, sequential vs thread pool: {info['tag']}", "",
                  common.machine_line(info), "", f"Load average at start / end: {load[0]} / "
                  f"{load[1]}.", "", f"`{_MODEL.value}`, batch {_BATCH.value}, shapes "
                  f"{', '.join(_SHAPES.value)}; fresh processes, no persistent cache.", "",
                  common.markdown_table(rows, ["mode", "median", "values"],
                                        ["compile", "median (s)", "runs (s)"])])
  print(md)
  paths = common.write_results("compile_concurrency", {"runs": runs, "rows": rows,
                                                       "load_average": load, "machine": info},
                               md, tag=info["tag"], results_dir=_RESULTS.value)
  return {"md": paths["md"], "sequential_s": rows[0]["median"], "concurrent_s": rows[1]["median"]}


if __name__ == "__main__":
  runner.run(main)
