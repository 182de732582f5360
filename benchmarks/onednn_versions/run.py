"""oneDNN 2.6 (Debian) vs oneDNN 3.x (pip wheel) vs PyTorch, per unet_resnet18 convolution.

    python benchmarks/onednn_versions/run.py --dnnl3_root=$VIRTUAL_ENV --rounds=3 --tag=epyc-2c

Compiles conv_bench.cc (one NHWC convolution, timed in C++) once against each oneDNN, then
times every layer of unet_resnet18 on 4 x 256^2 (encoder, decoder, head; each distinct shape
once, with its count in the network) as forward-inference bf16 (and f32 with --f32),
backward-data bf16 and backward-weights bf16 (f32 gradient). PyTorch runs the same shapes in
this process: F.conv2d / aten.convolution_backward on bf16 channels-last tensors (its bundled
oneDNN). Variants are interleaved per layer and rotated per round; each cell is the median over
rounds of per-round medians of ITERS calls (after one warm-up call).

--threads=1 --clock=cpu (the default) times one thread's CPU time per call: on a machine shared
with other jobs (load far above the core count) wall times of a 2-thread OpenMP team are
dominated by preemption and barrier waits, CPU time is not; it compares the kernels, not
their 2-core scaling. Writes benchmarks/results/onednn_versions_<tag>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"

# (name, count in unet_resnet18, H=W of the input, cin, cout, kernel, stride, pad)
LAYERS = [
    ("stem 7x7 s2", 1, 256, 1, 64, 7, 2, 3),
    ("enc 64@64", 4, 64, 64, 64, 3, 1, 1),
    ("enc 64->128 s2", 1, 64, 64, 128, 3, 2, 1),
    ("down 1x1 64->128 s2", 1, 64, 64, 128, 1, 2, 0),
    ("enc 128@32", 3, 32, 128, 128, 3, 1, 1),
    ("enc 128->256 s2", 1, 32, 128, 256, 3, 2, 1),
    ("down 1x1 128->256 s2", 1, 32, 128, 256, 1, 2, 0),
    ("enc 256@16", 3, 16, 256, 256, 3, 1, 1),
    ("enc 256->512 s2", 1, 16, 256, 512, 3, 2, 1),
    ("down 1x1 256->512 s2", 1, 16, 256, 512, 1, 2, 0),
    ("enc 512@8", 3, 8, 512, 512, 3, 1, 1),
    ("dec 768->256@16", 1, 16, 768, 256, 3, 1, 1),
    ("dec 256@16", 1, 16, 256, 256, 3, 1, 1),
    ("dec 384->128@32", 1, 32, 384, 128, 3, 1, 1),
    ("dec 128@32", 1, 32, 128, 128, 3, 1, 1),
    ("dec 192->64@64", 1, 64, 192, 64, 3, 1, 1),
    ("dec 64@64", 1, 64, 64, 64, 3, 1, 1),
    ("dec 128->32@128", 1, 128, 128, 32, 3, 1, 1),
    ("dec 32@128", 1, 128, 32, 32, 3, 1, 1),
    ("dec 32->16@256", 1, 256, 32, 16, 3, 1, 1),
    ("dec 16@256", 1, 256, 16, 16, 3, 1, 1),
    ("head 16->3@256", 1, 256, 16, 3, 3, 1, 1),
]
MODES = [("fwd", "bf16"), ("bwd_d", "bf16"), ("bwd_w", "bf16")]


def quiet_wait():
  while os.path.exists("/work/QUIET"):
    time.sleep(15)


def compile_bench(out: Path, include: list[str], libdir: str | None) -> None:
  cmd = ["g++", "-O2", "-std=c++17", str(HERE / "conv_bench.cc"), "-o", str(out)]
  cmd += [f"-I{i}" for i in include]
  if libdir:
    cmd += [f"-L{libdir}", f"-Wl,-rpath,{libdir}", f"-l:libdnnl.so.3"]
  else:
    cmd += ["-ldnnl"]
  subprocess.run(cmd, check=True)


def dnnl_version(include: str) -> str:
  text = (Path(include) / "oneapi" / "dnnl" / "dnnl_version.h").read_text()
  parts = [ln.split()[-1] for ln in text.splitlines()
           if ln.startswith("#define DNNL_VERSION_") and "HASH" not in ln]
  return ".".join(parts[:3])


def run_cpp(binary: Path, mode: str, dtype: str, layer, iters: int, threads: int,
            clock: str) -> tuple[float, str]:
  _, _, hw, ci, co, k, s, p = layer
  env = dict(os.environ, OMP_NUM_THREADS=str(threads))
  out = subprocess.run([str(binary), mode, dtype, "4", str(hw), str(hw), str(ci), str(co),
                        str(k), str(s), str(p), str(iters)], env=env,
                       capture_output=True, text=True, check=True).stdout.split(maxsplit=2)
  return float(out[1 if clock == "cpu" else 0]), out[2].strip()


class Torch:
  def __init__(self, threads: int, clock: str):
    import torch
    torch.set_num_threads(threads)
    self.clock = time.process_time if clock == "cpu" else time.perf_counter
    import torch.nn.functional as F
    self.torch, self.F = torch, F

  def time(self, mode: str, dtype: str, layer, iters: int) -> float:
    torch = self.torch
    _, _, hw, ci, co, k, s, p = layer
    t = torch.bfloat16 if dtype == "bf16" else torch.float32
    cl = torch.channels_last
    x = (torch.rand(4, ci, hw, hw) - 0.5).to(t).contiguous(memory_format=cl)
    w = (torch.rand(co, ci, k, k) - 0.5).to(t).contiguous(memory_format=cl)
    oh = (hw + 2 * p - k) // s + 1
    gy = (torch.rand(4, co, oh, oh) - 0.5).to(t).contiguous(memory_format=cl)
    if mode == "fwd":
      fn = lambda: self.F.conv2d(x, w, None, s, p)  # noqa: E731
    else:
      mask = [mode == "bwd_d", mode == "bwd_w", False]
      fn = lambda: torch.ops.aten.convolution_backward(  # noqa: E731
          gy, x, w, None, [s, s], [p, p], [1, 1], False, [0, 0], 1, mask)
    ms = []
    with torch.inference_mode():
      for i in range(iters + 1):
        t0 = self.clock()
        fn()
        if i >= 1:
          ms.append((self.clock() - t0) * 1e3)
    return statistics.median(ms)


def lscpu() -> tuple[str, list[str]]:
  out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
  model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines()
                if ln.startswith("Model name")), platform.processor())
  flags = next((ln.split(":", 1)[1].split() for ln in out.splitlines()
                if ln.startswith("Flags")), [])
  return model, [f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma"))]


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--dnnl3_root", default=sys.prefix, help="prefix with include/ and lib/ "
                  "of oneDNN 3 (pip install onednn-cpu-gomp onednn-devel-cpu-gomp)")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--tag", default=platform.node())
  ap.add_argument("--build_dir", default="/tmp/onednn_versions_bench")
  ap.add_argument("--threads", type=int, default=1)
  ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
  ap.add_argument("--f32", action="store_true", help="also forward float32")
  a = ap.parse_args()
  build = Path(a.build_dir)
  build.mkdir(parents=True, exist_ok=True)
  quiet_wait()
  root3 = Path(a.dnnl3_root)
  bins = {"2": build / "bench_v2", "3": build / "bench_v3"}
  compile_bench(bins["2"], [], None)
  compile_bench(bins["3"], [str(root3 / "include")], str(root3 / "lib"))
  vers = {"2": dnnl_version("/usr/include"), "3": dnnl_version(str(root3 / "include"))}
  if a.f32:
    MODES.insert(1, ("fwd", "f32"))
  torch_side = Torch(a.threads, a.clock)
  import torch
  variants = [f"oneDNN {vers['2']}", f"oneDNN {vers['3']}", f"torch {torch.__version__}"]
  times: dict[tuple, list[float]] = {}
  impls: dict[tuple, str] = {}
  load0 = os.getloadavg()
  t_start = time.time()
  for r in range(a.rounds):
    for li, layer in enumerate(LAYERS):
      quiet_wait()
      for mode, dtype in MODES:
        order = variants[r % 3:] + variants[:r % 3]  # rotate who goes first
        for v in order:
          if v.startswith("torch"):
            ms = torch_side.time(mode, dtype, layer, a.iters)
          else:
            ms, impl = run_cpp(bins["2" if v == variants[0] else "3"], mode, dtype, layer,
                               a.iters, a.threads, a.clock)
            impls[(layer[0], mode, dtype, v)] = impl
          times.setdefault((layer[0], mode, dtype, v), []).append(ms)
    print(f"round {r + 1}/{a.rounds} done ({time.time() - t_start:.0f} s)", flush=True)
  load1 = os.getloadavg()
  med = {k: statistics.median(v) for k, v in times.items()}
  model, flags = lscpu()
  lines = [f"# oneDNN versions per unet_resnet18 convolution: {a.tag}", "",
           f"CPU: {model}, {os.cpu_count()} cores; flags: {', '.join(flags)}. "
           f"Load average at start / end: {[round(x, 2) for x in load0]} / "
           f"{[round(x, 2) for x in load1]} (machine shared with other jobs).", "",
           f"Command: `python benchmarks/onednn_versions/run.py --dnnl3_root={a.dnnl3_root} "
           f"--rounds={a.rounds} --iters={a.iters} --threads={a.threads} --clock={a.clock} "
           f"--tag={a.tag}`. Batch 4, NHWC / channels-last; ms per call "
           f"({a.clock} time, {a.threads} thread(s)), median over rounds of the median of "
           f"{a.iters} calls; variants interleaved per layer. oneDNN: conv_bench.cc "
           "(weights pre-reordered); torch: F.conv2d / aten.convolution_backward "
           "(bwd_w: torch's weight gradient is bf16, oneDNN's f32).", ""]
  summary = []
  for mode, dtype in MODES:
    lines += [f"## {mode} {dtype}", "",
              "| layer | count | " + " | ".join(variants) +
              f" | 2.6/3 speedup | 3 / torch | impl {vers['3']} |",
              "|---|---:|" + "---:|" * (len(variants) + 2) + "---|"]
    tot = {v: 0.0 for v in variants}
    for layer in LAYERS:
      name, count = layer[0], layer[1]
      if mode == "bwd_d" and name.startswith("stem"):
        continue  # the input image needs no gradient
      row = [med[(name, mode, dtype, v)] for v in variants]
      for v, x in zip(variants, row):
        tot[v] += count * x
      lines.append(f"| {name} | {count} | " + " | ".join(f"{x:.2f}" for x in row) +
                   f" | {row[0] / row[1]:.2f} | {row[1] / row[2]:.2f} | "
                   f"{impls[(name, mode, dtype, variants[1])]} |")
    t = [tot[v] for v in variants]
    lines.append(f"| **network total (x count)** | | " + " | ".join(f"**{x:.1f}**" for x in t)
                 + f" | **{t[0] / t[1]:.2f}** | **{t[1] / t[2]:.2f}** | |")
    lines.append("")
    summary.append((mode, dtype, t))
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / f"onednn_versions_{a.tag}.md").write_text("\n".join(lines) + "\n")
  (RESULTS / f"onednn_versions_{a.tag}.json").write_text(json.dumps({
      "cpu": model, "flags": flags, "variants": variants, "load": [load0, load1],
      "ms": {"|".join(k): v for k, v in times.items()},
      "impl": {"|".join(k): v for k, v in impls.items()}}, indent=1))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
