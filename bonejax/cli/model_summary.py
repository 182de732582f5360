r"""Parameter count and forward FLOPs of a model from the zoo, without allocating it.

  python launch/model_summary.py --model=unet_resnet18 --num_classes=3 --in_channels=1 --patch=256

Expected: 14,322,227 parameters and 10.63 GFLOP per 256x256 patch (the figures of
segmentation_models_pytorch for the same network), in a few seconds on a laptop CPU.

3D models (unet3d, unet3d_resnet18) take a D x H x W patch: --patch=64 is a 64^3 cube, or
give the sides as --patch=D,H,W. The FLOPs are those of the traced 3D forward on it, every
side a multiple of the model's stride (32 for unet3d_resnet18, 2^(depth-1) for unet3d; 2D
models: 32).
Parameters come from `nnx.eval_shape`; `gflops_per_patch` is 2 x the multiply-adds of every conv
and matmul in the traced forward, padding taps included (the PyTorch counters' convention);
`xla_gflops_per_patch` is XLA's cost analysis of the forward compiled on abstract shapes, which
skips padding taps and adds element-wise ops (see bonejax.models.forward_gflops). Nothing large is
ever allocated.

Prints a table of parameters per top-level part on stderr and, as the last stdout line, JSON with
model, params, gflops_per_patch, ...
"""

import json
import sys
from pathlib import Path


from absl import flags

from bonejax.cli import runner
from bonejax.core import errors

_MODEL = flags.DEFINE_string("model", None, "Model name (see bonejax.models.MODEL_NAMES).",
                             required=True)
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 3, "Output classes.", lower_bound=1)
_IN_CHANNELS = flags.DEFINE_integer("in_channels", 1, "Input channels.", lower_bound=1)
_PATCH = flags.DEFINE_string("patch", "256", "Patch side (a square, a cube for 3D models), "
                             "H,W or (3D) D,H,W; multiples of the model's stride.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_BATCH = flags.DEFINE_integer("batch", 1, "Patches per forward call.", lower_bound=1)
_MODEL_ARGS = flags.DEFINE_string("model_args", "{}",
                                  'Model arguments as JSON, e.g. \'{"depth": 4, "width": 16}\'.')


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  patch = errors.parse_ints(_PATCH.value, None, "patch")
  if len(patch) not in (1, 2, 3):
    raise errors.UserError(f"--patch={_PATCH.value!r} needs one, two (H,W) or three (D,H,W) "
                           "integers")
  try:
    model_args = json.loads(_MODEL_ARGS.value)
  except json.JSONDecodeError as e:
    raise errors.UserError(f"--model_args is not valid JSON: {e}") from None
  if not isinstance(model_args, dict):
    raise errors.UserError("--model_args must be a JSON object")

  # Imported here so that --help and flag errors stay fast.
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from bonejax import models  # pylint: disable=import-outside-toplevel
  from bonejax.models import utils as model_utils  # pylint: disable=import-outside-toplevel

  name, batch = _MODEL.value, _BATCH.value
  try:
    dims = models.spatial_dims(name)
  except (ValueError, KeyError) as e:
    raise errors.UserError(str(e)) from None
  patch = patch * dims if len(patch) == 1 else patch
  if len(patch) != dims:
    raise errors.UserError(f"--patch={_PATCH.value!r}: {name} is a {dims}D model and takes "
                           f"{'D,H,W' if dims == 3 else 'H,W'} (or one side)")
  try:
    model = models.abstract_model(models.create, name, num_classes=_NUM_CLASSES.value,
                                  in_channels=_IN_CHANNELS.value, rngs=nnx.Rngs(0),
                                  dtype=jnp.dtype(_DTYPE.value), **model_args)
  except (ValueError, TypeError) as e:
    raise errors.UserError(str(e)) from None

  stride = int(getattr(model, "stride", models.STRIDE)) if dims == 3 else models.STRIDE
  if any(p % stride for p in patch):
    raise errors.UserError(f"--patch={_PATCH.value} must be a multiple of {stride} (the "
                           f"model's stride) on every side")
  patch = model_utils.patch_shape(model, patch)
  params = models.count_params(model)
  parts = {str(key): models.count_params(child) for key, child in nnx.iter_children(model)}
  x = jax.ShapeDtypeStruct((batch, *patch, _IN_CHANNELS.value), jnp.float32)
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
  gflops = models.forward_gflops(model, patch, _IN_CHANNELS.value, batch=batch)
  xla_gflops = models.forward_gflops(model, patch, _IN_CHANNELS.value, batch=batch,
                                     convention="xla")

  print(f"{name}: input {tuple(x.shape)} -> logits {tuple(out.shape)} {out.dtype}, "
        f"compute {_DTYPE.value}", file=sys.stderr)
  for part, n in parts.items():
    if n:
      print(f"  {part:<24s} {n:>14,d}", file=sys.stderr)
  print(f"  {'total parameters':<24s} {params:>14,d}", file=sys.stderr)
  print(f"  {'GFLOP / patch':<24s} {gflops / batch:>14.3f}  (dense conv+matmul, FLOP = 2 MAC)",
        file=sys.stderr)
  print(f"  {'XLA GFLOP / patch':<24s} {xla_gflops / batch:>14.3f}  (XLA cost analysis)",
        file=sys.stderr)
  return {
      "model": name, "params": params, "gflops_per_patch": round(gflops / batch, 4),
      "xla_gflops_per_patch": round(xla_gflops / batch, 4),
      "gflops_per_batch": round(gflops, 4), "batch": batch, "patch": list(patch),
      "in_channels": _IN_CHANNELS.value, "num_classes": _NUM_CLASSES.value,
      "dtype": _DTYPE.value, "model_args": model_args, "params_by_part": parts,
      "output_shape": list(out.shape),
  }


def run() -> None:
  runner.run(main)


if __name__ == "__main__":
  run()
