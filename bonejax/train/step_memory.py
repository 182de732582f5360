"""A training's device memory planned before anything is allocated or compiled: the patch
against the scans, and the step's activations against the devices' memory.

An absurd `--config.patch_size` (or batch) used to reach XLA, whose allocation failure came
minutes later, after compiling. Here, before the first compile:
- a 2D patch larger than every training scan's largest plane side is refused (every patch
  would be mostly mirror padding; 3D patches are checked against each scan by patches3d);
- the step's memory is bounded from below, and refused when even that exceeds the memory of a
  device: the train state (parameters, gradients, optimiser state: 4 float32 copies), the
  batch, and for the largest convolution of the forward pass its input and output at once
  (which any schedule needs, also the backward pass's, with the gradient in place of the
  output) for the device's share of the batch.
The bound is a floor, not an estimate: XLA may rematerialise activations (GPU) but can never
go below it, so no configuration that fits is refused; the full need is several times larger
(every activation the backward pass uses is kept), which XLA's own out-of-memory error still
reports in one line (bonejax/cli/runner.py) for configurations between the two.

The convolutions are found in the forward pass's jaxpr, traced at batch 1 on abstract shapes
(no compile, no allocation).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bonejax.core import errors, memory_plan
from bonejax.data import store


def check_patch_fits_scans(patch_size: int, axes: Sequence[int], dataset: store.Dataset,
                           scans: Sequence[str]) -> None:
  """Refuses a 2D patch larger than every training scan's largest plane side (across `axes`)."""
  largest, where = 0, None
  for name in scans:
    shape = tuple(int(n) for n in store.open_array(dataset.scan_path(name) / "image").shape[:3])
    for axis in axes:
      side = max(n for d, n in enumerate(shape) if d != int(axis) % 3)
      if side > largest:
        largest, where = side, f"scan {name!r} {shape}"
  if where is not None and int(patch_size) > largest:
    raise errors.UserError(f"--config.patch_size={patch_size} is larger than every training scan "
                           f"(the largest plane side is {largest} px, {where}); choose "
                           f"patch_size <= {largest}")


def _subjaxprs(eqn) -> list:
  """The jaxprs nested in an equation's parameters (jit, custom_jvp/vjp, remat, cond, scan)."""
  out = []
  for v in eqn.params.values():
    for x in (v if isinstance(v, (list, tuple)) else [v]):
      inner = getattr(x, "jaxpr", x)  # a ClosedJaxpr holds its Jaxpr
      if hasattr(inner, "eqns"):
        out.append(inner)
  return out


def _nbytes(aval) -> int:
  try:
    itemsize = np.dtype(aval.dtype).itemsize
  except TypeError:  # JAX's extended dtypes (PRNG keys) have no numpy form
    itemsize = int(getattr(aval.dtype, "itemsize", 0) or 8)
  return math.prod(aval.shape) * itemsize


def largest_conv_bytes(jaxpr) -> int:
  """The largest input + output bytes of one convolution in `jaxpr` (nested ones included)."""
  best = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      best = max(best, _nbytes(eqn.invars[0].aval) + _nbytes(eqn.outvars[0].aval))
    for sub in _subjaxprs(eqn):
      best = max(best, largest_conv_bytes(sub))
  return best


def forward_floor_bytes(abstract_model: Any, sample_shape: Sequence[int], dtype) -> int:
  """Bytes of the largest convolution's input + output for one sample of `sample_shape`
  (without the batch axis), from the forward pass traced on abstract shapes."""
  graphdef, state = nnx.split(abstract_model)
  x = jax.ShapeDtypeStruct((1,) + tuple(int(n) for n in sample_shape), dtype)
  closed = jax.make_jaxpr(lambda st, a: nnx.merge(graphdef, st)(a))(state, x)
  return largest_conv_bytes(closed.jaxpr)


