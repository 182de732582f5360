"""Forward pass only, bonejax vs PyTorch on this CPU, side by side in one run.

    python benchmarks/cpu_forward.py                                  # unet_resnet18, 4 x 256^2
    python benchmarks/cpu_forward.py --batch=4 --size=256 --repeats=5 --calls=1
    python benchmarks/cpu_forward.py --repeats=2 --size=64 --results_dir=/tmp/fwd   # a smoke run

`unet_resnet18` (1 channel in, 3 classes, 14,322,227 parameters) on B x S x S, logits out:

  bonejax fp32 / bf16                the model as trained (`model.eval()`), jitted
  bonejax graph fp32 / bf16 xla      `build_inference_model(model, policy="xla", dtype)`:
                                     BatchNorm folded, XLA's convolutions
  bonejax graph fp32 / bf16 onednn   the same graph, every convolution on oneDNN
                                     (`policy="onednn"`: bonejax.models.onednn, an XLA FFI call),
                                     ReLUs and residual adds fused into its post-ops
                                     (bonejax.models.graph_fusion)
  bonejax graph fp32 / bf16 onednn unfused
                                     the same without that fusion (`fuse=False`): the ReLUs,
                                     adds, concatenations and max-pool as XLA operations
  bonejax graph fp32 / bf16 onednn before
                                     unfused and the kernels reordered on every call
                                     (`onednn.KEEP_KERNELS = False`): the graph before issue 25
  bonejax graph fp32 / bf16 <policy> the same graph under `--policy` (default "auto", what
                                     predict.py runs; "measure" times every lowering per layer
                                     once and caches the choice in ~/.cache/bonejax)
  bonejax graph bf16 <policy> fp32-edges  the same, its first conv and head as float32
                                     convolutions instead of three bf16 products each
                                     (`onednn.bf16x3`, off: the graph before it)
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
from bonejax.cli import runner  # noqa: E402

_BATCH = flags.DEFINE_integer("batch", 4, "Images per forward call.")
_SIZE = flags.DEFINE_integer("size", 256, "Image side in pixels.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Rounds over all variants (median over rounds).")
_CALLS = flags.DEFINE_integer("calls", 1, "Forward calls per timed batch.")
_POLICY = flags.DEFINE_string("policy", "auto", "Lowering policy of the third graph variant "
                              "(besides policy xla and onednn).")
_SIDES = flags.DEFINE_list("sides", ["bonejax", "torch"], "Workers to run.")
_WORKER = flags.DEFINE_string("worker", "", "internal: run as the worker of this side.")
_TAG = flags.DEFINE_string("tag", "", "Machine tag of the result files (default: detected).")
_RESULTS = flags.DEFINE_string("results_dir", str(common.RESULTS), "Where result files go.")

REFERENCE = "torch bf16 channels-last"


# ---------------------------------------------------------------------------------------------
# Workers: build every variant, then time them on request (benchmarks/cpu_workers.py).
# ---------------------------------------------------------------------------------------------


def bonejax_worker(batch: int, size: int, policy: str, side: str = "bonejax") -> None:
  heap, suffix = cpu_workers.setup_heap(side)  # before JAX starts its threads
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from bonejax import models
  from bonejax.models import inference_graph, onednn
  from bonejax.models.onednn import bf16x3

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
    todo = [] if suffix else [(f"bonejax {short}", eval_model)]
    graphs = [(pol, "") for pol in dict.fromkeys(("xla", "onednn", policy))]
    edges = [(policy, " fp32-edges")] if dtype == "bfloat16" else []
    for pol, how in (graphs[:2] + [("onednn", " unfused"), ("onednn", " before")] + graphs[2:]
                     + edges):
      if pol == "onednn" and not onednn.available():
        continue  # the note says why
      if suffix and (pol, how) != (policy, ""):
        continue  # the heap-off worker: the default graph only (what predict.py runs)
      graph = inference_graph.build_inference_model(model, dtype=jnp.dtype(dtype), policy=pol,
                                                    fuse=how in ("", " fp32-edges"))
      name = f"bonejax graph {short} {pol}{how}{suffix}"
      planners[name] = graph.planner
      todo.append((name, graph))
    for name, m in todo:
      graphdef, state = nnx.split(m)
      fn = jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x))
      onednn.KEEP_KERNELS = not name.endswith(" before")  # read while tracing
      # " fp32-edges": the FP32_EDGES layers as float32 convolutions, not as three bf16
      # products (onednn.bf16x3; before 2026-12-07's fourth session).
      bf16x3.ENABLED = not name.endswith(" fp32-edges")
      jax.block_until_ready(fn(state, x))  # compile (and, for the graph, measure layers)
      onednn.KEEP_KERNELS = bf16x3.ENABLED = True
      variants[name] = (lambda fn=fn, s=state: fn(s, x))
  info["onednn"] = onednn.describe()
  info["heap"] = heap
  cpu_workers.serve_jax(variants, info, planners, t0)


def torch_worker(batch: int, size: int) -> None:
  import numpy as np
  import torch
  torch.set_num_threads(common.usable_cores())
  net, arch = cpu_workers.torch_unet_resnet18()
  net.eval()
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
  cpu_workers.serve(variants, cpu_workers.torch_info(net, arch), lambda out: None)


# ---------------------------------------------------------------------------------------------
# The driver.
# ---------------------------------------------------------------------------------------------


def main(argv):
  del argv
  batch, size = _BATCH.value, _SIZE.value
  if _WORKER.value in ("bonejax", cpu_workers.HEAP_OFF_SIDE):
    return bonejax_worker(batch, size, _POLICY.value, _WORKER.value)
  if _WORKER.value == "torch":
    return torch_worker(batch, size)
  passed = [f"--batch={batch}", f"--size={size}", f"--policy={_POLICY.value}"]
  order, times, ready, load = cpu_workers.run(__file__, _SIDES.value, passed, _REPEATS.value,
                                              _CALLS.value, lambda s: batch / s, "images/s")
  rows = cpu_workers.rate_rows(order, times, ready, batch, REFERENCE, "ips")
  torch_arch = ready.get("torch", {}).get("arch", "-")
  return cpu_workers.report(
      "cpu_forward", "Forward only, bonejax vs PyTorch",
      f"`unet_resnet18` (1 in, 3 classes) on {batch} x {size} x {size}, logits; medians of "
      f"{_REPEATS.value} rounds of {_CALLS.value} call(s), all variants interleaved in one run "
      f"(each framework in its own worker process). PyTorch model: {torch_arch}. Graph "
      f"variants: `build_inference_model(policy=...)` with the policy named; oneDNN: "
      f"{ready.get('bonejax', {}).get('onednn', '-')}; bonejax.core.heap: "
      f"{ready.get('bonejax', {}).get('heap', '-')} (`heap-off`: a worker without it).",
      rows, "ips", ["engine", "parameters", "images/s", "ms per call", "rel. half-range",
                    f"/ {REFERENCE}"],
      config={"batch": batch, "size": size, "repeats": _REPEATS.value, "calls": _CALLS.value,
              "policy": _POLICY.value},
      times=times, ready=ready, load=load, tag=_TAG.value, results_dir=_RESULTS.value)


if __name__ == "__main__":
  runner.run(main)
