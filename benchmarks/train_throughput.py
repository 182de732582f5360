r"""Training throughput: the input pipeline alone, the step alone, and both together, for the
host patch stream and the device-resident sampler.

  python benchmarks/train_throughput.py                          # CPU: a few minutes
  python benchmarks/train_throughput.py --batch_size=256 --loader_batch_size=256 --steps=50 \
      --warmup=5 --shape=256,1024,1024 --scans=4                 # a GPU host

With the trainer's own pieces (bonejax.data.feed, bonejax.train.trainer), on a phantom dataset of
`--scans` uint16 scans of `--shape` (or `--dataset`), planes of all three axes:
- loader, host: `PatchStream` batches of `--loader_batch_size` (tensorstore reads, mirroring,
  normalisation on the CPU, the prefetch thread), per usable core;
- loader, device: `DeviceSampler` batches of the same size: the host's records (5 integers per
  patch) sent to the devices and the crops cut, mirrored and normalised there; per device;
- records, device: the host's share of the device path alone, in the one thread that runs it
  (records per second: what bounds how many devices one host can feed);
- step: the jitted, donated train step (augmentation on, CE + Dice, Adam) on a batch already on
  the device, for each `--dtypes`: the model + optimiser ceiling;
- loader+step: the trainer's loop (next batch from the feed, step, at most two steps in flight)
  with each sampler, at `--batch_size`.
Patches/s are medians over `--repeats` timed windows of `--steps` steps after `--warmup` steps.

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
_BATCH = flags.DEFINE_integer("batch_size", 4, "Global batch size of the step and the loop.")
_LOADER_BATCH = flags.DEFINE_integer("loader_batch_size", 32, "Global batch size of the "
                                     "loader-alone figures.")
_DTYPES = flags.DEFINE_string("dtypes", "float32,bfloat16", "Compute dtypes to time.")
_SAMPLERS = flags.DEFINE_string("samplers", "host,device", "Input paths to time.")
_STEPS = flags.DEFINE_integer("steps", 3, "Steps per timed window.")
_LOADER_STEPS = flags.DEFINE_integer("loader_steps", 20, "Batches per timed loader window.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps first (compilation).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed windows (median reported).")
_SCANS = flags.DEFINE_integer("scans", 2, "Phantom scans.")
_SHAPE = flags.DEFINE_string("shape", "64,256,256", "Phantom scan shape Z,Y,X.")
_DATASET = flags.DEFINE_string("dataset", None, "Use this dataset instead of a phantom.")
_OUT = flags.DEFINE_string("out", str(REPO / "benchmarks" / "results"), "Results directory.")


def main(argv):
  del argv
  import jax

  from bonejax import models, phantom
  from bonejax.data import store
  from bonejax.data import feed as feed_lib
  from bonejax.data import patches
  from bonejax.train import mesh as mesh_lib

  load_start = common.load_average()
  B, LB, P = _BATCH.value, _LOADER_BATCH.value, _PATCH.value
  samplers = [s.strip() for s in _SAMPLERS.value.split(",") if s.strip()]
  cores, devices = common.usable_cores(), jax.device_count()
  tmp = tempfile.TemporaryDirectory()
  data = _DATASET.value
  if not data:
    data = Path(tmp.name) / "data"
    phantom.make_dataset(data, num_scans=_SCANS.value, shape=common.errors.parse_ints(
        _SHAPE.value, 3, "shape"), seed=0, progress=False)
  ds = store.open_dataset(data)

  mesh = mesh_lib.make_mesh()
  mesh_lib.check_batch_size(B, mesh)
  mesh_lib.check_batch_size(LB, mesh, "loader_batch_size")
  data_sh = mesh_lib.data_sharding(mesh)

  def make_feed(sampler, batch):
    stream = patches.PatchStream(data, ds.scans, patch_size=P, global_batch_size=batch, seed=0,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
    return feed_lib.make_feed(sampler, stream, mesh,
                              lambda b: mesh_lib.put_batch(b, data_sh, batch))

  def windows(run_steps, steps, batch):
    """run_steps(n) runs n steps and waits; returns patches/s of each timed window."""
    run_steps(_WARMUP.value)
    rates = []
    for _ in range(_REPEATS.value):
      t0 = time.perf_counter()
      run_steps(steps)
      rates.append(steps * batch / (time.perf_counter() - t0))
    return rates

  rows = []

  def record(sampler, dtype, part, batch, rates, unit):
    rate = common.median(rates)
    per = rate / {"core": cores, "device": devices, "thread": 1}[unit]
    rows.append({"sampler": sampler, "dtype": dtype, "part": part, "batch": batch,
                 "patches_per_s": rate, "per_unit": per, "unit": unit, "runs": rates})
    print(f"{sampler} {dtype} {part}: {rate:,.1f} patches/s ({per:,.1f} per {unit})",
          file=sys.stderr, flush=True)

  # ---- Loaders alone ------------------------------------------------------------------------
  kinds = {}
  for sampler in samplers:
    f = make_feed(sampler, LB)
    kinds[sampler] = f.kind
    if sampler == "host":  # the host path's loader is the stream, before the copy to the device
      rates = windows(lambda n, s=f.stream: [next(s) for _ in range(n)], _LOADER_STEPS.value, LB)
      record(f.kind, "-", "loader", LB, rates, "core")
    else:
      def run(n, f=f):
        out = None
        for _ in range(n):
          out = next(f)
        jax.block_until_ready(out)
      record(f.kind, "-", "loader", LB, windows(run, _LOADER_STEPS.value, LB), "device")
      # The host's share alone: the records of fresh positions, as the sampler computes them.
      k = [f.stream.position]

      def records(n, f=f, k=k):
        for _ in range(n):
          f.rows_at(k[0])
          k[0] += LB
      record(f.kind, "-", "records (host)", LB,
             windows(records, _LOADER_STEPS.value * 10, LB), "thread")
    f.close()

  # ---- Step alone and the trainer's loop, per dtype -----------------------------------------
  for dtype_name in [d.strip() for d in _DTYPES.value.split(",") if d.strip()]:
    dtype = common.dtype_of(dtype_name)
    create = lambda rngs: models.create(_MODEL.value, num_classes=ds.num_classes,  # noqa: E731
                                        rngs=rngs, dtype=dtype)
    # One step for "step" and "loader+step" (the GPU suite's trace runs it too).
    step, state, scale = common.trainer_train_step(create, mesh)
    holder = {"state": state}

    # Step alone: one device-resident batch.
    f = make_feed("host", B)
    batch = next(f)
    f.close()

    def run_step(n):
      out = None
      for _ in range(n):
        holder["state"], out = step(holder["state"], batch, scale)
      jax.block_until_ready(out)

    t0 = time.perf_counter()
    record("-", dtype_name, "step", B, windows(run_step, _STEPS.value, B), "device")
    print(f"  ({time.perf_counter() - t0:.0f}s incl. compile)", file=sys.stderr, flush=True)

    # Both: the trainer's loop, with each sampler.
    for sampler in samplers:
      f = make_feed(sampler, B)

      def run_loop(n, f=f):
        in_flight = collections.deque()
        out = None
        for _ in range(n):
          holder["state"], out = step(holder["state"], next(f), scale)
          in_flight.append(out["loss"])
          if len(in_flight) > 2:
            in_flight.popleft().block_until_ready()
        jax.block_until_ready(out)

      record(f.kind, dtype_name, "loader+step", B, windows(run_loop, _STEPS.value, B), "device")
      f.close()
    del holder, state, batch

  info = common.machine()
  table = common.markdown_table(
      rows, ["sampler", "dtype", "part", "batch", "patches_per_s", "per_unit", "unit"],
      ["sampler", "dtype", "part", "batch", "patches/s", "per unit", "unit"])
  shape = "x".join(str(v) for v in ds.open_scan(ds.scans[0]).shape)
  md = (f"# Training throughput: {_MODEL.value}, {P}x{P} patches\n\n"
        f"{common.machine_line(info)}; {devices} device(s) ({jax.devices()[0].device_kind}), "
        f"{cores} usable core(s); load average {load_start} -> {common.load_average()}.\n\n"
        f"Data: {len(ds.scans)} scan(s) of {shape} "
        f"({ds.open_scan(ds.scans[0]).dtype}), planes of axes 0, 1, 2.\n\n{table}\n\n"
        f"Medians of {_REPEATS.value} windows ({_LOADER_STEPS.value} loader batches, "
        f"{_STEPS.value} steps) after {_WARMUP.value} warm-up step(s). per unit: the host "
        "path's loader per usable core (it runs a thread pool), the device path's records per "
        "thread (one), everything on the devices per device. loader = batches ready (host "
        "path: normalised on the host, before the copy; device path: on the devices). "
        "step = device-resident batch; loader+step = the trainer's loop (augmentation on "
        "device, CE + Dice, Adam).\n")
  paths = common.write_results(
      "train_throughput", {"model": _MODEL.value, "patch": P, "batch_size": B,
                           "loader_batch_size": LB, "steps": _STEPS.value,
                           "loader_steps": _LOADER_STEPS.value, "warmup": _WARMUP.value,
                           "repeats": _REPEATS.value, "samplers": kinds, "rows": rows,
                           "data": {"scans": len(ds.scans), "shape": shape},
                           "machine": info, "devices": devices, "usable_cores": cores,
                           "device_kind": jax.devices()[0].device_kind,
                           "load_average": {"start": load_start, "end": common.load_average()}},
      md, results_dir=_OUT.value)
  print(table)
  print(f"wrote {paths['json']} and {paths['md']}")
  tmp.cleanup()


if __name__ == "__main__":
  app.run(main)
