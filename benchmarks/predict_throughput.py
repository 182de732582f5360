r"""Prediction throughput (pipeline vs bare model forward) and peak memory as the volume grows.

  python benchmarks/predict_throughput.py                    # CPU-sized defaults, a few minutes
  python benchmarks/predict_throughput.py --shape=256,512,512 --width=32 --depth=5 \
      --batch_size=32 --mem_plane=512 --mem_z=256,512,1024 --mem_budget_gb=4  # a GPU

1. Throughput: for planes = 1, 3, 9, the end-to-end in-memory `predict_volume` (normalise, pad,
   forward, softmax, crop, host copies, accumulation, 45-degree rotations, voting) on a
   synthetic uint16 volume, against the bare jitted model forward on the same planes (same
   shapes, counts and batch; inputs already on the device). efficiency = bare time / pipeline
   time: the share of the wall time the model itself needs. Medians of `--repeats` warm runs.
2. Memory: `Predictor.predict` of scans (Z, P, P) for each Z in `--mem_z` with a small
   `--mem_budget_gb`, each in a fresh subprocess that reports its peak RSS (VmHWM from
   /proc/self/status) and its RSS before predicting (imports, JAX runtime). Out of core, the
   peak must not grow with Z.

Prints a table and writes benchmarks/results/predict_throughput_<machine>.{json,md} (see
benchmarks/common: the machine record, command, date and load average go with the numbers).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402

_SHAPE = flags.DEFINE_string("shape", "48,128,128", "Throughput volume Z,Y,X.")
_WIDTH = flags.DEFINE_integer("width", 8, "Classic U-Net width (channels of the first block).")
_DEPTH = flags.DEFINE_integer("depth", 3, "Classic U-Net depth.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Planes per call.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype.")
_PLANES = flags.DEFINE_string("planes", "1,3,9", "Plane counts to time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (median reported).")
_MEM_Z = flags.DEFINE_string("mem_z", "64,128,256,512", "Depths of the memory scans.")
_MEM_PLANE = flags.DEFINE_integer("mem_plane", 256, "Y = X of the memory scans.")
_MEM_BUDGET = flags.DEFINE_float("mem_budget_gb", 0.3, "--memory_budget_gb of memory runs.")
_MEM_PLANES = flags.DEFINE_integer("mem_planes", 3, "Plane sets of the memory runs.")
_MEM_WIDTH = flags.DEFINE_integer("mem_width", 4, "U-Net width of the memory runs.")
_OUT = flags.DEFINE_string("out", str(REPO / "benchmarks" / "results"), "Results directory.")
_CHILD = flags.DEFINE_string("child", None, "Internal: run one memory case from this JSON.")


def _rss_kib(field: str) -> int:
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1])
  return 0


def build_model(num_classes: int, width: int, depth: int, dtype: str, seed: int = 0):
  """A classic U-Net with random weights, built abstractly (no slow eager initialisation)."""
  import jax.numpy as jnp
  from flax import nnx
  from bonejax import models
  abstract = nnx.eval_shape(lambda: models.create(
      "unet", num_classes=num_classes, in_channels=1, rngs=nnx.Rngs(seed), depth=depth,
      width=width, dtype=jnp.dtype(dtype).type))
  model = models.fill_from_numpy(abstract, seed)
  model.eval()
  return model


def synthetic_volume(shape, seed: int = 0):
  import numpy as np
  rng = np.random.default_rng(seed)
  z = np.arange(shape[0])[:, None, None]
  y = np.arange(shape[1])[None, :, None]
  x = np.arange(shape[2])[None, None, :]
  v = 20000 + 15000 * np.sin(z / 7.0) * np.cos(y / 9.0) + 8000 * np.sin(x / 5.0)
  return np.clip(v + rng.normal(0, 2000, shape), 0, 65535).astype(np.uint16)


# ---------------------------------------------------------------------------------------------
# Throughput.
# ---------------------------------------------------------------------------------------------


def bare_forward(engine, shape_counts):
  """A function timing one pass of the bare jitted forward over the same planes: same shapes,
  counts and batches, inputs already on the device, two calls in flight like the pipeline."""
  import collections
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  graphdef = engine.graphdef
  cdt = engine.dtype or jnp.float32
  forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
  cases = []
  for (h, w), (count, batch) in shape_counts.items():
    hp, wp = -(-h // engine.stride) * engine.stride, -(-w // engine.stride) * engine.stride
    x = jax.device_put(jnp.asarray(np.random.default_rng(0).random((batch, hp, wp, 1)), cdt))
    forward(engine.state, x).block_until_ready()  # compile
    cases.append((x, -(-count // batch)))

  def run() -> float:
    t = time.perf_counter()
    for x, calls in cases:
      pending = collections.deque()
      for _ in range(calls):
        pending.append(forward(engine.state, x))
        if len(pending) > 2:
          pending.popleft().block_until_ready()
      for y in pending:
        y.block_until_ready()
    return time.perf_counter() - t

  return run


def throughput(results: dict) -> list[dict]:
  import numpy as np
  from bonejax import predict
  from bonejax.io import intensity
  from bonejax.predict import rotate
  shape = tuple(int(s) for s in _SHAPE.value.split(","))
  vol = synthetic_volume(shape)
  stats = intensity.compute_stats(vol)
  model = build_model(3, _WIDTH.value, _DEPTH.value, _DTYPE.value)
  engine = predict.make_engine(model, batch_size=_BATCH.value, memory_budget_gb=8.0)
  rows = []
  for planes in [int(p) for p in _PLANES.value.split(",") if p]:
    sets = predict.plane_sets(planes)
    run = lambda: predict.predict_volume(engine, vol, stats=stats, planes=planes,  # noqa: E731
                                         memory_budget_gb=8.0)
    t = time.perf_counter()
    run()
    cold = time.perf_counter() - t
    shape_counts: dict = {}
    plane_voxels = 0
    for ps in sets:
      full = shape if ps.rot45 is None else rotate.Rotation(ps.rot45, shape).rotated_shape
      hw = tuple(s for a, s in enumerate(full) if a != ps.axis)
      plan = engine.plan(hw, np.uint16, ps.k90)
      hw = hw[::-1] if ps.k90 % 2 else hw
      count, _ = shape_counts.get(hw, (0, plan.batch))
      shape_counts[hw] = (count + full[ps.axis], plan.batch)
      plane_voxels += math.prod(full)
    bare_run = bare_forward(engine, shape_counts)
    # Interleaved, so both see the same load on a shared machine.
    pipes, bares = [], []
    for _ in range(_REPEATS.value):
      t = time.perf_counter()
      run()
      pipes.append(time.perf_counter() - t)
      bares.append(bare_run())
    pipe, bare = common.median(pipes), common.median(bares)
    eff = common.median([b / p for b, p in zip(bares, pipes)])
    voxels = math.prod(shape)
    rows.append({"planes": planes, "shape": list(shape), "plane_voxels": plane_voxels,
                 "pipeline_s": round(pipe, 3), "cold_s": round(cold, 3),
                 "bare_forward_s": round(bare, 3),
                 "voxels_per_s": round(voxels / pipe), "bare_voxels_per_s": round(voxels / bare),
                 "efficiency": round(eff, 3), "pipeline_runs": [round(x, 3) for x in pipes],
                 "bare_runs": [round(x, 3) for x in bares]})
    print(f"planes={planes}: pipeline {pipe:.2f} s ({voxels / pipe:,.0f} vox/s), bare forward "
          f"{bare:.2f} s, efficiency {eff:.2f}", flush=True)
  results["throughput_config"] = {"model": "unet", "width": _WIDTH.value, "depth": _DEPTH.value,
                                  "batch_size": _BATCH.value, "dtype": _DTYPE.value,
                                  "plans": engine.describe()}
  return rows


# ---------------------------------------------------------------------------------------------
# Memory (one subprocess per case).
# ---------------------------------------------------------------------------------------------


def memory_child(spec: dict) -> dict:
  before_import = _rss_kib("VmRSS")
  import jax  # noqa: F401
  from bonejax import predict
  import jax.numpy as jnp
  jnp.zeros(1).block_until_ready()  # the runtime is up
  baseline = _rss_kib("VmRSS")
  t = time.perf_counter()
  predictor = predict.Predictor(spec["bundle"], planes=spec["planes"],
                                memory_budget_gb=spec["budget"], batch_size=spec["batch"],
                                progress=False)
  res = predictor.predict(spec["scan"], spec["output"], overwrite=True, keep_labels=False)
  return {"z": spec["z"], "mode": res["mode"], "seconds": round(time.perf_counter() - t, 2),
          "voxels_per_s": res["voxels_per_second"], "baseline_rss_mb": round(baseline / 1024, 1),
          "peak_rss_mb": round(common.peak_rss_mb(), 1),
          "python_rss_mb": round(before_import / 1024, 1), "scratch_chunk": res["scratch_chunk"]}


def memory(results: dict) -> list[dict]:
  from bonejax.data import store
  from bonejax.models import bundle
  rows = []
  with tempfile.TemporaryDirectory(prefix="bonejax-bench-") as tmp:
    tmp = Path(tmp)
    model = build_model(3, _MEM_WIDTH.value, 2, "float32")
    meta = bundle.make_meta(model_name="unet", model_kwargs={"depth": 2, "width": _MEM_WIDTH.value},
                            classes=["background", "bone", "pore"], in_channels=1,
                            normalization="percentile", patch_size=64, train_axes=[0, 1, 2])
    bundle.save_bundle(tmp / "model", model, meta)
    p = _MEM_PLANE.value
    for z in [int(v) for v in _MEM_Z.value.split(",") if v]:
      store.write_scan(tmp / f"scan{z}", synthetic_volume((z, p, p), seed=z))
      spec = {"bundle": str(tmp / "model"), "scan": str(tmp / f"scan{z}"),
              "output": str(tmp / f"pred{z}.zarr"), "planes": _MEM_PLANES.value,
              "budget": _MEM_BUDGET.value, "batch": _BATCH.value, "z": z}
      row = common.run_json([sys.executable, __file__, f"--child={json.dumps(spec)}"],
                            timeout=3600, env={"BONEJAX_CACHE_BYTES": str(32 << 20)})
      row.pop("wall_seconds", None)
      row.pop("child_peak_rss_mb", None)  # the child reports its own VmHWM as peak_rss_mb
      row["volume_mb"] = round(z * p * p * 2 / 2**20, 1)
      row["probs_mb"] = round(z * p * p * 3 * 4 / 2**20, 1)
      rows.append(row)
      print(f"Z={z}: {row['mode']}, peak RSS {row['peak_rss_mb']} MB (runtime "
            f"{row['baseline_rss_mb']} MB), {row['seconds']} s", flush=True)
      shutil.rmtree(tmp / f"scan{z}", ignore_errors=True)
      shutil.rmtree(tmp / f"pred{z}.zarr", ignore_errors=True)
  results["memory_config"] = {"plane": [p, p], "budget_gb": _MEM_BUDGET.value,
                              "planes": _MEM_PLANES.value, "model": "unet",
                              "width": _MEM_WIDTH.value, "depth": 2}
  return rows


# ---------------------------------------------------------------------------------------------


def markdown(results: dict) -> str:
  m = results["machine"]
  load = results["load_average"]
  lines = [f"# predict throughput: {m['tag']}", "",
           f"{common.machine_line(m)}; load average {load['start']} -> {load['end']}.", "",
           f"Command: `{results['command']}`", "",
           "## Throughput (in memory, warm; medians of interleaved repeats)", "",
           f"Model: {json.dumps({k: v for k, v in results.get('throughput_config', {}).items() if k != 'plans'})}",
           "", "| planes | volume | pipeline s | voxels/s | bare forward s | bare voxels/s | "
           "efficiency | first run s (compiles) |", "|---|---|---|---|---|---|---|---|"]
  for r in results["throughput"]:
    lines.append(f"| {r['planes']} | {'x'.join(map(str, r['shape']))} | {r['pipeline_s']} | "
                 f"{r['voxels_per_s']:,} | {r['bare_forward_s']} | {r['bare_voxels_per_s']:,} | "
                 f"{r['efficiency']} | {r['cold_s']} |")
  mc = results.get("memory_config", {"planes": None, "budget_gb": None, "plane": [0, 0],
                                      "width": None})
  lines += ["", f"## Peak memory vs depth (Predictor.predict, planes={mc['planes']}, "
            f"budget {mc['budget_gb']} GB, planes {mc['plane'][0]}x{mc['plane'][1]}, "
            f"unet width {mc['width']})", "",
            "| Z | mode | volume MB | probabilities MB | runtime RSS MB | peak RSS MB | "
            "peak - runtime MB | seconds |", "|---|---|---|---|---|---|---|---|"]
  for r in results["memory"]:
    lines.append(f"| {r['z']} | {r['mode']} | {r['volume_mb']} | {r['probs_mb']} | "
                 f"{r['baseline_rss_mb']} | {r['peak_rss_mb']} | "
                 f"{round(r['peak_rss_mb'] - r['baseline_rss_mb'], 1)} | {r['seconds']} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if _CHILD.value:
    print(json.dumps(memory_child(json.loads(_CHILD.value))), flush=True)
    return
  results = {"machine": common.machine(),
             "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
             "load_average": {"start": common.load_average()}}
  print(json.dumps(results["machine"]), flush=True)
  results["throughput"] = throughput(results) if _PLANES.value else []
  results["memory"] = memory(results) if _MEM_Z.value else []
  results["load_average"]["end"] = common.load_average()
  md = markdown(results)
  paths = common.write_results("predict_throughput", results, md, results_dir=_OUT.value)
  print(md)
  print(f"wrote {paths['json']} and {paths['md']}")


if __name__ == "__main__":
  app.run(main)
