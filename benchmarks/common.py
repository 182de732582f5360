"""What every benchmark shares: the machine it ran on, timing, peak memory, result files.

    from benchmarks import common            # or `import common` from a script in benchmarks/
    times = common.time_calls(step, repeats=5, warmup=2)
    print(common.markdown_table(rows, ["model", "patches/s"]))
    common.write_results("roofline", payload, markdown)   # results/roofline_<machine>.{json,md}

Results go to `benchmarks/results/NAME_<machine>.{json,md}` where <machine> is a short tag
(`cpu-2c`, `nvidia-h100-80gb-hbm3`, ...; override with BONEJAX_MACHINE). Every JSON result
carries `machine` (CPU model, cores, memory, accelerator, library versions) and the load average
at the start and end of the run, so numbers taken on a busy shared machine say so.

Importing this module does not import jax or torch: peer (PyTorch) jobs use it too.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

if str(REPO) not in sys.path:  # scripts run as `python benchmarks/x.py` import bonejax from here
  sys.path.insert(0, str(REPO))

from bonejax import cli  # noqa: E402  (cli imports neither jax nor torch)


# ---------------------------------------------------------------------------------------------
# The machine.
# ---------------------------------------------------------------------------------------------


def _cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        flags = line.split(":", 1)[1].split()
        return sorted(f for f in flags if re.match(r"(avx512_bf16|amx|avx512f$|avx2$|fma$)", f))
  except OSError:
    pass
  return []


def usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _mem_total_gb() -> float | None:
  try:
    for line in Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemTotal"):
        return round(int(line.split()[1]) / 2**20, 1)
  except OSError:
    pass
  return None


def load_average() -> list[float] | None:
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return None


def _version(module: str) -> str | None:
  """Version of an installed distribution without importing it (torch import costs seconds)."""
  from importlib import metadata
  try:
    return metadata.version(module)
  except metadata.PackageNotFoundError:
    return None


def accelerators() -> list[dict[str, Any]]:
  """JAX's devices (imports jax): platform, kind and count."""
  import jax
  kinds: dict[tuple[str, str], int] = {}
  for d in jax.devices():
    key = (d.platform, getattr(d, "device_kind", d.platform))
    kinds[key] = kinds.get(key, 0) + 1
  return [{"platform": p, "kind": k, "count": n} for (p, k), n in kinds.items()]


def machine(with_jax: bool = True) -> dict[str, Any]:
  """A description of this machine for result files."""
  info: dict[str, Any] = {
      "tag": machine_tag(with_jax),
      "hostname": platform.node(),
      "cpu": _cpu_model(),
      "cpu_flags": _cpu_flags(),
      "cores": usable_cores(),
      "memory_gb": _mem_total_gb(),
      "python": platform.python_version(),
      "os": f"{platform.system()} {platform.release()}",
      "versions": {m: _version(m) for m in ("jax", "jaxlib", "flax", "optax", "numpy", "torch",
                                            "monai") if _version(m)},
  }
  if with_jax:
    info["accelerators"] = accelerators()
  return info


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_tag(with_jax: bool = True) -> str:
  """Short file-name tag: the accelerator kind (`nvidia-h100-80gb-hbm3`) or `cpu-<cores>c`."""
  if os.environ.get("BONEJAX_MACHINE"):
    return _slug(os.environ["BONEJAX_MACHINE"])
  if with_jax:
    accs = [a for a in accelerators() if a["platform"] != "cpu"]
    if accs:
      a = accs[0]
      return _slug(a["kind"]) + (f"-x{a['count']}" if a["count"] > 1 else "")
  return f"cpu-{usable_cores()}c"


# ---------------------------------------------------------------------------------------------
# Timing and statistics.
# ---------------------------------------------------------------------------------------------


def median(values: Iterable[float]) -> float:
  values = [float(v) for v in values if v is not None]
  return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> dict[str, float]:
  """Median, min, max and the relative half-range (a crude noise figure) of repeated timings."""
  values = [float(v) for v in values if v is not None]
  if not values:
    return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
  med = statistics.median(values)
  return {"median": med, "min": min(values), "max": max(values), "n": len(values),
          "rel_halfrange": (max(values) - min(values)) / (2 * med) if med else float("nan")}


def time_calls(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1,
               sync: Callable[[Any], Any] | None = None) -> list[float]:
  """Seconds per call of `fn()` over `repeats` calls after `warmup` calls.

  `sync(result)` waits for asynchronous work (`jax.block_until_ready`,
  `torch.cuda.synchronize`); without it the result is returned as is.
  """
  sync = sync or (lambda r: r)
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t0)
  return times


def jax_sync(x: Any) -> Any:
  import jax
  return jax.block_until_ready(x)


