"""Jobs: commands run in their own process (the launch/ JSON-line convention), and the bonejax
pieces the benchmarks time (a model by name, the trainer's train step, the eval forward).

The bonejax pieces import jax on use; running a job imports neither jax nor torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from . import REPO


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
  launch/train.py runs; `source` says "trainer".
  """
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from bonejax.train import augment, losses, trainer

  tx = optax.adam(learning_rate)
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


def bonejax_forward(model):
  """`(forward, state)`: the eval-mode forward as a pure jitted function, softmax included."""
  import jax
  from flax import nnx

  model.eval()
  graphdef, state = nnx.split(model)

  def forward(state, x):
    return jax.nn.softmax(nnx.merge(graphdef, state)(x), axis=-1)

  return jax.jit(forward), state


def trainer_train_step(create, mesh):
  """`(step, state, scale)`: the step `benchmarks/train_throughput.py` times for "step" and
  "loader+step", built the same way: the trainer's jitted, donated step with the default
  config's augmentation (on), CE + Dice, Adam on the default schedule, sharded over `mesh`.

  `create(rngs)` builds the model. `step(state, batch, scale) -> (state, metrics)` with batch
  {"image": (B, P, P, C) float32, "label": (B, P, P) int32}.
  """
  import jax
  import numpy as np
  from flax import nnx

  from bonejax.train import configlib, losses, optim, trainer
  from bonejax.train import mesh as mesh_lib

  cfg = configlib.default_config()
  schedule = optim.make_schedule({}, 3e-4, 1000)
  tx = optim.make_optimizer({"name": "adam"}, schedule)
  data_sh, repl = mesh_lib.data_sharding(mesh), mesh_lib.replicated(mesh)
  graphdef, _, _ = nnx.split(nnx.eval_shape(lambda: create(nnx.Rngs(0))), nnx.Param, ...)
  state = jax.jit(trainer.make_init(create, tx, 0), out_shardings=repl)()
  step = jax.jit(trainer.make_train_step(graphdef, tx, losses.make_loss({"ce": 1, "dice": 1}),
                                         cfg.augment, 0, schedule),
                 in_shardings=(repl, data_sh, repl), out_shardings=(repl, repl),
                 donate_argnums=(0,))
  return step, state, jax.device_put(np.float32(1.0), repl)
