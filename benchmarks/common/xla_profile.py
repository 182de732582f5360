"""What each operation of a compiled XLA CPU executable is, and how long it ran in a trace.

Shared by benchmarks/cpu_forward_profile.py (the inference graph's forward pass) and
benchmarks/cpu_train_profile.py (one training step):

    ops = describe_ops(compiled.as_text())           # top-level op name -> what it is
    events = traced_events(lambda: run_once(), calls)  # jax.profiler.trace of `calls` runs
    seen = per_op_seconds(events, ops, calls)        # op name -> median seconds per call

Each top-level operation of the entry computation is one thunk of the CPU executable, and the
trace names its events after it. A oneDNN convolution (an FFI custom call of
bonejax.models.onednn) is named by its layer (input -> output shape, kernel, stride, post-ops),
every other operation by its kind (a fusion and the operations fused into it, a copy, ...);
`parts` lists each fused instruction's opcode, `op_name` and source stack (from the module's
stack-frame tables) for callers that group by what the model code was doing.

Imports neither jax nor torch at module level (benchmarks.common's rule).
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import tempfile
from pathlib import Path

from .timing import median

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_SHAPE = re.compile(r"(bf16|f32|f16|s32|pred|u8)\[([\d,]*)\]")
_SKIP = ("parameter", "constant", "get-tuple-element", "tuple", "bitcast")
_PLUMBING = ("parameter", "constant", "bitcast", "broadcast", "reshape", "tuple",
             "get-tuple-element")

# The FFI targets of bonejax.models.onednn: kind, handler key prefix.
ONEDNN_TARGETS = {"bonejax_onednn_conv_fwd": ("oneDNN conv", "fwd"),
                  "bonejax_onednn_conv_bwd_data": ("oneDNN backward-data", "bwd_d"),
                  "bonejax_onednn_conv_bwd_weights": ("oneDNN backward-weights", "bwd_w")}
# Its other FFI targets (training's BatchNorm and max-pool): kind.
ONEDNN_OTHER = {"bonejax_onednn_bn_fwd": "oneDNN BatchNorm forward",
                "bonejax_onednn_bn_bwd": "oneDNN BatchNorm backward",
                "bonejax_onednn_pool_fwd": "oneDNN max-pool forward",
                "bonejax_onednn_pool_bwd": "oneDNN max-pool backward"}


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


def stack_frames(hlo: str) -> dict[int, list[tuple[str, str, int]]]:
  """stack_frame_id -> [(file, function, line), ...], innermost first, from the module's
  FileNames / FunctionNames / FileLocations / StackFrames tables (empty if not printed).
  A frame's printed parent_frame_id is one above its parent's id (0: none)."""
  tables: dict[str, dict[int, str]] = collections.defaultdict(dict)
  section = None
  for line in hlo.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      section = line
      continue
    m = re.match(r"^(\d+) (.*)$", line)
    if section and m:
      tables[section][int(m.group(1))] = m.group(2)
    elif section and line.strip() and not m:
      section = None
  files = {k: v.strip('"') for k, v in tables["FileNames"].items()}
  funcs = {k: v.strip('"') for k, v in tables["FunctionNames"].items()}
  locs = {}
  for k, v in tables["FileLocations"].items():
    f = dict(re.findall(r"(\w+)=(-?\d+)", v))
    locs[k] = (files.get(int(f.get("file_name_id", 0)), "?"),
               funcs.get(int(f.get("function_name_id", 0)), "?"), int(f.get("line", 0)))
  raw = {k: dict(re.findall(r"(\w+)=(\d+)", v)) for k, v in tables["StackFrames"].items()}
  out = {}
  for k in raw:
    chain, at, seen = [], k, set()
    while at in raw and at not in seen:
      seen.add(at)
      chain.append(locs.get(int(raw[at]["file_location_id"]), ("?", "?", 0)))
      at = int(raw[at]["parent_frame_id"]) - 1
    out[k] = chain
  return out


def _dims(text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(t, tuple(int(d) for d in s.split(",") if d)) for t, s in _SHAPE.findall(text)]


def _csv(dims) -> str:
  return ",".join(map(str, dims)) + ","


def conv_label(out: str, rest: str, target: str = "bonejax_onednn_conv_fwd") -> tuple[str, str]:
  """(label, handler key) of a oneDNN custom call (operand shapes from its layout constraints,
  `conf` from its backend config). The label names the layer as its forward pass sees it
  (x -> y, kernel), whichever of the three calls it is; the key is the handler's
  "kind|a dims|b dims|out dims||conf" without the dtypes (see onednn_conv.cc)."""
  operands = re.search(r"operand_layout_constraints=\{(.*?)\}\s*,\s*[a-z_]+=", rest)
  shapes = _dims(operands.group(1) if operands else rest.split(")")[0])
  (ta, a), (tb, b) = shapes[0], shapes[1]
  (to, o) = _dims(out)[0]
  found = re.search(r"conf\s*=\s*(?:dense<\[|array<i64:)\s*([\d,\s-]+)", rest)
  if found:
    conf = [int(v) for v in found.group(1).split(",")]
  else:  # all entries equal: printed as a splat
    conf = [int(re.search(r"conf\s*=\s*dense<(-?\d+)>", rest).group(1))] * 13
  prefix = ONEDNN_TARGETS[target][1]
  # (x, w, y) of the layer: fwd (x, w) -> y; bwd_d (dy, w) -> dx; bwd_w (x, dy) -> dw.
  x, w, y, tx, ty = {"fwd": (a, b, o, ta, to), "bwd_d": (o, b, a, to, ta),
                     "bwd_w": (a, o, b, ta, tb)}[prefix]
  post = "".join(p for p, on in (("+bias", conf[10]), ("+sum", conf[11]), ("+relu", conf[9]))
                 if on)
  label = (f"conv {x[1]}x{x[2]}x{x[3]} -> {y[1]}x{y[2]}x{y[3]} k{w[0]}x{w[1]} s{conf[0]} "
           f"{tx}->{ty}{post}")
  if prefix != "fwd":
    label = {"bwd_d": "backward-data of ", "bwd_w": "backward-weights of "}[prefix] + label
  key = "|".join([prefix, _csv(a), _csv(b), _csv(o), "", _csv(conf)])
  return label, key


def _fused_lines(comps: dict[str, list[str]], rest: str, depth: int = 0) -> list[str]:
  """The instructions of the computation(s) an operation calls, nested fusions included."""
  out = []
  for called in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", rest):
    for sub in comps.get(called, []):
      sm = _INSTR.match(sub)
      if sm and depth < 4 and sm.group(3) in ("fusion", "call"):
        out += _fused_lines(comps, sm.group(4), depth + 1)
      out.append(sub)
  return out


def _part(line: str, frames: dict) -> dict | None:
  m = _INSTR.match(line)
  if not m:
    return None
  name = re.search(r'op_name="([^"]*)"', line)
  frame = re.search(r"stack_frame_id=(\d+)", line)
  return {"opcode": m.group(3), "op_name": name.group(1) if name else "",
          "stack": frames.get(int(frame.group(1)), []) if frame else []}


def describe_ops(hlo: str, parts: bool = False) -> dict[str, dict]:
  """Top-level operation name -> {"kind", "label", "out", "key" (convolutions), "operands";
  with parts=True also "parts": the op's own and its fused instructions (opcode, op_name,
  stack)}."""
  entry, comps = _computations(hlo)
  frames = stack_frames(hlo) if parts else {}
  ops = {}
  for line in entry:
    m = _INSTR.match(line)
    if not m:
      continue
    name, out, opcode, rest = m.groups()
    if opcode in _SKIP:
      continue
    info = {"out": out.split("{")[0].strip(),
            "operands": re.findall(r"%([\w.\-]+)", rest.split("),")[0])}
    target = re.search(r'custom_call_target="([\w.\-]+)"', rest)
    inner = _fused_lines(comps, rest) if opcode in ("fusion", "call") else []
    if opcode == "custom-call" and target and target.group(1) in ONEDNN_TARGETS:
      info["kind"] = ONEDNN_TARGETS[target.group(1)][0]
      info["label"], info["key"] = conv_label(out, rest, target.group(1))
    elif opcode == "custom-call" and target and target.group(1) in ONEDNN_OTHER:
      info["kind"] = ONEDNN_OTHER[target.group(1)]
      info["label"] = f"{info['kind']} {_dims(out)[0][1]}"
    elif opcode == "fusion":
      fused = collections.Counter(sm.group(3) for sm in map(_INSTR.match, inner)
                                  if sm and sm.group(3) not in _PLUMBING + ("fusion", "call"))
      info["kind"] = "fusion: " + ", ".join(sorted(fused)) if fused else "fusion"
      info["label"] = info["kind"]
    else:
      info["kind"] = opcode
      info["label"] = opcode
    if parts:
      info["parts"] = [p for p in map(lambda s: _part(s, frames), [line] + inner)
                       if p and p["opcode"] not in _PLUMBING]
    ops[name] = info
  return ops


def handler_row(info: dict, handler: dict[str, dict]) -> dict:
  """The oneDNN handler's counters (BONEJAX_ONEDNN_PROFILE) of a convolution's call, per
  handler call in ms: kernel reorder, residual copy, the primitive; {} if none."""
  key = info.get("key")
  if not key:
    return {}
  want = key.split("|")
  h = next((v for k, v in handler.items()
            if k.split("|")[:4] == want[:4] and k.split("|")[-1] == want[-1]), None)
  if not h or not h["calls"]:
    return {}
  return {"reorder_ms": 1e3 * h["reorder_s"] / h["calls"],
          "copy_ms": 1e3 * h["copy_s"] / h["calls"],
          "exec_ms": 1e3 * h["exec_s"] / h["calls"], "impl": h["impl"]}


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


def traced_events(run_once, calls: int) -> list[dict]:
  """The complete events of `calls` calls of `run_once()` (which must block until done) under
  `jax.profiler.trace`."""
  import jax

  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(calls):
        run_once()
    return trace_events(Path(tmp))


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
    out[name] = {"s": median(sums), "first_ts": hits[0][0], "runs_per_call": per_call}
  return out


def kind_table(rows: list[dict], wall_ms: float) -> list[dict]:
  """Per kind of operation: ops, ms per call, share of the sum of the operations' times; a
  oneDNN convolution's weight reorder and residual copy (handler counters, included in its
  own time) also get rows of their own; then the sum and the untraced wall time per call."""
  by = collections.defaultdict(lambda: {"ms": 0.0, "n": 0})
  for r in rows:
    if r.get("reorder_ms"):
      by["oneDNN conv: weight reorder or cache check"]["ms"] += r["reorder_ms"]
    if r.get("copy_ms"):
      by["oneDNN conv: residual copy"]["ms"] += r["copy_ms"]
    by[r["kind"]]["ms"] += r["ms"]
    by[r["kind"]]["n"] += 1
  total = sum(r["ms"] for r in rows)
  out = [{"kind": k, "ops": v["n"] or "-", "ms": v["ms"], "share": v["ms"] / total}
         for k, v in by.items()]
  out.sort(key=lambda r: -r["ms"])
  out.append({"kind": "sum of operations", "ops": len(rows), "ms": total, "share": 1.0})
  out.append({"kind": "wall time per call (untraced)", "ops": "", "ms": wall_ms,
              "share": wall_ms / total})
  return out
