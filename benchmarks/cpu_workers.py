"""Side-by-side timing across frameworks: one worker process per side, asked in turn.

Each framework runs in its own process (PyTorch's OpenMP pool and XLA's thread pool never share
one), both stay alive, and the driver asks them round-robin for one timed batch of calls per
variant, so slow drift in machine load hits every variant alike. Used by cpu_forward.py and
cpu_train.py.

Protocol (JSON lines on the worker's stdout): first {"ready": [variants], ...info}; then for
each request line "VARIANT CALLS" on stdin one {"variant", "seconds"} (seconds per call);
"quit" ends the worker.

The driver's steps, shared by both scripts: `run` times every variant interleaved, `rate_rows`
makes one table row per variant, `report` prints the table and writes the result files.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any, Callable

from benchmarks import common


def serve(variants: dict[str, Callable[[], Any]], info: dict, sync: Callable[[Any], Any]) -> None:
  """The worker side: announce the variants, then time them on request until "quit"."""
  print(json.dumps({"ready": list(variants), **info}), flush=True)
  for line in sys.stdin:
    cmd = line.split()
    if not cmd or cmd[0] == "quit":
      break
    name, calls = " ".join(cmd[:-1]), int(cmd[-1])
    fn = variants[name]
    t0 = time.perf_counter()
    for _ in range(calls):
      out = fn()
    sync(out)
    print(json.dumps({"variant": name, "seconds": (time.perf_counter() - t0) / calls}),
          flush=True)


class Worker:
  """The driver side of one worker process (`script --worker=SIDE ARGV...`)."""

  def __init__(self, script: str, side: str, argv: list[str]):
    self.side = side
    self.proc = subprocess.Popen([sys.executable, script, f"--worker={side}"] + list(argv),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 cwd=common.REPO)

  def read(self) -> dict:
    while True:
      line = self.proc.stdout.readline()
      if not line:
        raise RuntimeError(f"{self.side} worker died (exit {self.proc.wait()})")
      line = line.strip()
      if line.startswith("{"):
        return json.loads(line)

  def time(self, variant: str, calls: int) -> float:
    self.proc.stdin.write(f"{variant} {calls}\n")
    self.proc.stdin.flush()
    return self.read()["seconds"]

  def close(self) -> None:
    try:
      self.proc.stdin.write("quit\n")
      self.proc.stdin.close()
    except OSError:
      pass
    self.proc.wait(timeout=120)


# A second bonejax worker whose process keeps glibc's default allocation (bonejax.core.heap
# off): `--sides=bonejax,bonejax-heap-off,torch` times both side by side, its variants named
# "... heap-off".
HEAP_OFF_SIDE = "bonejax-heap-off"


def setup_heap(side: str) -> tuple[str, str]:
  """The bonejax worker's first step, as the commands': `bonejax.core.heap.setup()` (off in the
  HEAP_OFF_SIDE worker); (what it did, the suffix for this worker's variant names)."""
  import os
  if side == HEAP_OFF_SIDE:
    os.environ["BONEJAX_RETAIN_HEAP"] = "0"
  from bonejax.core import heap
  return heap.setup(), (" heap-off" if side == HEAP_OFF_SIDE else "")


def serve_jax(variants: dict[str, Callable[[], Any]], info: dict, planners: dict,
              started: float) -> None:
  """`serve` for the bonejax worker: adds the build time since `started` (perf_counter), each
  lowering planner's report and the jax version to `info`."""
  import jax
  info["build_seconds"] = time.perf_counter() - started
  info["lowering"] = {k: p.report() for k, p in planners.items()}
  info["jax"] = jax.__version__
  serve(variants, info, jax.block_until_ready)


def torch_info(net, arch: str) -> dict:
  """What the torch worker announces: its model's trainable parameters and description, the
  torch version and its thread count."""
  import torch
  return {"params": sum(p.numel() for p in net.parameters() if p.requires_grad), "arch": arch,
          "torch": torch.__version__, "threads": torch.get_num_threads()}


def start(script: str, sides: list[str], argv: list[str]) -> tuple[dict, dict]:
  """Starts the workers one at a time (building competes for the cores); (workers, ready)."""
  workers, ready = {}, {}
  for side in sides:
    t0 = time.perf_counter()
    workers[side] = Worker(script, side, argv)
    ready[side] = workers[side].read()
    print(f"{side}: ready in {time.perf_counter() - t0:.0f} s: {ready[side]['ready']}",
          file=sys.stderr)
  return workers, ready


def interleave(workers: dict, ready: dict, repeats: int, calls: int,
               per_call: Callable[[float], float], unit: str) -> dict[str, list[float]]:
  """Rounds over every variant of every worker (order reversed every other round)."""
  order = [(side, v) for side in workers for v in ready[side]["ready"]]
  times: dict[str, list[float]] = {v: [] for _, v in order}
  for r in range(repeats):
    for side, v in (order if r % 2 == 0 else order[::-1]):
      times[v].append(workers[side].time(v, calls))
    print(f"round {r + 1}/{repeats} ({unit}): " + ", ".join(
        f"{v} {per_call(times[v][-1]):.3g}" for _, v in order), file=sys.stderr, flush=True)
  return times


def run(script: str, sides: list[str], argv: list[str], repeats: int, calls: int,
        per_call: Callable[[float], float], unit: str) -> tuple[list, dict, dict, tuple]:
  """Starts the workers, times every variant in `repeats` interleaved rounds, stops them:
  (order: [(side, variant)], times, ready, load average at (start, end))."""
  load_start = common.load_average()
  workers, ready = start(script, sides, argv)
  order = [(side, v) for side in workers for v in ready[side]["ready"]]
  times = interleave(workers, ready, repeats, calls, per_call, unit)
  for w in workers.values():
    w.close()
  return order, times, ready, (load_start, common.load_average())


def rate_rows(order: list, times: dict, ready: dict, batch: int, reference: str | None,
              rate: str) -> list[dict]:
  """One row per variant: `rate` = batch / median seconds per call, ms per call, the relative
  half-range over rounds, and the ratio of the rate to `reference`'s (None: no ratio)."""
  med = {v: common.median(t) for v, t in times.items()}
  ref = batch / med[reference] if reference in med else None
  rows = []
  for side, v in order:
    per_second = batch / med[v]
    rows.append({"engine": v, "params": ready[side].get("params"), rate: per_second,
                 "ms": 1e3 * med[v], "halfrange": common.spread(times[v]).get("rel_halfrange"),
                 "ratio": per_second / ref if ref else None})
  return rows


def report(name: str, title: str, setup: str, rows: list[dict], rate: str, headers: list[str],
           *, config: dict, times: dict, ready: dict, load: tuple, tag: str,
           results_dir: str) -> dict:
  """Prints the Markdown report (machine, CPU flags, load, `setup`, the rows' table), writes
  results/NAME_<tag>.{json,md}; the script's return value: the paths and each variant's rate."""
  info = common.machine()
  tag = tag or info["tag"]
  info["tag"] = tag
  table = common.markdown_table(rows, ["engine", "params", rate, "ms", "halfrange", "ratio"],
                                headers)
  md = "\n".join([
      f"# {title}: {tag}", "", common.machine_line(info), "",
      f"CPU flags: {', '.join(info.get('cpu_flags', []))}. Load average at start / end: "
      f"{load[0]} / {load[1]}.", "", setup, "", table])
  print(md)
  payload = {"config": config, "rows": rows, "times": times, "workers": ready,
             "load_average": {"start": load[0], "end": load[1]}, "machine": info}
  paths = common.write_results(name, payload, md, tag=tag, results_dir=results_dir)
  return {"json": paths["json"], "md": paths["md"],
          **{r["engine"]: round(r[rate], 3) for r in rows}}


def import_torchvision_python_only() -> None:
  """smp's ResNet encoders subclass torchvision's (Python only). The torchvision wheels on PyPI
  are CUDA builds whose C extension cannot load next to a CPU torch, and torchvision's import
  registers meta kernels for that extension's ops; skipping that one module leaves the model
  code intact (nothing here calls torchvision's C ops)."""
  import types
  try:
    import torchvision  # noqa: F401
  except RuntimeError:
    for name in [m for m in sys.modules if m.startswith("torchvision")]:
      del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType(
        "torchvision._meta_registrations")
    import torchvision  # noqa: F401,F811


def torch_unet_resnet18(num_classes: int = 3):
  """(net, description): smp `Unet("resnet18")` if installed (the same network as bonejax's
  unet_resnet18, 14,322,227 parameters), else MONAI `FlexibleUNet(resnet18)`."""
  try:
    import_torchvision_python_only()
    import segmentation_models_pytorch as smp
    net = smp.Unet("resnet18", encoder_weights=None, in_channels=1, classes=num_classes)
    return net, f"smp.Unet('resnet18') (segmentation_models_pytorch {smp.__version__})"
  except ImportError:
    from monai.networks.nets import FlexibleUNet
    net = FlexibleUNet(in_channels=1, out_channels=num_classes, backbone="resnet18",
                       pretrained=False, spatial_dims=2)
    return net, "monai FlexibleUNet(resnet18) (its own decoder)"
