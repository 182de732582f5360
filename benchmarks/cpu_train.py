"""Training step only, bonejax vs PyTorch on this CPU, side by side in one run.

    python benchmarks/cpu_train.py                          # unet_resnet18, batch 8, 256 px
    python benchmarks/cpu_train.py --batch=8 --size=256 --repeats=5 --calls=2
    python benchmarks/cpu_train.py --size=64 --repeats=2 --results_dir=/tmp/trn   # a smoke run

One step = forward, cross-entropy, backward, Adam update, on a batch already in memory (the
input pipeline is in neither figure; benchmarks/train_throughput.py measures bonejax's).

  bonejax fp32 / bf16        the trainer's own jitted, donated step
                             (`bonejax.train.trainer.make_train_step` via
                             `benchmarks.common.bonejax_train_step`: augmentation off, Adam, CE)
  bonejax fp32 / bf16 onednn the same step on `inference_graph.lower_convs(model,
                             policy="onednn")`: every convolution on oneDNN, forward and
                             backward (bonejax.models.onednn, XLA FFI calls under a custom_vjp);
                             same parameters, same state tree, BatchNorm in train mode
  bonejax bf16 <policy>      the same under `--policy` ("measure": forward + backward of each
                             lowering timed per layer, bf16 dot products and oneDNN included)
  bonejax bf16 onednn convs-only / <policy> fp32-edges
                             the step before a change, for A/B in one run: XLA's BatchNorm and
                             max-pool; the first conv and head as float32 convolutions instead
                             of three bf16 products each (`onednn.bf16x3` off)
  torch fp32 NCHW / fp32 channels-last / bf16 autocast channels-last
                             smp `Unet("resnet18")` (else MONAI FlexibleUNet), Adam + CE

Workers and interleaving as in cpu_forward.py (benchmarks/cpu_workers.py). Ratios divide by
the fastest PyTorch variant of the run. Writes benchmarks/results/cpu_train_<machine>.{json,md}.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from benchmarks import common, cpu_workers  # noqa: E402
from bonejax.cli import runner  # noqa: E402
from bonejax.core import errors

_BATCH = flags.DEFINE_integer("batch", 8, "Patches per step.")
_SIZE = flags.DEFINE_integer("size", 256, "Patch side in pixels.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Rounds over all variants (median over rounds).")
_CALLS = flags.DEFINE_integer("calls", 2, "Steps per timed batch.")
_POLICY = flags.DEFINE_string("policy", "measure", "Lowering policy of the `bonejax bf16 "
                              "<policy>` variant.")
_VARIANTS = flags.DEFINE_list("variants", [], "Only these variants (default: all).")
_SIDES = flags.DEFINE_list("sides", ["bonejax", "torch"], "Workers to run.")
_MODEL = flags.DEFINE_string("model", "unet_resnet18", "bonejax zoo model (`unet-dDwW` for the "
                             "classic U-Net's depth and width); the torch side has "
                             "unet_resnet18 only.")
_WORKER = flags.DEFINE_string("worker", "", "internal: run as the worker of this side.")
_TAG = flags.DEFINE_string("tag", "", "Machine tag of the result files (default: detected).")
_RESULTS = flags.DEFINE_string("results_dir", str(common.RESULTS), "Where result files go.")


def _wanted(name: str) -> bool:
  return not _VARIANTS.value or name in _VARIANTS.value


def bonejax_worker(batch: int, size: int, policy: str, side: str = "bonejax") -> None:
  heap, suffix = cpu_workers.setup_heap(side)  # before JAX starts its threads
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from benchmarks.efficiency_vs_iou import parse_model
  from bonejax import models
  from bonejax.models import inference_graph, onednn
  from bonejax.models.onednn import bf16x3

  t0 = time.perf_counter()
  name_, kwargs = parse_model(_MODEL.value)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, size, size, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=(batch, size, size)), jnp.int32)
  variants, info, planners = {}, {}, {}
  for name, dtype, lower in (("bonejax fp32", "float32", None),
                             ("bonejax bf16", "bfloat16", None),
                             ("bonejax fp32 onednn", "float32", "onednn"),
                             ("bonejax bf16 onednn", "bfloat16", "onednn"),
                             ("bonejax bf16 onednn convs-only", "bfloat16", "onednn-convs"),
                             (f"bonejax bf16 {policy} fp32-edges", "bfloat16", f"{policy}-edges"),
                             (f"bonejax bf16 {policy}", "bfloat16", policy)):
    name += suffix
    if not _wanted(name) or name in variants or lower == "xla":
      continue
    if lower and lower.startswith("onednn") and not onednn.available():
      continue  # the note says why
    model = models.fill_from_numpy(models.abstract_model(
        models.create, name_, num_classes=3, in_channels=1, dtype=jnp.dtype(dtype), **kwargs))
    info["params"] = models.count_params(model)
    # "-edges": the FP32_EDGES layers as float32 convolutions (before 2026-12-07's fourth
    # session), not as three bf16 products (onednn.bf16x3); read when the step is traced.
    bf16x3.ENABLED = not (lower or "").endswith("-edges")
    if lower:
      model = inference_graph.lower_convs(
          model, policy=lower.replace("-convs", "").replace("-edges", ""))
      if lower.endswith("-convs"):  # oneDNN's convolutions only: XLA's BatchNorm and max-pool
        for _, node in nnx.iter_graph(model):  # (the step before 2026-12-07's second session)
          if isinstance(node, nnx.BatchNorm):
            node.__class__ = nnx.BatchNorm
          if getattr(node, "pool_lowering", None) == "onednn":
            node.pool_lowering = "xla"
      planners[name] = next(m.planner for _, m in nnx.iter_graph(model)
                            if isinstance(m, inference_graph.FastConv))
    step, state, source = common.bonejax_train_step(model, 1e-3)
    info["train_step"] = source
    holder = {"state": state}

    def one(step=step, holder=holder):
      holder["state"], loss = step(holder["state"], x, y)
      return loss

    jax.block_until_ready(one())  # compile (and measure layers)
    jax.block_until_ready(one())
    bf16x3.ENABLED = True
    variants[name] = one
  info["onednn"] = onednn.describe()
  info["heap"] = heap
  cpu_workers.serve_jax(variants, info, planners, t0)


def torch_worker(batch: int, size: int) -> None:
  import copy

  import numpy as np
  import torch
  torch.set_num_threads(common.usable_cores())
  base, arch = cpu_workers.torch_unet_resnet18()
  rng = np.random.default_rng(0)
  x = torch.from_numpy(rng.normal(size=(batch, 1, size, size)).astype(np.float32))
  y = torch.from_numpy(rng.integers(0, 3, size=(batch, size, size))).long()
  loss_fn = torch.nn.CrossEntropyLoss()
  variants = {}
  for name, cl, bf16 in (("torch fp32 NCHW", False, False),
                         ("torch fp32 channels-last", True, False),
                         ("torch bf16 channels-last", True, True)):
    if not _wanted(name):
      continue
    net = copy.deepcopy(base).train()
    fmt = torch.channels_last if cl else torch.contiguous_format
    net = net.to(memory_format=fmt)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    inp = x.contiguous(memory_format=fmt)

    def one(net=net, opt=opt, inp=inp, bf16=bf16):
      opt.zero_grad(set_to_none=True)
      with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = net(inp)
      loss = loss_fn(logits.float(), y)
      loss.backward()
      opt.step()
      return loss

    one(), one()
    variants[name] = one
  cpu_workers.serve(variants, cpu_workers.torch_info(base, arch), lambda out: float(out))


def main(argv):
  del argv
  batch, size = _BATCH.value, _SIZE.value
  if _WORKER.value in ("bonejax", cpu_workers.HEAP_OFF_SIDE):
    return bonejax_worker(batch, size, _POLICY.value, _WORKER.value)
  if _WORKER.value == "torch":
    return torch_worker(batch, size)
  if _MODEL.value != "unet_resnet18" and "torch" in _SIDES.value:
    raise errors.UserError(f"--model={_MODEL.value}: the torch side has unet_resnet18 only; "
                        "add --sides=bonejax")
  passed = [f"--batch={batch}", f"--size={size}", f"--policy={_POLICY.value}",
            f"--model={_MODEL.value}"]
  if _VARIANTS.value:
    passed.append(f"--variants={','.join(_VARIANTS.value)}")
  order, times, ready, load = cpu_workers.run(__file__, _SIDES.value, passed, _REPEATS.value,
                                              _CALLS.value, lambda s: batch / s, "patches/s")
  # Ratios divide by the fastest PyTorch variant of this run.
  torch_best = min((v for v in times if v.startswith("torch")),
                   key=lambda v: common.median(times[v]), default=None)
  rows = cpu_workers.rate_rows(order, times, ready, batch, torch_best, "pps")
  return cpu_workers.report(
      "cpu_train", "Training step, bonejax vs PyTorch",
      f"`{_MODEL.value}` (1 in, 3 classes), batch {batch} x {size} x {size}, Adam + "
      f"cross-entropy, batch in memory; medians of {_REPEATS.value} rounds of {_CALLS.value} "
      f"step(s), all variants interleaved in one run (each framework in its own worker "
      f"process). PyTorch model: {ready.get('torch', {}).get('arch', '-')}. bonejax step: "
      f"{ready.get('bonejax', {}).get('train_step', '-')}; lowered variants: "
      f"`lower_convs(policy=...)` with the policy named; oneDNN: "
      f"{ready.get('bonejax', {}).get('onednn', '-')}; bonejax.core.heap: "
      f"{ready.get('bonejax', {}).get('heap', '-')} (`heap-off`: a worker without it).",
      rows, "pps", ["engine", "parameters", "patches/s", "ms per step", "rel. half-range",
                    f"/ {torch_best or 'torch'}"],
      config={"model": _MODEL.value, "batch": batch, "size": size, "repeats": _REPEATS.value, "calls": _CALLS.value,
              "policy": _POLICY.value},
      times=times, ready=ready, load=load, tag=_TAG.value, results_dir=_RESULTS.value)


if __name__ == "__main__":
  runner.run(main)
