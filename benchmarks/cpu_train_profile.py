"""Where one training step spends its time on this CPU, operation by operation.

    python benchmarks/cpu_train_profile.py --tag=epyc-2c        # unet_resnet18, 8 x 256^2, bf16
    python benchmarks/cpu_train_profile.py --batch=1 --size=64 --calls=1 --results_dir=/tmp/p

The step benchmarks/cpu_train.py times as "bonejax bf16 onednn": the zoo model in --dtype,
`inference_graph.lower_convs(model, policy=--policy)` (every convolution on oneDNN, forward and
backward), the trainer's own jitted, donated step (`common.bonejax_train_step`: Adam,
cross-entropy, augmentation off) on a batch already in memory. The step runs --calls times under
`jax.profiler.trace`; each XLA operation's time is read from the trace and named from the
compiled HLO (benchmarks/common/xla_profile.py): each oneDNN call (forward, backward-data,
backward-weights) by its layer, every other operation by what the model code was doing when it
was traced (the source stack XLA keeps in the HLO: BatchNorm, ReLU, max-pool, upsampling, loss,
optimizer...) and whether it is forward or backward. oneDNN's own split of each call (kernel
reorder / residual copy / primitive) comes from the handler's counters
($BONEJAX_ONEDNN_PROFILE=1, set here before the extension loads).

Tables: the time per step by kind of operation, then every operation in execution order.
Times are per step (median over calls of each op's time; XLA may run independent thunks side by
side, so their sum can exceed the wall time, also shown: the untraced median, what cpu_train.py
measures). Writes benchmarks/results/cpu_train_profile_<machine>.{json,md}.
"""

from __future__ import annotations

import linecache
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("BONEJAX_ONEDNN_PROFILE", "1")  # read once, when the extension loads

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.common import xla_profile  # noqa: E402
from bonejax.cli import runner  # noqa: E402

_BATCH = flags.DEFINE_integer("batch", 8, "Patches per step.")
_SIZE = flags.DEFINE_integer("size", 256, "Patch side in pixels.")
_CALLS = flags.DEFINE_integer("calls", 3, "Profiled steps.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype of the model.")
_POLICY = flags.DEFINE_string("policy", "onednn", "Lowering policy of the convolutions "
                              "(cpu_train.py's `bonejax bf16 onednn` row: onednn).")
_MODEL = flags.DEFINE_string("model", "unet_resnet18", "Zoo model.")
_TAG = flags.DEFINE_string("tag", "", "Machine tag of the result files (default: detected).")
_RESULTS = flags.DEFINE_string("results_dir", str(common.RESULTS), "Where result files go.")

# What the model code was doing, most telling first: a fusion holding several is named by the
# first (the label lists them all).
REGIONS = ("optimizer update", "loss", "BatchNorm", "max-pool", "upsampling", "ReLU",
           "residual add", "concatenate / slice", "layout copy / transpose", "conv bias / mask",
           "convert")
# Regions whose operations are named without forward / backward.
_NO_PHASE = ("optimizer update", "concatenate / slice", "layout copy / transpose", "convert")


def _source(stack) -> str:
  return linecache.getline(stack[0][0], stack[0][2]) if stack else ""


