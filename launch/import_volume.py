r"""Imports a micro-CT volume (and optional labels) as a scan of a bonejax dataset.

  python launch/import_volume.py --image=stack.tif --labels=labels.tif --out=DATA --scan=femur_01

Inputs: a multi-page TIFF, a folder of 2D TIFF slices (natural order), a .npy, a zarr array or
a scan directory. The volume is streamed `--slab` slices at a time, so it may be larger than
memory. The scan appears in DATA/ and dataset.json only once it is complete.
Prints progress on stderr and, as the last stdout line, JSON with scan, shape, dtype, ...
"""

import sys
from pathlib import Path

# Lets `python launch/import_volume.py` run from a checkout that is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from absl import flags  # noqa: E402

from bonejax import cli, volume_io  # noqa: E402  (no jax: start-up stays fast)

_IMAGE = flags.DEFINE_string("image", None, "Input volume: multi-page TIFF, folder of 2D TIFFs, "
                             ".npy, zarr array or scan directory.", required=True)
_OUT = flags.DEFINE_string("out", None, "Dataset directory (created if absent).", required=True)
_SCAN = flags.DEFINE_string("scan", None, "Scan name: a directory name inside --out.",
                            required=True)
_LABELS = flags.DEFINE_string("labels", None, "Optional labels volume, same kinds and shape "
                              "as --image; integer values < number of classes.")
_CLASSES = flags.DEFINE_string("classes", ",".join(volume_io.DEFAULT_CLASSES),
                               "Comma-separated class names (class 0 first); must match an "
                               "existing dataset.json.")
_VOXEL = flags.DEFINE_float("voxel_size_um", 1.0, "Voxel size in micrometres.")
_CHUNKS = flags.DEFINE_string("chunks", "64,64,64", "zarr chunk shape Z,Y,X.")
_SLAB = flags.DEFINE_integer("slab", 64, "Slices read and written per streamed slab.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing scan of that name.")


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  return volume_io.import_volume(
      image=_IMAGE.value, out=_OUT.value, scan=_SCAN.value, labels=_LABELS.value,
      classes=_CLASSES.value, voxel_size_um=_VOXEL.value,
      chunks=cli.parse_ints(_CHUNKS.value, 3, "chunks"), slab=_SLAB.value,
      overwrite=_OVERWRITE.value)


if __name__ == "__main__":
  cli.run(main)
