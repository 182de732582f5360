r"""3D sliding-window prediction of a 256^3 scan: host memory against the budget, over devices.

  python benchmarks/predict3d_memory.py            # 2 shared CPU cores: ~40 min a configuration
  python benchmarks/predict3d_memory.py --shape=512,512,512 --model=unet3d_resnet18 \
      --window=128 --budgets=1,4 --devices=1                  # a GPU

The goal of issue 28: a 256^3 scan predicted by 3D windows (`predict.windows3d`) with host
memory bounded by the budget, whatever the scan's size, and batches spread over every device.
Each configuration (memory budget x devices) runs in a fresh process: the scan is read lazily
from a zarr v3 scan (uint16, stored statistics), the labels written slab by slab to a zarr on
disk, nothing of the scan's size held in memory. Reported: the plan's host bytes (one Z group's
accumulators and input), the process's peak RSS (ru_maxrss: includes Python, JAX, XLA and the
compiled model, so compare configurations, not absolute values), voxels/s (compilation excluded: the engine is warmed on one window first), and the size of what a
whole-scan accumulator would take. On a CPU the devices are fake (JAX_NUM_CPU_DEVICES: they
share the cores; the figures show that sharding works, not a speed-up).

Prints a table and writes benchmarks/results/predict3d_memory_<machine>.{json,md}.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from absl import app, flags  # noqa: E402

_SHAPE = flags.DEFINE_string("shape", "256,256,256", "Volume Z,Y,X.")
_MODEL = flags.DEFINE_string("model", "unet3d", "3D model (unet3d: --depth/--width).")
_DEPTH = flags.DEFINE_integer("depth", 2, "unet3d depth.")
_WIDTH = flags.DEFINE_integer("width", 2, "unet3d width.")
_WINDOW = flags.DEFINE_integer("window", 64, "Window side.")
_BATCH = flags.DEFINE_integer("batch_size", 2, "Windows per call and device.")
_BUDGETS = flags.DEFINE_list("budgets", ["0.05", "1"], "Host memory budgets (GB).")
_DEVICES = flags.DEFINE_list("devices", ["4", "1"], "Device counts (fake on a CPU).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Scratch (default: a temporary folder).")
_CHILD = flags.DEFINE_string("child", None, "Internal: run one configuration (JSON).")


def _child(spec: dict) -> None:
  import resource
  import time

  import numpy as np

  from bonejax import models
  from bonejax.data import store
  from bonejax.io import registry
  from bonejax.predict import windows3d
  from bonejax.predict.volumes import SlabVolume

  kwargs = dict(depth=spec["depth"], width=spec["width"]) if spec["model"] == "unet3d" else {}
  net = models.fill_from_numpy(models.abstract_model(models.create, spec["model"], num_classes=3,
                                                     in_channels=1, **kwargs))
  src = registry.open_volume(spec["scan"])
  out = Path(spec["out"])
  labels = SlabVolume(store.create_array(out, src.shape, np.uint8, (64, 64, 64)))
  engine = windows3d.make_window_engine(net, devices=spec["devices"])
  w = spec["window"]  # compile on one window's worth of zeros: the timed run compiles nothing
  windows3d.predict_volume_3d(engine, np.zeros((w, w, w), src.dtype), stats=src.stats, window=w,
                              batch_size=spec["batch"])
  t0 = time.perf_counter()
  res = windows3d.predict_volume_3d(engine, src, window=w, batch_size=spec["batch"],
                                    keep_labels=False, labels_out=labels,
                                    memory_budget_gb=spec["budget"])
  dt = time.perf_counter() - t0
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(json.dumps({**res.summary(), "seconds": dt, "voxels_per_second": math.prod(src.shape) / dt,
                    "peak_rss_bytes": peak}))


def main(argv):
  del argv
  if _CHILD.value:
    return _child(json.loads(_CHILD.value))
  from benchmarks import common
  from benchmarks.synthetic import synthetic_scan
  shape = tuple(int(s) for s in _SHAPE.value.split(","))
  with tempfile.TemporaryDirectory(dir=_WORKDIR.value) as tmp:
    scan = synthetic_scan(Path(tmp) / "scan", shape)
    rows = []
    for devices in (int(d) for d in _DEVICES.value):
      for budget in (float(b) for b in _BUDGETS.value):
        spec = {"scan": str(scan), "out": str(Path(tmp) / f"l_{devices}_{budget}.zarr"),
                "model": _MODEL.value, "depth": _DEPTH.value, "width": _WIDTH.value,
                "window": _WINDOW.value, "batch": _BATCH.value, "devices": devices,
                "budget": budget}
        env = dict(os.environ)
        if "JAX_PLATFORMS" not in env or env["JAX_PLATFORMS"] == "cpu":
          env["JAX_NUM_CPU_DEVICES"] = str(max(devices, 1))
        run = subprocess.run([sys.executable, __file__, f"--child={json.dumps(spec)}"],
                             capture_output=True, text=True, env=env, check=False)
        if run.returncode:
          print(run.stderr[-3000:], file=sys.stderr)
          raise SystemExit(f"configuration {spec} failed")
        r = json.loads(run.stdout.strip().splitlines()[-1])
        r.update(budget_gb=budget, devices=devices)
        rows.append(r)
        print(json.dumps(r), flush=True)
  whole = math.prod(shape) * 4 * (3 + 1)
  info = common.machine()
  cols = ["devices", "budget_gb", "group", "windows", "host_bytes", "peak_rss_bytes",
          "voxels_per_second", "seconds"]
  table = common.markdown_table(rows, cols)
  md = (f"# 3D window prediction, {'x'.join(map(str, shape))} uint16, {_MODEL.value}, window "
        f"{_WINDOW.value}, overlap 0.5\n\n{common.machine_line(info)}\n\n"
        f"A whole-scan accumulator (3 classes + weights, float32) would take {whole:,} bytes; "
        f"the scan itself is {math.prod(shape) * 2:,} bytes.\n\n{table}\n")
  print(md)
  common.write_results("predict3d_memory", {"machine": info, "shape": shape, "rows": rows,
                                            "whole_accumulator_bytes": whole}, md)


if __name__ == "__main__":
  app.run(main)
