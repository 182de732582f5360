"""Per-layer convolution lowerings on this machine: XLA's convolution vs the dot lowerings and
oneDNN's (where its extension is built: bonejax.models.onednn).

    python benchmarks/cpu_conv_lowering.py                           # unet_resnet18, 4 x 256^2
    python benchmarks/cpu_conv_lowering.py --model=unet --batch=4 --size=256 --dtype=bfloat16
    python benchmarks/cpu_conv_lowering.py --size=64 --repeats=2 --results_dir=/tmp/low  # smoke

Every distinct convolution of the model's inference graph at B x S x S (found by tracing
`build_inference_model`, so BatchNorm is folded as in prediction), each lowering of
`bonejax.models.conv_lowering` that applies timed in isolation (conv + bias, output in the
compute dtype; median of interleaved runs: `conv_lowering.time_lowerings`), with GFLOP/s and
the winner. `--train` times forward + backward instead (what `lower_convs` measures). The
table is what `conv_lowering._auto_rule` is drawn from. Writes
benchmarks/results/cpu_conv_lowering_<machine>.{json,md}.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402
from bonejax.cli import runner  # noqa: E402
from bonejax.core.progress import Progress

_MODEL = flags.DEFINE_string("model", "unet_resnet18", "Model name.")
_BATCH = flags.DEFINE_integer("batch", 4, "Images per call.")
_SIZE = flags.DEFINE_integer("size", 256, "Image side in pixels.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype of the graph.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved timing rounds per layer.")
_TRAIN = flags.DEFINE_bool("train", False, "Time forward + backward.")
_TAG = flags.DEFINE_string("tag", "", "Machine tag of the result files (default: detected).")
_RESULTS = flags.DEFINE_string("results_dir", str(common.RESULTS), "Where result files go.")


def layer_specs(name: str, batch: int, size: int, dtype) -> list:
  """The distinct ConvSpecs of the model's inference graph, in call order, with counts."""
  import jax
  import jax.numpy as jnp
  from bonejax import models
  from bonejax.models import conv_lowering, inference_graph
  model = models.abstract_model(models.create, name, num_classes=3, in_channels=1)
  model = models.fill_from_numpy(model)
  graph = inference_graph.build_inference_model(
      model, dtype=dtype, planner=conv_lowering.Planner("xla", cache=False))
  seen: dict = {}

  class Recorder(conv_lowering.Planner):
    def choose(self, spec, out_dtype=None):
      seen[spec] = seen.get(spec, 0) + 1
      return "xla"

  recorder = Recorder("xla", cache=False)
  from flax import nnx
  for _, node in nnx.iter_graph(graph):
    if isinstance(node, inference_graph.FastConv):
      node.planner = recorder
  jax.eval_shape(lambda x: graph(x), jax.ShapeDtypeStruct((batch, size, size, 1), jnp.float32))
  return list(seen.items())


def main(argv):
  del argv
  import jax.numpy as jnp
  from bonejax.models import conv_lowering, onednn
  load_start = common.load_average()
  dtype = jnp.dtype(_DTYPE.value)
  specs = layer_specs(_MODEL.value, _BATCH.value, _SIZE.value, dtype)
  rows, bar = [], Progress(total=len(specs), desc="layers", unit="layers", every_s=0)
  for spec, count in specs:
    hows = conv_lowering.candidates(spec)
    if onednn.available() and onednn.supports(spec, train=_TRAIN.value)[0]:
      hows = hows + ("onednn",)
    seconds = conv_lowering.time_lowerings(spec, hows, repeats=_REPEATS.value,
                                           train=_TRAIN.value)
    best = min(seconds, key=seconds.get)
    flop = spec.flops * (3 if _TRAIN.value else 1)
    rows.append({"layer": spec.key(), "count": count, "gflop": flop / 1e9, "best": best,
                 "speedup": seconds["xla"] / seconds[best],
                 **{f"ms_{h}": 1e3 * seconds.get(h) if h in seconds else None
                    for h in conv_lowering.LOWERINGS},
                 **{f"gflops_{h}": flop / seconds[h] / 1e9 for h in seconds},
                 "auto": conv_lowering._auto_rule(spec) if dtype == jnp.bfloat16 else "xla"})
    bar.update(1, extra=f"{spec.key()} -> {best}")
  bar.close()
  load = (load_start, common.load_average())
  total = {h: sum(r[f"ms_{h}"] * r["count"] for r in rows if r.get(f"ms_{h}") is not None)
           for h in ("xla",)}
  best_total = sum(min(v for k, v in r.items() if k.startswith("ms_") and v is not None)
                   * r["count"] for r in rows)
  info = common.machine()
  tag = _TAG.value or info["tag"]
  info["tag"] = tag
  cols = ["layer", "count", "gflop"] + [f"ms_{h}" for h in conv_lowering.LOWERINGS] + [
      "best", "speedup", "auto"]
  md = "\n".join([
      f"# Convolution lowerings per layer: {tag}", "", common.machine_line(info), "",
      f"CPU flags: {', '.join(info.get('cpu_flags', []))}. Load average at start / end: "
      f"{load[0]} / {load[1]}.", "",
      f"`{_MODEL.value}` inference graph (BatchNorm folded), {_BATCH.value} x {_SIZE.value}^2, "
      f"{_DTYPE.value}, {'forward + backward' if _TRAIN.value else 'forward'}; each layer "
      f"alone, median of {_REPEATS.value} interleaved rounds. Sum over the model's convolutions: "
      f"XLA only {total['xla']:.1f} ms, best per layer {best_total:.1f} ms "
      f"({total['xla'] / best_total:.2f}x).", "",
      common.markdown_table(rows, cols), "",
      "`auto`: what the deterministic policy (`conv_lowering._auto_rule`) picks."])
  print(md)
  payload = {"config": {"model": _MODEL.value, "batch": _BATCH.value, "size": _SIZE.value,
                        "dtype": _DTYPE.value, "train": _TRAIN.value,
                        "repeats": _REPEATS.value},
             "rows": rows, "sum_ms": {"xla": total["xla"], "best": best_total},
             "load_average": {"start": load[0], "end": load[1]}, "machine": info}
  name = "cpu_conv_lowering" + ("_train" if _TRAIN.value else "")
  paths = common.write_results(name, payload, md, tag=tag, results_dir=_RESULTS.value)
  return {"json": paths["json"], "md": paths["md"], "xla_ms": total["xla"],
          "best_ms": best_total}


if __name__ == "__main__":
  runner.run(main)