# ---------------------------------------------------------------------------------------------
# Memory.
# ---------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
  """Peak resident memory of this process in MiB (VmHWM; getrusage where /proc is absent)."""
  try:
    for line in Path("/proc/self/status").read_text().splitlines():
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  except OSError:
    pass
  # ru_maxrss is KiB on Linux, bytes on macOS.
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def reset_peak_rss() -> bool:
  """Resets VmHWM to the current RSS (Linux only), so a peak can be read for one phase."""
  try:
    Path("/proc/self/clear_refs").write_text("5")
    return True
  except OSError:
    return False


def jax_peak_device_mb() -> float | None:
  """Peak device memory of JAX's first device in MiB, where the backend reports it (GPU/TPU)."""
  import jax
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    return None
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20


# ---------------------------------------------------------------------------------------------
# Jobs in their own process.
# ---------------------------------------------------------------------------------------------


class JobFailed(RuntimeError):
  def __init__(self, message: str, returncode: int | None, stderr_tail: str):
    super().__init__(message)
    self.returncode, self.stderr_tail = returncode, stderr_tail


def last_json_line(text: str) -> dict[str, Any] | None:
  for line in reversed(text.strip().splitlines()):
    line = line.strip()
    if line.startswith("{") and line.endswith("}"):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        return None
  return None


def run_json(cmd: Sequence[str], timeout: float | None = None, env: dict[str, str] | None = None,
             log: Path | None = None, echo_stderr: bool = False) -> dict[str, Any]:
  """Runs a command whose last stdout line is a JSON object (the launch/ convention).

  Returns that object plus `wall_seconds` and `child_peak_rss_mb`: the child's own peak
  resident memory (from wait4's rusage, so it is this child's alone, not the maximum over all
  children as RUSAGE_CHILDREN would give). Raises JobFailed (with the tail of stderr) on a
  non-zero exit, a timeout or no JSON line. `log` keeps stdout/stderr of the run;
  `echo_stderr` also copies the child's stderr (its progress lines) to ours at the end.
  """
  import tempfile
  import threading

  full_env = dict(os.environ)
  full_env["PYTHONPATH"] = os.pathsep.join(
      p for p in (str(REPO), full_env.get("PYTHONPATH", "")) if p)
  full_env.update(env or {})
  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=full_env, stdout=out,
                            stderr=err, text=True, start_new_session=True)
    timed_out = threading.Event()

    def _kill():
      timed_out.set()
      try:
        os.killpg(proc.pid, 9)  # the child's own session: its workers go too
      except ProcessLookupError:
        pass

    timer = threading.Timer(timeout, _kill) if timeout else None
    if timer:
      timer.start()
    try:
      _, status, usage = os.wait4(proc.pid, 0)
    except KeyboardInterrupt:
      _kill()
      raise
    finally:
      if timer:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read(), err.read()
  peak_mb = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
  if echo_stderr and stderr:
    sys.stderr.write(stderr)
  if log is not None:
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(map(str, cmd))}\n# exit {proc.returncode} after {seconds:.1f} s,"
                   f" peak RSS {peak_mb:.0f} MiB\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
  if timed_out.is_set():
    raise JobFailed(f"timed out after {timeout:.0f} s", None, stderr[-2000:])
  if proc.returncode != 0:
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error:")]
    msg = (errors or lines or [f"exit status {proc.returncode}"])[-1]
    raise JobFailed(msg, proc.returncode, stderr[-2000:])
  result = last_json_line(stdout)
  if result is None:
    raise JobFailed("no JSON result line on stdout", proc.returncode, stderr[-2000:])
  result.setdefault("wall_seconds", seconds)
  result.setdefault("child_peak_rss_mb", peak_mb)
  return result


