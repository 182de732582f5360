"""Where a CPU training run's time goes: cores busy, per thread group, and the main thread's stack.

    python benchmarks/cpu_train_idle.py                     # unet_resnet18, 256 px, batch 8, fp32
    python benchmarks/cpu_train_idle.py --steps=12 --patch=64 --batch=4 --results_dir=/tmp/idle

Runs `launch/train.py --config=configs/baseline.py` (unet_resnet18; `--dtype`, `--patch`,
`--batch`, `--steps`, validation and checkpoints every `--every` steps) on a phantom dataset
and watches it from outside:

- every `--interval` s, the CPU time of each of its threads (/proc/PID/task/*/stat), grouped by
  thread name (XLA's intra-op pool, tensorstore / loader threads, the Python main thread,
  orbax, ...), and the machine's total (/proc/stat): cores busy over time, and who used them;
- py-spy (if installed) samples the Python threads' stacks (`--idle`: waiting counts too), so
  the main thread's time splits into waiting for a step (compute-bound: good), reading the next
  batch, validation, checkpointing and logging.

On a machine shared with other work, the process cannot reach 200 % whatever it does: the
result records the machine's load and the share of the cores the run got.
Writes benchmarks/results/cpu_train_idle_<machine>.{json,md}.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402
from bonejax.cli import runner  # noqa: E402

_PATCH = flags.DEFINE_integer("patch", 256, "Patch size.")
_BATCH = flags.DEFINE_integer("batch", 8, "Batch size.")
_STEPS = flags.DEFINE_integer("steps", 40, "Training steps.")
_EVERY = flags.DEFINE_integer("every", 20, "Validation and checkpoint interval (steps).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype.")
_INTERVAL = flags.DEFINE_float("interval", 0.5, "Sampling interval of /proc (s).")
_WORKDIR = flags.DEFINE_string("workdir", "", "Run directory (default: a temporary one).")
_TAG = flags.DEFINE_string("tag", "", "Machine tag of the result files (default: detected).")
_RESULTS = flags.DEFINE_string("results_dir", str(common.RESULTS), "Where result files go.")

TICK = os.sysconf("SC_CLK_TCK")


def _group(name: str) -> str:
  """Thread names -> groups (XLA's CPU client names its pools; Python threads keep 'python')."""
  rules = [(r"^(XLAEigen|xla|tf_|intra|Eigen)", "XLA intra-op pool"),
           (r"^(ts_|tensorstore|TS)", "tensorstore"), (r"^(grain|prefetch)", "loader"),
           (r"^(orbax|async|asyncio)", "checkpointing"), (r"^python", "python threads")]
  for pattern, group in rules:
    if re.match(pattern, name, re.I):
      return group
  return f"other ({re.sub(r'[0-9_-]+$', '', name) or name})"


def _threads(pid: int) -> dict[int, tuple[str, int]]:
  out = {}
  for task in Path(f"/proc/{pid}/task").iterdir():
    try:
      stat = (task / "stat").read_text()
    except OSError:
      continue
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()
    out[int(task.name)] = (name, int(fields[11]) + int(fields[12]))  # utime + stime, ticks
  return out


def _machine_ticks() -> tuple[int, int]:
  vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
  return sum(vals), vals[3] + vals[4]  # total, idle + iowait


class Sampler(threading.Thread):

  def __init__(self, pid: int, interval: float):
    super().__init__(daemon=True)
    self.pid, self.interval = pid, interval
    self.samples: list[dict] = []
    self.stop = threading.Event()

  def run(self):
    while not self.stop.is_set():
      try:
        threads = _threads(self.pid)
      except OSError:
        break
      self.samples.append({"t": time.perf_counter(), "threads": threads,
                           "machine": _machine_ticks()})
      self.stop.wait(self.interval)


def _summarize(samples: list[dict], cores: int) -> dict:
  """Cores busy from per-thread CPU time between samples (threads that end before the last
  sample keep the time they were last seen with; the process's own total would lose them)."""
  first, last = samples[0], samples[-1]
  wall = last["t"] - first["t"]
  start: dict[int, int] = {}
  seen: dict[int, tuple[str, int]] = {}
  for smp in samples:
    for tid, (name, ticks) in smp["threads"].items():
      start.setdefault(tid, 0 if smp is not first else ticks)
      seen[tid] = (name, ticks)
  groups: dict[str, float] = collections.Counter()
  names: dict[str, float] = collections.Counter()
  for tid, (name, ticks) in seen.items():
    groups[_group(name)] += (ticks - start[tid]) / TICK
    names[name] += (ticks - start[tid]) / TICK
  busy = sum(groups.values())
  total0, idle0 = first["machine"]
  total1, idle1 = last["machine"]
  machine_busy = 1 - (idle1 - idle0) / max(total1 - total0, 1)
  timeline = []
  for a, b in zip(samples, samples[1:]):
    dt = b["t"] - a["t"]
    used = sum(t - a["threads"].get(tid, (n, t))[1] for tid, (n, t) in b["threads"].items())
    timeline.append(round(used / TICK / dt, 3))
  return {"wall_seconds": wall, "process_cores_busy": busy / wall,
          "machine_cores_busy": machine_busy * cores,
          "cpu_seconds_by_group": dict(groups.most_common()),
          "cpu_seconds_by_thread_name": dict(names.most_common(15)),
          "threads_seen": len(seen), "timeline_cores_busy": timeline}


def _pyspy_summary(raw: Path, top: int = 12) -> list[dict]:
  """py-spy's raw (collapsed) output -> the main thread's leaf-most bonejax/launch frame."""
  counts: dict[str, int] = collections.Counter()
  total = 0
  for line in raw.read_text().splitlines():
    stack, _, n = line.rpartition(" ")
    if not n.isdigit() or "MainThread" not in stack.split(";")[0]:
      continue
    frames = stack.split(";")[1:]
    ours = [f for f in frames if "bonejax" in f or "launch/" in f]
    counts[(ours[-1] if ours else frames[-1] if frames else "?")[:160]] += int(n)
    total += int(n)
  return [{"frame": f, "share": c / total} for f, c in counts.most_common(top)] if total else []


def main(argv):
  del argv
  load_start = common.load_average()
  work = Path(_WORKDIR.value or tempfile.mkdtemp(prefix="bonejax-idle-"))
  data = work / "data"
  if not (data / "dataset.json").exists():
    from bonejax import phantom
    phantom.make_dataset(data, num_scans=3, shape=(64, max(256, _PATCH.value),
                                                   max(256, _PATCH.value)),
                         seed=0, kind="bone", overwrite=True, progress=False)
  run = work / "run"
  shutil.rmtree(run, ignore_errors=True)
  every = _EVERY.value
  cmd = [sys.executable, "launch/train.py", "--config=configs/baseline.py", f"--workdir={run}",
         f"--config.dataset={data}", f"--config.num_steps={_STEPS.value}",
         f"--config.batch_size={_BATCH.value}", f"--config.patch_size={_PATCH.value}",
         f"--config.dtype={_DTYPE.value}", f"--config.eval_every={every}",
         f"--config.checkpoint_every={every}", "--config.log_every=5",
         f"--config.val_batch_size={_BATCH.value}", "--config.val_stride=8"]
  env = dict(os.environ, PYTHONPATH=str(common.REPO))
  log = work / "train.log"
  t0 = time.perf_counter()
  with open(log, "w") as out:
    proc = subprocess.Popen(cmd, cwd=common.REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
  sampler = Sampler(proc.pid, _INTERVAL.value)
  sampler.start()
  spy = shutil.which("py-spy")
  spy_raw = work / "pyspy.txt"
  spy_proc = None
  if spy:
    time.sleep(1.0)
    spy_proc = subprocess.Popen([spy, "record", "--pid", str(proc.pid), "--idle", "--threads",
                                 "--format", "raw", "--rate", "20", "-o", str(spy_raw)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  rc = proc.wait()
  sampler.stop.set()
  sampler.join()
  if spy_proc:
    spy_proc.wait(timeout=60)
  wall = time.perf_counter() - t0
  if rc != 0:
    raise RuntimeError(f"train.py exited {rc}; see {log}")
  text = log.read_text()
  rates = [float(m) for m in re.findall(r"([0-9.]+) patches/s", text)]
  evals = [float(m) for m in re.findall(r"\[eval\].*\(([0-9.]+)s\)", text)]
  # Drop the start-up (imports, compile): from the first log line's sample on.
  cores = common.usable_cores()
  summary = _summarize(sampler.samples, cores)
  spy_top = _pyspy_summary(spy_raw) if spy and spy_raw.exists() else []
  load = (load_start, common.load_average())
  info = common.machine()
  tag = _TAG.value or info["tag"]
  info["tag"] = tag
  group_rows = [{"group": g, "cpu_s": s, "share": s / max(sum(
      summary["cpu_seconds_by_group"].values()), 1e-9)}
      for g, s in summary["cpu_seconds_by_group"].items()]
  md = "\n".join([
      f"# Training run, where the CPU time goes: {tag}", "", common.machine_line(info), "",
      f"Load average at start / end: {load[0]} / {load[1]}.", "",
      f"`{' '.join(cmd[1:])}`", "",
      f"Whole process life ({summary['wall_seconds']:.0f} s, start-up and compiles included): "
      f"the run kept {summary['process_cores_busy']:.2f} of {cores} cores busy on average; the "
      f"machine as a whole (all processes) {summary['machine_cores_busy']:.2f}. Logged training "
      f"rates (patches/s): {', '.join(f'{r:.3g}' for r in rates) or '-'}; validation passes "
      f"took {', '.join(f'{e:.1f}' for e in evals) or '-'} s.", "",
      "CPU seconds by thread group:", "",
      common.markdown_table(group_rows, ["group", "cpu_s", "share"],
                            ["threads", "CPU s", "share"]), "",
      "Main thread (py-spy, idle samples included), innermost bonejax/launch frame:", "",
      common.markdown_table(spy_top, ["frame", "share"]) if spy_top else "(py-spy not run)"])
  print(md)
  payload = {"config": {"cmd": cmd, "interval": _INTERVAL.value}, "summary": summary,
             "rates": rates, "evals": evals, "pyspy_main_thread": spy_top,
             "wall_seconds": wall, "load_average": {"start": load[0], "end": load[1]},
             "machine": info}
  paths = common.write_results("cpu_train_idle", payload, md, tag=tag,
                               results_dir=_RESULTS.value)
  return {"json": paths["json"], "md": paths["md"],
          "process_cores_busy": summary["process_cores_busy"]}


if __name__ == "__main__":
  runner.run(main)
