r"""Training throughput: the input pipeline alone, the step alone, and both together.

  python benchmarks/train_throughput.py                          # CPU: a few minutes
  python benchmarks/train_throughput.py --batch_size=64 --steps=50 --warmup=5   # a GPU

For each compute dtype (fp32, bf16), with the trainer's own pieces (bonejax.train.trainer):
- loader: `PatchStream` batches per second (tensorstore reads, normalisation, prefetch thread),
  on a phantom dataset of `--scans` scans of `--shape`;
- step: the jitted, donated train step (augmentation on, CE + Dice, Adam) on a batch already on
  the device: the model + optimiser ceiling;
- both: the training loop as trainer.train runs it (next batch, host->device placement, step),
  with at most two steps in flight.
Patches/s are medians over `--repeats` timed windows of `--steps` steps after `--warmup` steps.
The loader is timed once (it does not depend on the dtype).

Prints a table and writes benchmarks/results/train_throughput_<machine>.{json,md}.
"""

from __future__ import annotations

import collections
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402

_MODEL = flags.DEFINE_string("model", "unet_resnet18", "Model name.")
_PATCH = flags.DEFINE_integer("patch", 256, "Patch size.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Global batch size.")
_DTYPES = flags.DEFINE_string("dtypes", "float32,bfloat16", "Compute dtypes to time.")
_STEPS = flags.DEFINE_integer("steps", 3, "Steps per timed window.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps first (compilation).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed windows (median reported).")
_SCANS = flags.DEFINE_integer("scans", 2, "Phantom scans for the loader.")
_SHAPE = flags.DEFINE_string("shape", "64,256,256", "Phantom scan shape Z,Y,X.")
_DATASET = flags.DEFINE_string("dataset", None, "Use this dataset instead of a phantom.")
_OUT = flags.DEFINE_string("out", str(REPO / "benchmarks" / "results"), "Results directory.")


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from bonejax import models, phantom, store
  from bonejax.data import patches
  from bonejax.train import configlib, losses, optim, trainer
  from bonejax.train import mesh as mesh_lib

  load_start = common.load_average()
  B, P = _BATCH.value, _PATCH.value
  tmp = tempfile.TemporaryDirectory()
  data = _DATASET.value
  if not data:
    data = Path(tmp.name) / "data"
    phantom.make_dataset(data, num_scans=_SCANS.value, shape=common.cli.parse_ints(
        _SHAPE.value, 3, "shape"), seed=0, progress=False)
  ds = store.open_dataset(data)

  mesh = mesh_lib.make_mesh()
  mesh_lib.check_batch_size(B, mesh)
  data_sh, repl = mesh_lib.data_sharding(mesh), mesh_lib.replicated(mesh)

  def stream():
    return patches.PatchStream(data, ds.scans, patch_size=P, global_batch_size=B, seed=0,
                               process_index=jax.process_index(),
                               process_count=jax.process_count())

  def windows(run_steps):
    """run_steps(n) runs n steps and waits; returns patches/s of each timed window."""
    run_steps(_WARMUP.value)
    rates = []
    for _ in range(_REPEATS.value):
      t0 = time.perf_counter()
      run_steps(_STEPS.value)
      rates.append(_STEPS.value * B / (time.perf_counter() - t0))
    return rates

  rows = []
  # Loader alone.
  with stream() as s:
    rates = windows(lambda n: [next(s) for _ in range(n)])
  rows.append({"dtype": "-", "part": "loader", "patches_per_s": common.median(rates),
               "runs": rates})
  print(f"loader: {common.median(rates):.1f} patches/s", file=sys.stderr, flush=True)

  cfg = configlib.default_config()
  schedule = optim.make_schedule({}, 3e-4, 1000)
  tx = optim.make_optimizer({"name": "adam"}, schedule)
  for dtype_name in [d.strip() for d in _DTYPES.value.split(",") if d.strip()]:
    dtype = common.dtype_of(dtype_name)
    create = lambda rngs: models.create(_MODEL.value, num_classes=ds.num_classes,  # noqa: E731
                                        rngs=rngs, dtype=dtype)
    graphdef, _, _ = nnx.split(nnx.eval_shape(lambda: create(nnx.Rngs(0))), nnx.Param, ...)
    state = jax.jit(trainer.make_init(create, tx, 0), out_shardings=repl)()
    step = jax.jit(trainer.make_train_step(graphdef, tx, losses.make_loss({"ce": 1, "dice": 1}),
                                           cfg.augment, 0, schedule),
                   in_shardings=(repl, data_sh, repl), out_shardings=(repl, repl),
                   donate_argnums=(0,))
    scale = jax.device_put(np.float32(1.0), repl)
    holder = {"state": state}

    # Step alone: one device-resident batch.
    with stream() as s:
      batch = mesh_lib.put_batch(next(s), data_sh, B)

    def run_step(n):
      out = None
      for _ in range(n):
        holder["state"], out = step(holder["state"], batch, scale)
      jax.block_until_ready(out)

    t0 = time.perf_counter()
    rates = windows(run_step)
    rows.append({"dtype": dtype_name, "part": "step", "patches_per_s": common.median(rates),
                 "runs": rates})
    print(f"{dtype_name} step: {common.median(rates):.2f} patches/s "
          f"({time.perf_counter() - t0:.0f}s incl. compile)", file=sys.stderr, flush=True)

    # Both: the trainer's loop.
    with stream() as s:
      def run_loop(n):
        in_flight = collections.deque()
        out = None
        for _ in range(n):
          b = mesh_lib.put_batch(next(s), data_sh, B)
          holder["state"], out = step(holder["state"], b, scale)
          in_flight.append(out["loss"])
          if len(in_flight) > 2:
            in_flight.popleft().block_until_ready()
        jax.block_until_ready(out)

      rates = windows(run_loop)
    rows.append({"dtype": dtype_name, "part": "loader+step", "patches_per_s":
                 common.median(rates), "runs": rates})
    print(f"{dtype_name} loader+step: {common.median(rates):.2f} patches/s", file=sys.stderr,
          flush=True)
    del holder, state, batch

  info = common.machine()
  table = common.markdown_table(rows, ["dtype", "part", "patches_per_s"],
                                ["dtype", "part", "patches/s"])
  md = (f"# Training throughput: {_MODEL.value}, {P}x{P} patches, global batch {B}\n\n"
        f"{common.machine_line(info)}; {jax.device_count()} device(s) "
        f"({jax.devices()[0].device_kind}); load average {load_start} -> "
        f"{common.load_average()}.\n\n{table}\n\n"
        f"Median of {_REPEATS.value} windows of {_STEPS.value} steps after {_WARMUP.value} "
        "warm-up step(s). step = device-resident batch; loader+step = the trainer's loop "
        "(augmentation on device, CE + Dice, Adam).\n")
  paths = common.write_results(
      "train_throughput", {"model": _MODEL.value, "patch": P, "batch_size": B,
                           "steps": _STEPS.value, "warmup": _WARMUP.value,
                           "repeats": _REPEATS.value, "rows": rows, "machine": info,
                           "devices": jax.device_count(),
                           "device_kind": jax.devices()[0].device_kind,
                           "load_average": {"start": load_start, "end": common.load_average()}},
      md, results_dir=_OUT.value)
  print(table)
  print(f"wrote {paths['json']} and {paths['md']}")
  tmp.cleanup()


if __name__ == "__main__":
  app.run(main)
