r"""Makes a synthetic micro-CT dataset (the embedded default data) in the contract's layout.

  python launch/make_phantom.py --out=/tmp/ph --num_scans=4 --shape=96,128,128 --seed=0 \
      --kind=bone

--kind=bone: background / bone / pore (a long-bone shaft; pore and background share one grey
value). --kind=implant: background / bone / degradation layer / residual material (a corroding
screw in new bone). Scan i depends only on (seed, kind, i, shape). 4 scans of 96x128x128 take
a few seconds on one core. The dataset appears complete or not at all.
"""

from __future__ import annotations

import os
import sys
import time


from absl import flags

from bonejax.cli import runner
from bonejax.core import errors, outputs, placement

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Dataset directory to create (DATA/dataset.json, scan_000...).")
flags.DEFINE_integer("num_scans", 4, "Number of scans.")
flags.DEFINE_string("shape", "96,128,128", "Scan shape Z,Y,X (each side >= 32).")
flags.DEFINE_integer("seed", 0, "Random seed; scan i depends only on (seed, kind, i, shape).")
flags.DEFINE_enum("kind", "bone", ["bone", "implant"], "Phantom kind.")
flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
flags.DEFINE_string("chunks", "64,64,64", "zarr chunk shape Z,Y,X.")


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  from bonejax import phantom  # after flag parsing: --help stays instant

  if not FLAGS.out:
    raise errors.UserError("--out is required")
  if FLAGS.seed < 0:
    raise errors.UserError(f"--seed={FLAGS.seed} must be a non-negative integer")
  if FLAGS.num_scans < 1:
    raise errors.UserError(f"--num_scans={FLAGS.num_scans} must be >= 1")
  shape = phantom.check_args(FLAGS.kind, errors.parse_ints(FLAGS.shape, 3, "shape"),
                             FLAGS.num_scans, FLAGS.seed)
  phantom.check_memory(shape, FLAGS.kind)
  chunks = errors.parse_ints(FLAGS.chunks, 3, "chunks")
  t0 = time.perf_counter()
  placement.refuse_inside(FLAGS.out, (), "--out")  # before the claim's lock file is made
  with outputs.claim_output(FLAGS.out):
    outputs.check_output(FLAGS.out, FLAGS.overwrite)  # fail before any work
    ds = phantom.make_dataset(FLAGS.out, num_scans=FLAGS.num_scans, shape=shape,
                              seed=FLAGS.seed, kind=FLAGS.kind, overwrite=FLAGS.overwrite,
                              chunks=chunks)
  return {"dataset": str(ds.path), "scans": ds.scans, "classes": ds.classes,
          "kind": FLAGS.kind, "shape": list(shape), "seed": FLAGS.seed,
          "seconds": round(time.perf_counter() - t0, 2)}


def run() -> None:
  runner.run(main)


if __name__ == "__main__":
  run()
