"""Where the inference graph's forward pass spends its time on this CPU, operation by operation.

    python benchmarks/cpu_forward_profile.py --tag=epyc-2c            # unet_resnet18, 4 x 256^2
    python benchmarks/cpu_forward_profile.py --size=64 --calls=2 --results_dir=/tmp/p  # smoke

`build_inference_model(unet_resnet18, dtype, policy="onednn")` (what cpu_forward.py times as
"graph onednn"), jitted, for each dtype in --dtypes: "before" (the graph before issue 25:
`fuse=False`, every ReLU, residual add, concatenation and the max-pool an XLA operation, and
the kernels reordered on every call: `onednn.KEEP_KERNELS = False`), "unfused" (the same with
the reordered kernels kept between calls) and "fused" (the default: ReLUs and adds folded into
oneDNN's post-ops, concatenation and max-pool rewritten; see bonejax/models/graph_fusion.py). Each variant runs --calls times under `jax.profiler.trace`; the
time of each XLA operation (a thunk of the CPU executable) is read from the trace and named from
the compiled HLO: each oneDNN convolution (a custom call) by its layer (input -> output shape,
kernel, stride, post-ops), every other operation by its kind (an elementwise loop fusion and the
operations fused into it, a copy, a concatenation, the max-pool's reduce-window, ...). The
handler's own split of each convolution (kernel reorder / residual copy / the oneDNN primitive)
comes from its counters ($BONEJAX_ONEDNN_PROFILE=1, set here before the extension loads).

Tables: per variant, the time per call by kind of operation, then every operation in execution
order. Times are per forward call (median over calls of each op's time; XLA may run independent
thunks side by side, so their sum can exceed the wall time, also shown).
Writes benchmarks/results/cpu_forward_profile_<machine>.{json,md}.
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("BONEJAX_ONEDNN_PROFILE", "1")  # read once, when the extension loads

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402
from bonejax.cli import runner  # noqa: E402

_BATCH = flags.DEFINE_integer("batch", 4, "Images per forward call.")
_SIZE = flags.DEFINE_integer("size", 256, "Image side in pixels.")
_CALLS = flags.DEFINE_integer("calls", 5, "Profiled forward calls per variant.")
_DTYPES = flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Compute dtypes profiled.")
_MODEL = flags.DEFINE_string("model", "unet_resnet18", "Zoo model.")
_TAG = flags.DEFINE_string("tag", "", "Machine tag of the result files (default: detected).")
_RESULTS = flags.DEFINE_string("results_dir", str(common.RESULTS), "Where result files go.")

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_SHAPE = re.compile(r"(bf16|f32|f16|s32|pred|u8)\[([\d,]*)\]")


# ---------------------------------------------------------------------------------------------
# The compiled HLO: what each top-level operation is.
# ---------------------------------------------------------------------------------------------


def _computations(hlo: str) -> tuple[list[str], dict[str, list[str]]]:
  """(the entry computation's lines, {computation name: its lines})."""
  comps, entry, name, lines = {}, [], None, []
  for line in hlo.splitlines():
    head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if head and not line.startswith(" "):
      name, lines = head.group(2), []
      if head.group(1):
        entry = lines
      comps[name] = lines
    elif line.startswith("}"):
      name = None
    elif name is not None:
      lines.append(line)
  return entry, comps


def _dims(text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(t, tuple(int(d) for d in s.split(",") if d)) for t, s in _SHAPE.findall(text)]


def _conv_label(out: str, rest: str) -> tuple[str, str]:
  """(label, handler key) of a oneDNN custom call (operand shapes from its layout
  constraints, `conf` from its backend config)."""
  operands = re.search(r"operand_layout_constraints=\{(.*?)\}\s*,\s*[a-z_]+=", rest)
  shapes = _dims(operands.group(1) if operands else rest.split(")")[0])
  (tx, x), (_, w) = shapes[0], shapes[1]
  (ty, y) = _dims(out)[0]
  found = re.search(r"conf\s*=\s*(?:dense<\[|array<i64:)\s*([\d,\s-]+)", rest)
  if found:
    conf = [int(v) for v in found.group(1).split(",")]
  else:  # all entries equal: printed as a splat
    conf = [int(re.search(r"conf\s*=\s*dense<(-?\d+)>", rest).group(1))] * 13
  post = "".join(p for p, on in (("+bias", conf[10]), ("+sum", conf[11]), ("+relu", conf[9]))
                 if on)
  label = (f"conv {x[1]}x{x[2]}x{x[3]} -> {y[1]}x{y[2]}x{y[3]} k{w[0]}x{w[1]} s{conf[0]} "
           f"{tx}->{ty}{post}")
  key = "|".join(["fwd", ",".join(map(str, x)) + ",", ",".join(map(str, w)) + ",",
                  ",".join(map(str, y)) + ","])
  return label, key + "|" + "|" + ",".join(map(str, conf)) + ","


def describe_ops(hlo: str) -> dict[str, dict]:
  """Top-level operation name -> {"kind", "label", "out", "key" (convolutions)}."""
  entry, comps = _computations(hlo)
  ops = {}
  for line in entry:
    m = _INSTR.match(line)
    if not m:
      continue
    name, out, opcode, rest = m.groups()
    if opcode in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast"):
      continue
    info = {"out": out.split("{")[0].strip()}
    if opcode == "custom-call" and "bonejax_onednn_conv_fwd" in rest:
      info["kind"] = "oneDNN conv"
      info["label"], info["key"] = _conv_label(out, rest)
    elif opcode == "fusion":
      called = re.search(r"calls=%?([\w.\-]+)", rest)
      inner = collections.Counter()
      for sub in comps.get(called.group(1) if called else "", []):
        sm = _INSTR.match(sub)
        if sm and sm.group(3) not in ("parameter", "constant", "bitcast", "broadcast", "reshape",
                                      "tuple", "get-tuple-element"):
          inner[sm.group(3)] += 1
      info["kind"] = "fusion: " + ", ".join(sorted(inner)) if inner else "fusion"
      info["label"] = info["kind"]
    else:
      info["kind"] = opcode
      info["label"] = opcode
    ops[name] = info
  return ops


# ---------------------------------------------------------------------------------------------
# The trace: how long each operation ran.
# ---------------------------------------------------------------------------------------------


def trace_events(log_dir: Path) -> list[dict]:
  files = sorted(log_dir.rglob("*.trace.json.gz")) + sorted(log_dir.rglob("perfetto_trace.json.gz"))
  if not files:
    raise RuntimeError(f"no trace written under {log_dir}")
  with gzip.open(files[-1], "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  return [e for e in events if e.get("ph") == "X" and "dur" in e]


def per_op_seconds(events: list[dict], ops: dict, calls: int) -> dict[str, dict]:
  """name -> {"s": median seconds per call, "first_ts": first start} for the ops seen."""
  found = collections.defaultdict(list)
  for e in events:
    name = e.get("name", "")
    if name in ops:
      found[name].append((e["ts"], e["dur"] * 1e-6))
  out = {}
  for name, hits in found.items():
    hits.sort()
    per_call = len(hits) // calls if len(hits) >= calls else 1
    sums = [sum(d for _, d in hits[i:i + per_call]) for i in range(0, len(hits), per_call)]
    out[name] = {"s": common.median(sums), "first_ts": hits[0][0], "runs_per_call": per_call}
  return out


# ---------------------------------------------------------------------------------------------
# One variant.
# ---------------------------------------------------------------------------------------------


def profile_variant(model, dtype: str, how: str, x, calls: int) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from bonejax.models import inference_graph, onednn

  graph = inference_graph.build_inference_model(model, dtype=jnp.dtype(dtype), policy="onednn",
                                                fuse=how == "fused")
  graphdef, state = nnx.split(graph)
  fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  onednn.KEEP_KERNELS = how != "before"  # read while tracing
  hlo = fn.lower(state, x).compile().as_text()
  jax.block_until_ready(fn(state, x))
  onednn.KEEP_KERNELS = True
  ops = describe_ops(hlo)
  for _ in range(2):
    jax.block_until_ready(fn(state, x))
  walls = []
  for _ in range(calls):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(state, x))
    walls.append(time.perf_counter() - t0)
  onednn.handler_profile(reset=True)
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(calls):
        jax.block_until_ready(fn(state, x))
    events = trace_events(Path(tmp))
  handler = {r["key"]: r for r in onednn.handler_profile(reset=True)}
  seen = per_op_seconds(events, ops, calls)
  rows = []
  for name in sorted(seen, key=lambda n: seen[n]["first_ts"]):
    info, s = ops[name], seen[name]["s"]
    row = {"op": name, "kind": info["kind"], "label": info["label"], "out": info["out"],
           "ms": 1e3 * s}
    h = next((v for k, v in handler.items() if info.get("key") and
              k.split("|")[:4] == info["key"].split("|")[:4] and
              k.split("|")[-1] == info["key"].split("|")[-1]), None)
    if h and h["calls"]:
      row.update({"reorder_ms": 1e3 * h["reorder_s"] / h["calls"],
                  "copy_ms": 1e3 * h["copy_s"] / h["calls"],
                  "exec_ms": 1e3 * h["exec_s"] / h["calls"], "impl": h["impl"]})
    rows.append(row)
  missing = sorted(set(ops) - set(seen))
  return {"variant": f"{dtype} {how}", "wall_ms": 1e3 *
          common.median(walls), "ops": rows, "not_in_trace": missing,
          "trace_names": sorted({e.get("name", "") for e in events})[:200]}


def summary(result: dict) -> list[dict]:
  by = collections.defaultdict(lambda: {"ms": 0.0, "n": 0})
  for r in result["ops"]:
    kind = r["kind"]
    if kind == "oneDNN conv":
      for part in ("reorder", "copy"):
        if r.get(f"{part}_ms"):
          by[f"oneDNN conv: weight reorder or cache check" if part == "reorder" else "oneDNN conv: residual copy"]["ms"] += r[f"{part}_ms"]
    by[kind]["ms"] += r["ms"]
    by[kind]["n"] += 1
  total = sum(r["ms"] for r in result["ops"])
  rows = [{"kind": k, "ops": v["n"] or "-", "ms": v["ms"], "share": v["ms"] / total}
          for k, v in by.items()]
  rows.sort(key=lambda r: -r["ms"])
  rows.append({"kind": "sum of operations", "ops": len(result["ops"]), "ms": total, "share": 1.0})
  rows.append({"kind": "wall time per call (untraced)", "ops": "", "ms": result["wall_ms"],
               "share": result["wall_ms"] / total})
  return rows


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  from bonejax import models
  from bonejax.models import onednn

  if not onednn.available():
    raise SystemExit(f"oneDNN unavailable: {onednn.unavailable_reason()}")
  b, s = _BATCH.value, _SIZE.value
  x = jnp.asarray(np.random.default_rng(0).normal(size=(b, s, s, 1)), jnp.float32)
  load_start = common.load_average()
  results = []
  for dtype in _DTYPES.value:
    model = models.fill_from_numpy(models.abstract_model(
        models.create, _MODEL.value, num_classes=3, in_channels=1, dtype=jnp.dtype(dtype)))
    for how in ("before", "unfused", "fused"):
      res = profile_variant(model, dtype, how, x, _CALLS.value)
      print(f"{res['variant']}: wall {res['wall_ms']:.1f} ms, {len(res['ops'])} ops timed, "
            f"{len(res['not_in_trace'])} not in the trace", file=sys.stderr, flush=True)
      results.append(res)
  load = (load_start, common.load_average())

  info = common.machine()
  tag = _TAG.value or info["tag"]
  info["tag"] = tag
  parts = [f"# Forward pass, per operation: {tag}", "", common.machine_line(info), "",
           f"CPU flags: {', '.join(info.get('cpu_flags', []))}. Load average at start / end: "
           f"{load[0]} / {load[1]} (the machine is shared).", "",
           f"`{_MODEL.value}` inference graph (`build_inference_model(policy=\"onednn\")`) on "
           f"{b} x {s} x {s}, {_CALLS.value} profiled calls per variant (`jax.profiler.trace`), "
           f"oneDNN {onednn.describe()}. ms are per forward call; oneDNN conv rows include "
           f"their weight reorder and residual copy, which the handler's counters also show "
           f"apart. Command: `python benchmarks/cpu_forward_profile.py {' '.join(sys.argv[1:])}`."]
  for res in results:
    parts += ["", f"## {res['variant']}: {res['wall_ms']:.1f} ms per call", "",
              common.markdown_table(summary(res), ["kind", "ops", "ms", "share"],
                                    ["kind of operation", "ops", "ms per call", "share of sum"])]
  for res in results:
    parts += ["", f"## {res['variant']}: every operation in execution order", "",
              common.markdown_table(res["ops"], ["op", "label", "out", "ms", "reorder_ms",
                                                 "copy_ms", "exec_ms"],
                                    ["op", "what", "output", "ms", "of which weight reorder (cache check)",
                                     "residual copy", "oneDNN primitive"])]
  md = "\n".join(parts)
  print(md)
  paths = common.write_results(
      "cpu_forward_profile", {"config": {"batch": b, "size": s, "calls": _CALLS.value,
                                         "dtypes": _DTYPES.value, "model": _MODEL.value},
                              "results": results, "load_average": {"start": load[0],
                                                                   "end": load[1]},
                              "machine": info, "jax": jax.__version__},
      md, tag=tag, results_dir=_RESULTS.value)
  return {"json": str(paths["json"]), "md": str(paths["md"]),
          **{r["variant"]: round(r["wall_ms"], 1) for r in results}}


if __name__ == "__main__":
  runner.run(main)