def region(part: dict) -> str | None:
  """What the model code was doing when it traced one instruction (None: cannot tell)."""
  opcode, op_name, stack = part["opcode"], part["op_name"], part["stack"]
  files = [f for f, _, _ in stack]
  funcs = [fn for _, fn, _ in stack]
  if (any("/optax/" in f for f in files) or "apply_updates" in funcs
          or op_name.startswith("jit(step)/") and "jvp(" not in op_name and
          "losses.py" not in "".join(files) and op_name.count("/") == 1):
    return "optimizer update"
  if any(f.endswith("losses.py") for f in files) or "log_softmax" in op_name:
    return "loss"
  if any(f.endswith(("normalization.py", "onednn/batch_norm.py")) for f in files):
    return "BatchNorm"
  if (opcode in ("reduce-window", "select-and-scatter", "scatter") or "max_pool" in funcs
          or "reduce_window" in op_name or "select_and_scatter" in op_name):
    return "max-pool"
  if any(fn in ("upsample_nearest2x", "_upsample_nearest2x", "_upsample_bwd") for fn in funcs):
    return "upsampling"  # (the last two: its custom VJP's forward and backward)
  if opcode in ("concatenate", "slice", "dynamic-slice", "pad") or "/split" in op_name:
    return "concatenate / slice"
  if opcode in ("copy", "transpose"):
    return "layout copy / transpose"
  if any(fn in ("_conv_bwd", "_conv_fwd", "_fwd_call", "conv_bias") for fn in funcs):
    return "conv bias / mask"
  line = _source(stack)
  if "relu" in line or "jit(relu)" in op_name:
    return "residual add" if opcode == "add" and "+" in line else "ReLU"
  if opcode == "convert" or op_name.endswith("convert_element_type"):
    return "convert"
  if opcode == "add" and "+" in line:
    return "residual add"
  return None


def classify(ops: dict) -> None:
  """Sets each op's "kind" (a group of the table) and, for XLA's own operations, "label"."""
  users: dict[str, list[str]] = {}
  for name, info in ops.items():
    for o in info["operands"]:
      users.setdefault(o, []).append(name)
  for info in ops.values():
    if info["kind"].startswith("oneDNN"):
      info["kind"] = info["kind"].replace("oneDNN conv", "oneDNN forward conv")
      continue
    found = [r for r in map(region, info["parts"]) if r]
    backward = any("transpose(" in p["op_name"] for p in info["parts"])
    info["regions"] = sorted(set(found), key=REGIONS.index)
    info["backward"] = backward
  # Operations with nothing to tell (no metadata: XLA's own helpers) take their users' kind.
  for _ in range(4):
    for name, info in ops.items():
      if info.get("regions") == []:
        for u in users.get(name, []):
          if ops.get(u, {}).get("regions"):
            info["regions"], info["backward"] = ops[u]["regions"][:1], ops[u]["backward"]
            break
  for info in ops.values():
    if "regions" not in info:
      continue
    if not info["regions"]:
      info["kind"] = "other: " + info["kind"]
      continue
    top = info["regions"][0]
    info["kind"] = top if top in _NO_PHASE else (
        f"{top} {'backward' if info['backward'] else 'forward'}")
    info["label"] = " + ".join(info["regions"]) + " (" + info["label"] + ")"


