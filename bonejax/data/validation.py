"""The fixed validation batches: whole (or centre-cropped) planes of the validation scans, every
voxel once, read by a thread pool; unlabelled voxels masked (sparse labels)."""

from __future__ import annotations

import concurrent.futures
from typing import Iterator, Sequence

import numpy as np

from bonejax.core import errors
from bonejax.data import patches, store
from bonejax.data.context import context_planes, reflect_index
from bonejax.data.label_maps import check_labelled, label_map
from bonejax.io import intensity

# The stream's per-scan helpers, shared with the validation reader.
_ScanInfo = patches._ScanInfo  # pylint: disable=protected-access
_open_training_scans = patches._open_training_scans  # pylint: disable=protected-access
_plane_dims = patches._plane_dims  # pylint: disable=protected-access
_read = patches._read  # pylint: disable=protected-access
_check_rule = patches._check_rule  # pylint: disable=protected-access
check_labels = patches.check_labels


def _round_up(n: int, m: int = 32) -> int:
  return -(-int(n) // m) * m


def _val_geometry(shape: Sequence[int], axis: int, crop: int | None):
  """Where a validation plane's crop sits and how it is padded: ((o0, c0, m0), (o1, c1, m1),
  valid mask (h, w)). The crop (or whole plane, where smaller) starts at o, spans c, and the
  index map m mirrors it out to h or w, a multiple of 32."""
  d0, d1 = _plane_dims(axis)
  n0, n1 = shape[d0], shape[d1]
  c0, c1 = (min(crop, n0), min(crop, n1)) if crop else (n0, n1)
  o0, o1 = (n0 - c0) // 2, (n1 - c1) // 2
  h, w = (_round_up(crop), _round_up(crop)) if crop else (_round_up(n0), _round_up(n1))
  m0 = reflect_index(np.arange(h) - (h - c0) // 2, c0)
  m1 = reflect_index(np.arange(w) - (w - c1) // 2, c1)
  valid = np.zeros((h, w), np.float32)
  valid[(h - c0) // 2:(h - c0) // 2 + c0, (w - c1) // 2:(w - c1) // 2 + c1] = 1.0
  return (o0, c0, m0), (o1, c1, m1), valid


def _val_planes(n: int, stride: int) -> list[int]:
  return list(range(min(stride // 2, n - 1), n, stride))


def _val_plane_lists(ds: store.Dataset, infos: Sequence[_ScanInfo], axes: Sequence[int],
                     stride: int) -> list[dict[int, list[int]]]:
  """Per scan, {axis: the validation planes}: every `stride`-th plane; with sparse labels,
  every `stride`-th of the planes holding labelled voxels (refusing a split without any)."""
  if ds.unlabelled is None:
    return [{a: _val_planes(s.shape[a], stride) for a in axes if a in (0, 1, 2)} for s in infos]
  maps = []
  for s in infos:
    if s.scan.labels is None:
      raise errors.UserError(f"validation scan {s.name!r} has no labels")
    try:
      maps.append(label_map(s.scan.labels, ds.num_classes, ds.unlabelled))
    except Exception as e:  # pylint: disable=broad-except  (bad values, damaged chunks)
      text = errors.one_line(str(e).split(" [tensorstore_spec=")[0])[:300]
      raise errors.UserError(f"validation scan {s.name!r} ({s.scan.path}): {text}") from None
  check_labelled([m.counts for m in maps], [s.name for s in infos], ds.classes, "validation")
  out = []
  for m in maps:
    lists = {}
    for a in axes:
      if a in (0, 1, 2):
        planes = m.planes(a)
        lists[a] = [int(planes[i]) for i in _val_planes(len(planes), stride)] if len(planes) else []
    out.append(lists)
  return out


def validation_batches(dataset_path, scans: Sequence[str], *, crop: int | None = None,
                       axes: Sequence[int] = (0,), batch_size: int = 8, stride: int = 1,
                       normalization: str = "percentile", num_threads: int = 8,
                       context_slices: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """A fixed, cheap validation set: every `stride`-th plane of each scan, in a fixed order.

  Yields dict(image float32 (B, H, W, C), label int32 (B, H, W), mask float32 (B, H, W)),
  C = 2 * context_slices + 1: a 2.5D example's context planes as channels (`context_planes`).
  Whole planes, or their centre `crop` x `crop` (as the Scaling paper's centre crop), padded
  to a multiple of 32 so every U-net level divides; padded pixels have mask 0 (image mirrored,
  label 0). The last batch of each (scan, axis) is filled up with mask-0 examples, so each
  (scan, axis) has one batch shape and the eval step compiles once per shape. A label value
  without a class is refused, naming the scan.
  """
  _check_rule(normalization)
  stride, batch_size = max(1, int(stride)), int(batch_size)
  if batch_size < 1:
    raise errors.UserError(f"validation batch_size={batch_size} must be positive")
  ds, infos = _open_training_scans(dataset_path, scans, normalization)
  k = int(context_slices)
  for s in infos:
    if s.scan.labels is None:
      raise errors.UserError(f"validation scan {s.name!r} has no labels")
  for axis in axes:
    if axis not in (0, 1, 2):
      raise errors.UserError(f"validation axis {axis} is not 0, 1 or 2")
  plane_lists = _val_plane_lists(ds, infos, axes, stride)
  unlabelled = ds.unlabelled
  pool = concurrent.futures.ThreadPoolExecutor(max(1, int(num_threads)), "val-read")
  try:
    for s, lists in zip(infos, plane_lists):
      for axis in axes:
        d0, d1 = _plane_dims(axis)
        (o0, c0, m0), (o1, c1, m1), valid = _val_geometry(s.shape, axis, crop)
        h, w = valid.shape
        planes = lists[axis]
        for b0 in range(0, len(planes), batch_size):
          chunk = planes[b0:b0 + batch_size]
          image = np.zeros((batch_size, h, w, 2 * k + 1), np.float32)
          label = np.zeros((batch_size, h, w), np.int32)
          mask = np.zeros((batch_size, h, w), np.float32)
          futures, context = [], []
          for p in chunk:
            starts, sizes = [0, 0, 0], [0, 0, 0]
            starts[d0], sizes[d0], starts[d1], sizes[d1] = o0, c0, o1, c1
            around = context_planes(p, s.shape[axis], k)
            lo = int(around.min())
            context.append(around - lo)
            starts[axis], sizes[axis] = p, 1
            lab_future = store.read_box(s.scan.labels, starts, sizes)
            starts[axis], sizes[axis] = lo, int(around.max()) - lo + 1
            futures.append((store.read_box(s.scan.image, starts, sizes), lab_future))

          def finish(i, s=s, axis=axis, futures=futures, context=context, m0=m0, m1=m1,
                     valid=valid, image=image, label=label, mask=mask):
            img = np.moveaxis(np.take(_read(futures[i][0], s, "image"), context[i], axis), axis,
                              -1)
            lab = _read(futures[i][1], s, "labels").squeeze(axis)
            check_labels(lab, s, ds.classes, unlabelled)
            lab = lab[m0][:, m1]
            known = valid if unlabelled is None else valid * (lab != unlabelled)
            image[i] = intensity.normalize(img[m0][:, m1], s.norm, normalization)
            label[i] = lab * (known > 0)
            mask[i] = known

          list(pool.map(finish, range(len(chunk))))
          yield {"image": image, "label": label, "mask": mask}
  finally:
    pool.shutdown(wait=True)


def num_validation_batches(dataset_path, scans: Sequence[str], *, axes: Sequence[int] = (0,),
                           batch_size: int = 8, stride: int = 1) -> int:
  """How many batches validation_batches yields (for progress bars)."""
  ds, infos = _open_training_scans(dataset_path, scans)
  lists = _val_plane_lists(ds, infos, axes, max(1, int(stride)))
  return sum(-(-len(pl[a]) // batch_size) for pl in lists for a in axes)


def validation_nbytes(dataset_path, scans: Sequence[str], *, crop: int | None = None,
                      axes: Sequence[int] = (0,), batch_size: int = 8, stride: int = 1,
                      context_slices: int = 0) -> int:
  """Bytes of everything validation_batches yields (image, label and mask: 12 B per pixel,
  4 B more per context plane)."""
  ds, infos = _open_training_scans(dataset_path, scans)
  lists, total = _val_plane_lists(ds, infos, axes, max(1, int(stride))), 0
  for s, pl in zip(infos, lists):
    for a in axes:
      h, w = _val_geometry(s.shape, a, crop)[2].shape
      total += (-(-len(pl[a]) // batch_size) * batch_size * h * w *
                (12 + 8 * int(context_slices)))
  return total
