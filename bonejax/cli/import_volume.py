r"""Imports a micro-CT volume (and optional labels) as a scan of a bonejax dataset.

  python launch/import_volume.py --image=stack.tif --labels=labels.tif --out=DATA --scan=femur_01

  python launch/import_volume.py --image=scan.h5 --image_key=/entry/data/data --out=DATA \
      --scan=s1 --resample_um=5

Inputs: a multi-page TIFF, a folder of 2D slices (TIFF, PNG, BMP, JPEG 2000, ...; natural
order), a .npy, a zarr / OME-Zarr array, a scan directory, an HDF5 / NeXus file (`--image_key`),
an MRC or a Scanco .isq file. The voxel size comes from the file's metadata unless
`--voxel_size_um` is given; with neither, 1 um is assumed, said once on stderr and recorded as
the scan's `voxel_size_source: "assumed"`. `--resample_um` resamples to that voxel size (image
linearly, labels by nearest neighbour). The volume is streamed `--slab` slices at a time, so
it may be larger than memory. The scan appears in DATA/ and dataset.json only once it is complete.
Prints progress on stderr and, as the last stdout line, JSON with scan, shape, dtype, ...
"""

import sys
from pathlib import Path


from absl import flags

from bonejax.cli import runner  # (no jax: start-up stays fast)
from bonejax.core import errors
from bonejax.data import importer

_IMAGE = flags.DEFINE_string("image", None, "Input volume: multi-page TIFF, folder of 2D slices, "
                             ".npy, zarr / OME-Zarr, scan directory, HDF5 / NeXus, MRC or .isq.",
                             required=True)
_OUT = flags.DEFINE_string("out", None, "Dataset directory (created if absent).", required=True)
_SCAN = flags.DEFINE_string("scan", None, "Scan name: a directory name inside --out.",
                            required=True)
_LABELS = flags.DEFINE_string("labels", None, "Optional labels volume, same kinds and shape "
                              "as --image; integer values < number of classes.")
_CLASSES = flags.DEFINE_string("classes", ",".join(importer.DEFAULT_CLASSES),
                               "Comma-separated class names (class 0 first); must match an "
                               "existing dataset.json.")
_VOXEL = flags.DEFINE_string("voxel_size_um", None, "Voxel size in micrometres: one number or "
                             "Z,Y,X (default: from the file's metadata, else 1).")
_RESAMPLE = flags.DEFINE_float("resample_um", None, "Resample to this isotropic voxel size in "
                               "micrometres (e.g. 5, as Scaling the U-net); default: keep.")
_IMAGE_KEY = flags.DEFINE_string("image_key", None, "Dataset inside an HDF5 / NeXus --image "
                                 "(default: its only volume or the NeXus default signal).")
_LABELS_KEY = flags.DEFINE_string("labels_key", None, "Dataset inside an HDF5 / NeXus --labels.")
_CHUNKS = flags.DEFINE_string("chunks", "64,64,64", "zarr chunk shape Z,Y,X.")
_SLAB = flags.DEFINE_integer("slab", 64, "Slices read and written per streamed slab.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing scan of that name.")
_BUDGET = flags.DEFINE_float("memory_budget_gb", None, "Host memory the import may use, in GiB "
                             "(default: what the machine has available); slabs shrink to fit, "
                             "and an input whose one slice would not fit is refused.")
_UNLABELLED = flags.DEFINE_integer(
    "unlabelled", None, "Sparse labels: the label value of voxels nobody painted (255 by "
    "convention; must not be a class). Recorded in dataset.json; training, validation and "
    "evaluation ignore those voxels. Default: the dataset's value, else none (dense labels).")


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  return importer.import_volume(
      image=_IMAGE.value, out=_OUT.value, scan=_SCAN.value, labels=_LABELS.value,
      classes=_CLASSES.value, voxel_size_um=_voxel_flag(_VOXEL.value),
      chunks=errors.parse_ints(_CHUNKS.value, 3, "chunks"), slab=_SLAB.value,
      overwrite=_OVERWRITE.value, resample_um=_RESAMPLE.value, image_key=_IMAGE_KEY.value,
      labels_key=_LABELS_KEY.value, memory_budget_gb=_BUDGET.value,
      unlabelled=_UNLABELLED.value)


def _voxel_flag(text):
  if text is None:
    return None
  try:
    values = [float(v) for v in text.split(",")]
  except ValueError:
    raise errors.UserError(f"--voxel_size_um={text!r} is not a number or Z,Y,X") from None
  if len(values) not in (1, 3):
    raise errors.UserError(f"--voxel_size_um={text!r}: give one number or three (Z,Y,X)")
  return values[0] if len(values) == 1 else values


def run() -> None:
  runner.run(main)


if __name__ == "__main__":
  run()
