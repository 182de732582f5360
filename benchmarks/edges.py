r"""Border band against interior IoU before and after the edge fix (issue 28), bone phantom.

    python benchmarks/edges.py --workdir=/tmp/bonejax-sparse --steps=400 --batch=8

Why edges were worse: prediction feeds whole planes, so a voxel on a volume face sits at the
network's input edge (the convolutions' zero padding; planes are only padded at the bottom /
right up to the stride, and the 128- and 96-voxel sides of the phantom need none). Training
cut its P-pixel crops at origins uniform over the n - P + 1 positions inside the plane, so a
border row was inside 1 of every n - P + 1 crops and an interior row inside P of them: with
the demo's 64-px patches in 128-px planes, the outer rows were trained 64x less often than
the interior (tests/test_edges.py measures the ratio on the records themselves). The fix
(patches.EDGE_MARGIN = 0.5): origins are drawn from a range widened by P/2 beyond each border
and clamped back: about half of the crops touch a border, and a border row is inside about a
third as many crops as an interior row ((P/2 + 1) / (P + P/2)), with the same zero-padded
context as at prediction.

Two runs of configs/demo.py, same seed and steps, full labels: `full_noedge` (EDGE_MARGIN = 0,
the old rule) and `full` (the fix). The test scan (scan_004) is predicted whole with 3-plane
soft voting; the table gives miou_fg and pore IoU in the outer 2 voxels and inside. Shares its
runs with benchmarks/sparse_labels.py (same --workdir: finished variants are reused).

Writes benchmarks/results/edges_<machine>.{json,md}.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import sparse_labels as sl  # noqa: E402  (its flags are defined there)
from bonejax.cli import runner  # noqa: E402


def main(argv):
  del argv
  root = Path(flags.FLAGS.workdir)
  root.mkdir(parents=True, exist_ok=True)
  load_start = common.load_average()
  full = sl.full_dataset(root)
  rows = [sl.run_variant(root, full, "full_noedge", flags.FLAGS.steps, flags.FLAGS.batch, 0.0),
          sl.run_variant(root, full, "full", flags.FLAGS.steps, flags.FLAGS.batch)]
  info = common.machine()
  tag = flags.FLAGS.tag or common.machine_tag()
  info["tag"] = tag
  load = (load_start, common.load_average())
  cmd = " ".join(["python", "benchmarks/edges.py"] + sys.argv[1:])
  note = (f"configs/demo.py, {flags.FLAGS.steps} steps x {flags.FLAGS.batch} patches (the demo's "
          "400 x 16 cut for this busy machine), seed 0, full labels; `full_noedge`: crops "
          "inside the volume (EDGE_MARGIN 0, before the fix); `full`: EDGE_MARGIN 0.5 (after). "
          "Border-2: voxels within 2 of a face of the test scan (96 x 128 x 128).")
  md = sl.to_markdown("Border band against interior, before and after the edge fix", rows, info,
                      load, cmd, note)
  print(md)
  paths = common.write_results("edges", {"rows": rows, "machine": info, "command": cmd,
                                         "load_average": {"start": load[0], "end": load[1]}},
                               md, tag=tag, results_dir=Path(flags.FLAGS.results_dir))
  return {"md": paths["md"], "rows": len(rows)}


if __name__ == "__main__":
  runner.run(main)