# ---------------------------------------------------------------------------------------------
# Tables and result files.
# ---------------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 3) -> str:
  """Numbers for tables: 3 significant digits, thousands separators for large ones."""
  if value is None:
    return "-"
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, int):
    return f"{value:,}"
  if isinstance(value, float):
    if value != value:
      return "-"
    if abs(value) >= 10 ** digits:
      return f"{value:,.0f}"
    return f"{value:.{digits}g}"
  return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str],
                   headers: Sequence[str] | None = None) -> str:
  headers = list(headers or columns)
  out = ["| " + " | ".join(headers) + " |",
         "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
  for row in rows:
    out.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
  return "\n".join(out)


def result_paths(name: str, tag: str | None = None,
                 results_dir: str | os.PathLike | None = None) -> dict[str, Path]:
  d = Path(results_dir) if results_dir else RESULTS
  stem = f"{name}_{tag or machine_tag()}"
  return {ext: d / f"{stem}.{ext}" for ext in ("json", "md", "csv", "png")}


def write_results(name: str, payload: dict[str, Any], markdown: str | None = None,
                  tag: str | None = None,
                  results_dir: str | os.PathLike | None = None) -> dict[str, Path]:
  """Writes NAME_<machine>.json (payload + machine + time) and, if given, the .md, atomically."""
  paths = result_paths(name, tag, results_dir)
  payload = dict(payload)
  payload.setdefault("machine", machine())
  payload.setdefault("date", time.strftime("%Y-%m-%d %H:%M:%S %Z"))
  payload.setdefault("command", " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]))
  cli.atomic_write_json(paths["json"], payload)
  if markdown is not None:
    cli.atomic_write_text(paths["md"], markdown.rstrip() + "\n")
  return paths


def machine_line(info: dict[str, Any]) -> str:
  """One Markdown line naming the machine and the load it carried during the run."""
  accs = [a for a in info.get("accelerators", []) if a.get("platform") != "cpu"]
  acc = ", ".join(f"{a['count']} x {a['kind']}" for a in accs) or "no accelerator"
  return (f"Machine `{info.get('tag')}`: {info.get('cpu')}, {info.get('cores')} usable cores, "
          f"{info.get('memory_gb')} GB RAM, {acc}; "
          + ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items()))


# ---------------------------------------------------------------------------------------------
# bonejax jobs shared by roofline.py and peers/bonejax_job.py (jax imported on use).
# ---------------------------------------------------------------------------------------------


def dtype_of(name: str):
  import jax.numpy as jnp
  return {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16,
          "bf16": jnp.bfloat16}[name]


def bonejax_model(name: str, dtype: str = "float32", num_classes: int = 3, in_channels: int = 1,
                  seed: int = 0, **kwargs):
  from flax import nnx
  from bonejax import models
  return models.create(name, num_classes=num_classes, in_channels=in_channels,
                       rngs=nnx.Rngs(seed), dtype=dtype_of(dtype), **kwargs)


def bonejax_train_step(model, learning_rate: float = 1e-3):
  """`(step, state, source)`: one Adam + cross-entropy step as a jitted pure function.

  `step(state, x, y) -> (state, loss)`, x (B, H, W, C) float32, y (B, H, W) int32, state
  donated. It is the trainer's own step (`bonejax.train.trainer.make_train_step`) with
  augmentation off, a constant learning rate and a plain CE loss, so it is exactly the update
  launch/train.py runs; `source` says "trainer". Without the trainer a minimal equivalent
  (graph split once, nnx.merge inside jit) is used and `source` is "minimal".
  """
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  tx = optax.adam(learning_rate)
  try:
    from bonejax.train import augment, losses, trainer
  except ImportError:
    trainer = None
  if trainer is not None and hasattr(trainer, "make_train_step"):
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = {"params": params, "rest": rest, "opt": tx.init(params),
             "step": jnp.zeros((), jnp.int32)}
    inner = trainer.make_train_step(graphdef, tx, losses.make_loss({"ce": 1.0}),
                                    augment.AugmentConfig(enabled=False), 0)

    def step(state, x, y):
      state, out = inner(state, {"image": x, "label": y}, jnp.float32(1.0))
      return state, out["loss"]

    return jax.jit(step, donate_argnums=0), state, "trainer"

  from bonejax.train import losses
  model.train()
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  def step(state, x, y):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(lambda m: losses.cross_entropy(m(x), y))(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  return jax.jit(step, donate_argnums=0), state, "minimal"


def bonejax_forward(model):
  """`(forward, state)`: the eval-mode forward as a pure jitted function, softmax included."""
  import jax
  from flax import nnx

  model.eval()
  graphdef, state = nnx.split(model)

  def forward(state, x):
    return jax.nn.softmax(nnx.merge(graphdef, state)(x), axis=-1)

  return jax.jit(forward), state


def xla_flops(jitted, *args) -> float | None:
  """FLOP of one call of a jitted function from XLA's cost analysis (2 per multiply-add)."""
  try:
    cost = jitted.lower(*args).compile().cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan"))) if cost else None


def xla_memory_mb(jitted, *args) -> float | None:
  """XLA's estimate of one call's peak device memory (arguments + temporaries + outputs - aliased)
  in MiB, from the compiled executable's memory analysis; None where the backend has none."""
  try:
    m = jitted.lower(*args).compile().memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  total = (getattr(m, "argument_size_in_bytes", 0) + getattr(m, "temp_size_in_bytes", 0)
           + getattr(m, "output_size_in_bytes", 0) - getattr(m, "alias_size_in_bytes", 0))
  return total / 2**20
