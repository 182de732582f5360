"""Forward pass only, bonejax vs PyTorch on this CPU, side by side in one run.

    python benchmarks/cpu_forward.py                                  # unet_resnet18, 4 x 256^2
    python benchmarks/cpu_forward.py --batch=4 --size=256 --repeats=5 --calls=1
    python benchmarks/cpu_forward.py --repeats=2 --size=64 --results_dir=/tmp/fwd   # a smoke run

`unet_resnet18` (1 channel in, 3 classes, 14,322,227 parameters) on B x S x S, logits out:

  bonejax fp32 / bf16                the model as trained (`model.eval()`), jitted
  bonejax graph fp32 / bf16          `build_inference_model(model, policy=--policy, dtype)`:
                                     BatchNorm folded, per-layer lowering (measured choices are
                                     cached in ~/.cache/bonejax, so later runs start fast)
  PyTorch fp32 NCHW / fp32 channels-last / bf16 autocast channels-last
                                     smp `Unet("resnet18")` (the same network, same parameter
                                     count) if segmentation_models_pytorch is installed, else
                                     MONAI `FlexibleUNet(resnet18)` (its own decoder); eval,
                                     `torch.inference_mode()`

Each framework runs in its own worker process (no thread pools fighting inside one process);
both stay alive and the driver asks them in turn for one timed batch of `--calls` forward calls
per variant, round-robin over all variants, `--repeats` rounds: slow drift in machine load hits
every variant alike. Medians per variant; the ratio columns divide by PyTorch bf16 channels-last.
Writes benchmarks/results/cpu_forward_<machine>.{json,md} with the CPU model and flags.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from benchmarks import common, cpu_workers  # noqa: E402
from bonejax import cli  # noqa: E402

_BATCH = flags.DEFINE_integer("batch", 4, "Images per forward call.")
_SIZE = flags.DEFINE_integer("size", 256, "Image side in pixels.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Rounds over all variants (median over rounds).")
_CALLS = flags.DEFINE_integer("calls", 1, "Forward calls per timed batch.")
_POLICY = flags.DEFINE_string("policy", "measure", "Lowering policy of the graph variants.")
_SIDES = flags.DEFINE_list("sides", ["bonejax", "torch"], "Workers to run.")
_WORKER = flags.DEFINE_string("worker", "", "internal: run as the worker of this side.")
_TAG = flags.DEFINE_string("tag", "", "Machine tag of the result files (default: detected).")
_RESULTS = flags.DEFINE_string("results_dir", str(common.RESULTS), "Where result files go.")

REFERENCE = "torch bf16 channels-last"


# ---------------------------------------------------------------------------------------------
# Workers: build every variant, then time them on request (benchmarks/cpu_workers.py).
# ---------------------------------------------------------------------------------------------


def bonejax_worker(batch: int, size: int, policy: str) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from bonejax import models
  from bonejax.models import inference_graph

  t0 = time.perf_counter()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, size, size, 1)), jnp.float32)
  variants, info, planners = {}, {}, {}
  for dtype in ("float32", "bfloat16"):
    model = models.fill_from_numpy(models.abstract_model(
        models.create, "unet_resnet18", num_classes=3, in_channels=1, dtype=jnp.dtype(dtype)))
    info["params"] = models.count_params(model)
    short = "fp32" if dtype == "float32" else "bf16"
    eval_model = nnx.view(model, use_running_average=True, deterministic=True,
                          raise_if_not_found=False)
    graph = inference_graph.build_inference_model(model, dtype=jnp.dtype(dtype), policy=policy)
    planners[f"bonejax graph {short}"] = graph.planner
    for name, m in ((f"bonejax {short}", eval_model), (f"bonejax graph {short}", graph)):
      graphdef, state = nnx.split(m)
      fn = jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x))
      jax.block_until_ready(fn(state, x))  # compile (and, for the graph, measure layers)
      variants[name] = (lambda fn=fn, s=state: fn(s, x))
  info["build_seconds"] = time.perf_counter() - t0
  info["lowering"] = {k: p.report() for k, p in planners.items()}
  info["jax"] = jax.__version__
  cpu_workers.serve(variants, info, jax.block_until_ready)


def torch_worker(batch: int, size: int) -> None:
  import numpy as np
  import torch
  torch.set_num_threads(common.usable_cores())
  net, arch = cpu_workers.torch_unet_resnet18()
  net.eval()
  params = sum(p.numel() for p in net.parameters() if p.requires_grad)
  x = torch.from_numpy(np.random.default_rng(0).normal(size=(batch, 1, size, size))
                       .astype(np.float32))
  net_cl = __import__("copy").deepcopy(net).to(memory_format=torch.channels_last)
  x_cl = x.contiguous(memory_format=torch.channels_last)

  def run(model, inp, bf16):
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      return model(inp)

  variants = {"torch fp32 NCHW": lambda: run(net, x, False),
              "torch fp32 channels-last": lambda: run(net_cl, x_cl, False),
              REFERENCE: lambda: run(net_cl, x_cl, True)}
  for fn in variants.values():  # oneDNN picks and caches its kernels on the first calls
    fn(), fn()
  cpu_workers.serve(variants, {"params": params, "arch": arch, "torch": torch.__version__,
                    "threads": torch.get_num_threads()}, lambda out: None)


# ---------------------------------------------------------------------------------------------
# The driver.
# ---------------------------------------------------------------------------------------------


def main(argv):
  del argv
  batch, size = _BATCH.value, _SIZE.value
  if _WORKER.value == "bonejax":
    return bonejax_worker(batch, size, _POLICY.value)
  if _WORKER.value == "torch":
    return torch_worker(batch, size)
  load_start = common.load_average()
  passed = [f"--batch={batch}", f"--size={size}", f"--policy={_POLICY.value}"]
  workers, ready = cpu_workers.start(__file__, _SIDES.value, passed)
  order = [(side, v) for side in workers for v in ready[side]["ready"]]
  times = cpu_workers.interleave(workers, ready, _REPEATS.value, _CALLS.value,
                                 lambda s: batch / s, "images/s")
  for w in workers.values():
    w.close()
  load = (load_start, common.load_average())

  med = {v: common.median(t) for v, t in times.items()}
  ref = batch / med[REFERENCE] if REFERENCE in med else None
  params = {side: ready[side].get("params") for side in ready}
  rows = []
  for side, v in order:
    ips = batch / med[v]
    rows.append({"engine": v, "params": params[side], "ips": ips,
                 "ms": 1e3 * med[v], "halfrange": common.spread(times[v]).get("rel_halfrange"),
                 "ratio": ips / ref if ref else None})
  info = common.machine()
  tag = _TAG.value or info["tag"]
  info["tag"] = tag
  torch_arch = ready.get("torch", {}).get("arch", "-")
  table = common.markdown_table(
      rows, ["engine", "params", "ips", "ms", "halfrange", "ratio"],
      ["engine", "parameters", "images/s", "ms per call", "rel. half-range",
       f"/ {REFERENCE}"])
  md = "\n".join([
      f"# Forward only, bonejax vs PyTorch: {tag}", "", common.machine_line(info), "",
      f"CPU flags: {', '.join(info.get('cpu_flags', []))}. Load average at start / end: "
      f"{load[0]} / {load[1]}.", "",
      f"`unet_resnet18` (1 in, 3 classes) on {batch} x {size} x {size}, logits; medians of "
      f"{_REPEATS.value} rounds of {_CALLS.value} call(s), all variants interleaved in one run "
      f"(each framework in its own worker process). PyTorch model: {torch_arch}. Graph "
      f"variants: `build_inference_model(policy={_POLICY.value!r})`.", "", table])
  print(md)
  payload = {"config": {"batch": batch, "size": size, "repeats": _REPEATS.value,
                        "calls": _CALLS.value, "policy": _POLICY.value},
             "rows": rows, "times": times, "workers": ready,
             "load_average": {"start": load[0], "end": load[1]}, "machine": info}
  paths = common.write_results("cpu_forward", payload, md, tag=tag, results_dir=_RESULTS.value)
  return {"json": paths["json"], "md": paths["md"],
          **{r["engine"]: round(r["ips"], 3) for r in rows}}


if __name__ == "__main__":
  cli.run(main)