def build_step(batch: int, size: int, dtype: str, policy: str, model_name: str):
  """(run_once, hlo, info): cpu_train.py's bonejax step, compiled and warmed up."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from benchmarks.efficiency_vs_iou import parse_model
  from bonejax import models
  from bonejax.models import inference_graph

  name, kwargs = parse_model(model_name)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, size, size, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=(batch, size, size)), jnp.int32)
  model = models.fill_from_numpy(models.abstract_model(
      models.create, name, num_classes=3, in_channels=1, dtype=jnp.dtype(dtype), **kwargs))
  params = models.count_params(model)
  model = inference_graph.lower_convs(model, policy=policy)
  step, state, source = common.bonejax_train_step(model, 1e-3)
  hlo = step.lower(state, x, y).compile().as_text()
  holder = {"state": state}

  def run_once():
    holder["state"], loss = step(holder["state"], x, y)
    return jax.block_until_ready(loss)

  run_once(), run_once(), run_once()  # compile, then warm
  return run_once, hlo, {"params": params, "train_step": source}


def profile(batch: int, size: int, dtype: str, policy: str, model_name: str,
            calls: int) -> dict:
  from bonejax.models import onednn

  run_once, hlo, info = build_step(batch, size, dtype, policy, model_name)
  ops = xla_profile.describe_ops(hlo, parts=True)
  classify(ops)
  walls = []
  for _ in range(max(calls, 3)):
    t0 = time.perf_counter()
    run_once()
    walls.append(time.perf_counter() - t0)
  onednn.handler_profile(reset=True)
  events = xla_profile.traced_events(run_once, calls)
  handler = {r["key"]: r for r in onednn.handler_profile(reset=True)}
  seen = xla_profile.per_op_seconds(events, ops, calls)
  rows = []
  for name in sorted(seen, key=lambda n: seen[n]["first_ts"]):
    op = ops[name]
    rows.append({"op": name, "kind": op["kind"], "label": op["label"], "out": op["out"],
                 "ms": 1e3 * seen[name]["s"], **xla_profile.handler_row(op, handler)})
  return {"variant": f"{dtype} {policy}", "wall_ms": 1e3 * common.median(walls), "ops": rows,
          "not_in_trace": sorted(set(ops) - set(seen)), **info}


def main(argv):
  del argv
  from bonejax.core import heap
  heap.setup()  # as the commands do, before JAX starts its threads
  import jax

  from bonejax.models import onednn

  if not onednn.available():
    raise SystemExit(f"oneDNN unavailable: {onednn.unavailable_reason()}")
  b, s, calls = _BATCH.value, _SIZE.value, _CALLS.value
  load_start = common.load_average()
  res = profile(b, s, _DTYPE.value, _POLICY.value, _MODEL.value, calls)
  load = (load_start, common.load_average())
  print(f"{res['variant']}: wall {res['wall_ms']:.1f} ms per step, {len(res['ops'])} ops "
        f"timed, {len(res['not_in_trace'])} not in the trace", file=sys.stderr, flush=True)
  table = xla_profile.kind_table(res["ops"], res["wall_ms"])
  info = common.machine()
  tag = _TAG.value or info["tag"]
  info["tag"] = tag
  command = f"python benchmarks/cpu_train_profile.py {' '.join(sys.argv[1:])}".strip()
  md = "\n".join([
      f"# Training step, per operation: {tag}", "", common.machine_line(info), "",
      f"CPU flags: {', '.join(info.get('cpu_flags', []))}. Load average at start / end: "
      f"{load[0]} / {load[1]} (the machine is shared).", "",
      f"`{_MODEL.value}` ({res['params']} parameters), {_DTYPE.value}, convolutions lowered "
      f"with `lower_convs(policy=\"{_POLICY.value}\")`, the trainer's step "
      f"({res['train_step']}: forward, cross-entropy, backward, Adam) on {b} x {s} x {s}, "
      f"{calls} profiled step(s) (`jax.profiler.trace`), oneDNN {onednn.describe()}. ms are "
      f"per step; oneDNN rows include their weight reorder and residual copy, which the "
      f"handler's counters also show apart. Command: `{command}`.", "",
      f"## {res['variant']}: {res['wall_ms']:.1f} ms per step (untraced)", "",
      common.markdown_table(table, ["kind", "ops", "ms", "share"],
                            ["kind of operation", "ops", "ms per step", "share of sum"]), "",
      f"## {res['variant']}: every operation in execution order", "",
      common.markdown_table(res["ops"], ["op", "kind", "label", "out", "ms", "reorder_ms",
                                         "copy_ms", "exec_ms"],
                            ["op", "kind", "what", "output", "ms",
                             "of which weight reorder (cache check)", "residual copy",
                             "oneDNN primitive"])])
  print(md)
  paths = common.write_results(
      "cpu_train_profile",
      {"config": {"batch": b, "size": s, "calls": calls, "dtype": _DTYPE.value,
                  "policy": _POLICY.value, "model": _MODEL.value},
       "command": command, "result": res, "kinds": table,
       "load_average": {"start": load[0], "end": load[1]}, "machine": info,
       "jax": jax.__version__},
      md, tag=tag, results_dir=_RESULTS.value)
  return {"json": str(paths["json"]), "md": str(paths["md"]),
          "wall_ms": round(res["wall_ms"], 1)}


if __name__ == "__main__":
  runner.run(main)