def device_limit_bytes(devices: Sequence[Any]) -> tuple[int | None, str, bool]:
  """(bytes one device may use, words naming it, whether the devices share host memory)."""
  stats = None
  try:
    stats = devices[0].memory_stats()
  except Exception:  # pylint: disable=broad-except  # backends without memory statistics
    stats = None
  if stats and stats.get("bytes_limit"):
    free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return free, f"{memory_plan.format_bytes(free)} free on {devices[0].device_kind}", False
  limit, why = memory_plan.budget_bytes(None)
  return limit, why, True


# More than any model here keeps per input pixel in its largest convolution (input and output;
# unet_resnet18: 192 bytes): a step within this guess is not traced (a trace of a ResNet U-Net
# costs 1-2 s on a CPU), so only the absurd configurations pay for their check.
GENEROUS_BYTES_PER_PIXEL = 4096


def _state_bytes(abstract_model: Any) -> int:
  """The model's variables and its parameters' gradients."""
  params = sum(_nbytes(x) for x in jax.tree.leaves(nnx.state(abstract_model, nnx.Param)))
  return sum(_nbytes(x) for x in jax.tree.leaves(nnx.state(abstract_model))) + params


def step_floor_bytes(abstract_model: Any, batch_size: int, sample_shape: Sequence[int]) -> int:
  """What one device needs at least for a step on `batch_size` samples of `sample_shape`
  (channels last: (H, W, C) or (D, H, W, C)): the state and its gradients, the batch (float32
  image, int32 label) and the largest convolution's input and output."""
  sample = math.prod(sample_shape) * 4 + math.prod(sample_shape[:-1]) * 4
  conv = forward_floor_bytes(abstract_model, sample_shape, jnp.float32)
  return _state_bytes(abstract_model) + int(batch_size) * (sample + conv)


def check_step_memory(*, abstract_model: Any, batch_size: int, sample_shape: Sequence[int],
                      devices: Sequence[Any], what: str) -> int | None:
  """Refuses (one `UserError` line naming `what` and the bytes) a step whose memory floor
  exceeds a device's free memory (CPU devices: together, the host's). Returns the floor, or
  None when even a generous guess fits (not traced)."""
  per_device_batch = max(1, -(-int(batch_size) // max(1, len(devices))))
  limit, why, shared_host = device_limit_bytes(devices)
  local = [d for d in devices if d.process_index == jax.process_index()] or list(devices)
  copies = len(local) if shared_host else 1
  pixels = math.prod(sample_shape[:-1])
  guess = _state_bytes(abstract_model) + per_device_batch * pixels * (GENEROUS_BYTES_PER_PIXEL
                                                                      + 8 * sample_shape[-1])
  if limit is None or guess * copies <= limit:
    return None
  floor = step_floor_bytes(abstract_model, per_device_batch, sample_shape)
  if floor * copies > limit:
    conv = forward_floor_bytes(abstract_model, sample_shape, jnp.float32)
    raise errors.UserError(
        f"{what} needs at least {memory_plan.format_bytes(floor * copies)} of device memory for "
        f"one training step (the largest convolution's input and output: "
        f"{memory_plan.format_bytes(conv)} per patch), but {why}; use a smaller batch_size or "
        "patch_size")
  return floor


def check(c, s, graphs, dataset: store.Dataset, train_scans: Sequence[str], patch3d, mesh) -> int:
  """Both checks of this module for a training run (train/setup.py); the step's floor."""
  if patch3d is None:
    check_patch_fits_scans(int(c.patch_size), tuple(c.axes), dataset, train_scans)
    sample = (int(c.patch_size),) * 2 + (s.in_channels,)
    what = f"--config.batch_size={s.batch_size} with --config.patch_size={c.patch_size}"
  else:
    sample = tuple(int(n) for n in patch3d) + (s.in_channels,)
    what = f"--config.batch_size={s.batch_size} with the 3D patch {tuple(patch3d)}"
  return check_step_memory(abstract_model=graphs.abstract, batch_size=s.batch_size,
                           sample_shape=sample, devices=list(mesh.devices.flat), what=what)
