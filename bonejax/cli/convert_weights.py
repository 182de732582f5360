r"""PyTorch (BONe / segmentation_models_pytorch) weights in and out of bonejax bundles.

Import: a DLFit checkpoint, a bare smp state dict or a .safetensors file -> a bonejax bundle
  python launch/convert_weights.py --pth=BP-2D-03.pth --out=/tmp/bp2d03 [--arch=unet_resnet18] \
      [--classes=background,bone,pores]
  python launch/predict.py --model=/tmp/bp2d03 --input=scan.tif --output=pred.zarr --planes=3

Export: a bonejax bundle -> an smp state dict that
`smp.Unet(encoder_name="resnet18", in_channels=1, classes=3).load_state_dict(...)` loads
  python launch/convert_weights.py --bundle=/tmp/run/model --to_pth=/tmp/model.pth  (or .safetensors)

Architectures: smp Unet, UnetPlusPlus and DeepLabV3Plus on resnet18/34/50, Segformer and Unet on
mit_b0, recognised from the weights' keys (`--arch` checks instead). `.pth` files are read
without torch and without executing pickled code: anything but tensors, dicts, lists and plain
values is refused. Takes seconds. The last stdout line is JSON with bundle (or pth), arch, params.
"""

import sys
from pathlib import Path


from absl import flags

from bonejax.cli import runner
from bonejax.core import errors, outputs

_PTH = flags.DEFINE_string("pth", None, "Weights to import: a DLFit .pth checkpoint, an smp "
                           "state dict (.pth/.pt) or .safetensors.")
_OUT = flags.DEFINE_string("out", None, "Bundle directory to write (with --pth).")
_ARCH = flags.DEFINE_string("arch", None, "bonejax model name, e.g. unet_resnet18 (default: "
                            "recognised from the keys).")
_CLASSES = flags.DEFINE_string("classes", None, "Comma-separated class names (default: from "
                               "the metadata, else background,class_1,...); must match the "
                               "weights' class count.")
_NORMALIZATION = flags.DEFINE_string("normalization", None, "Intensity rule: zscore or "
                                     "percentile (default: from the metadata, else zscore as in "
                                     "BONe).")
_PATCH = flags.DEFINE_integer("patch_size", None, "Training patch side recorded in model.json "
                              "(default: from the metadata, else 256).", lower_bound=1)
_CONTEXT = flags.DEFINE_integer("context_slices", None, "2.5D: slices each side of the plane "
                                "(in_channels must be 2k+1; default: from the metadata, else 0).",
                                lower_bound=0)
_BUNDLE = flags.DEFINE_string("bundle", None, "Bundle to export (with --to_pth).")
_TO_PTH = flags.DEFINE_string("to_pth", None, "Export target: PATH.pth (torch.save format) or "
                              "PATH.safetensors.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output.")


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  importing, exporting = _PTH.value is not None, _TO_PTH.value is not None
  if importing == exporting:
    raise errors.UserError("give either --pth and --out (import) or --bundle and --to_pth (export)")
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  import bonejax.convert as convert  # pylint: disable=import-outside-toplevel
  if exporting:
    if not _BUNDLE.value:
      raise errors.UserError("--to_pth needs --bundle (the bundle to export)")
    stray = [f for f, v in (("out", _OUT), ("arch", _ARCH), ("classes", _CLASSES)) if v.value]
    if stray:
      raise errors.UserError(f"--{stray[0]} goes with --pth (import), not with --to_pth")
    # The export must not land in (or replace) the bundle it reads, its weights/ included.
    outputs.check_output(_TO_PTH.value, _OVERWRITE.value, inputs=[_BUNDLE.value],
                         what="--to_pth")
    result = convert.export_weights(_BUNDLE.value, _TO_PTH.value, overwrite=_OVERWRITE.value)
    print(f"wrote {result['pth']}: {result['arch']} as smp {result['smp']['class']}"
          f"(encoder_name={result['smp']['encoder_name']!r}), {result['params']:,} parameters",
          file=sys.stderr)
    return result
  if not _OUT.value:
    raise errors.UserError("--pth needs --out (the bundle directory to write)")
  if _BUNDLE.value:
    raise errors.UserError("--bundle goes with --to_pth (export), not with --pth")
  outputs.check_output(_OUT.value, _OVERWRITE.value, inputs=[_PTH.value], what="--out")
  classes = None
  if _CLASSES.value is not None:
    classes = [c.strip() for c in _CLASSES.value.split(",")]
    if not all(classes) or len(set(classes)) != len(classes):
      raise errors.UserError(f"--classes={_CLASSES.value!r} needs distinct, non-empty names")
  result = convert.import_weights(_PTH.value, _OUT.value, arch=_ARCH.value, classes=classes,
                                  normalization=_NORMALIZATION.value, patch_size=_PATCH.value,
                                  context_slices=_CONTEXT.value, overwrite=_OVERWRITE.value)
  print(f"wrote {result['bundle']}: {result['arch']} from {result['source_kind']}, "
        f"{result['params']:,} parameters, classes {','.join(result['classes'])}, "
        f"normalisation {result['normalization']}", file=sys.stderr)
  if "normalization_source" in result:
    print(f"note: the checkpoint's normalisation {result['normalization_source']!r} has no exact "
          f"bonejax rule; using {result['normalization']!r} (pass --normalization to choose)",
          file=sys.stderr)
  return result


def run() -> None:
  runner.run(main)


if __name__ == "__main__":
  run()
