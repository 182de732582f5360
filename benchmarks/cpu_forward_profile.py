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

_BATCH = flags.DEFINE_integer("batch", 4, "Images per forward call.")
_SIZE = flags.DEFINE_integer("size", 256, "Image side in pixels.")
_CALLS = flags.DEFINE_integer("calls", 5, "Profiled forward calls per variant.")
_DTYPES = flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Compute dtypes profiled.")
_MODEL = flags.DEFINE_string("model", "unet_resnet18", "Zoo model.")
_TAG = flags.DEFINE_string("tag", "", "Machine tag of the result files (default: detected).")
_RESULTS = flags.DEFINE_string("results_dir", str(common.RESULTS), "Where result files go.")

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
  ops = xla_profile.describe_ops(hlo)
  for _ in range(2):
    jax.block_until_ready(fn(state, x))
  walls = []
  for _ in range(calls):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(state, x))
    walls.append(time.perf_counter() - t0)
  onednn.handler_profile(reset=True)
  events = xla_profile.traced_events(lambda: jax.block_until_ready(fn(state, x)), calls)
  handler = {r["key"]: r for r in onednn.handler_profile(reset=True)}
  seen = xla_profile.per_op_seconds(events, ops, calls)
  rows = []
  for name in sorted(seen, key=lambda n: seen[n]["first_ts"]):
    info, s = ops[name], seen[name]["s"]
    row = {"op": name, "kind": info["kind"], "label": info["label"], "out": info["out"],
           "ms": 1e3 * s}
    row.update(xla_profile.handler_row(info, handler))
    rows.append(row)
  missing = sorted(set(ops) - set(seen))
  return {"variant": f"{dtype} {how}", "wall_ms": 1e3 *
          common.median(walls), "ops": rows, "not_in_trace": missing,
          "trace_names": sorted({e.get("name", "") for e in events})[:200]}


def main(argv):
  del argv
  from bonejax.core import heap
  heap.setup()  # as the commands do, before JAX starts its threads
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
              common.markdown_table(xla_profile.kind_table(res["ops"], res["wall_ms"]),
                                    ["kind", "ops", "ms", "share"],
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
