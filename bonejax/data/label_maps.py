"""Where a training scan's labels are: rare-class planes and, for sparse labels, the labelled
planes and in-plane cells that patch crops are placed over (see patches.py's docstring)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from bonejax.core import errors
from bonejax.data import store


def class_projections(labels: store.ts.TensorStore, num_classes: int, slab: int = 64,
                      unlabelled: int | None = None):
  """Per-class voxel counts and the three axis-pair projections of each class's mask
  (labelled voxels only: `unlabelled` voxels count for no class).

  Returns (counts (C,), zy (C, Z, Y), zx (C, Z, X), yx (C, Y, X)) as booleans "class c occurs
  somewhere along the remaining axis". From these, the planes along any axis that hold a class
  and the class's bounding box inside each plane follow without keeping the volume: one
  slab-wise pass, memory C * (ZY + ZX + YX) bits.
  """
  z, y, x = (int(s) for s in labels.shape)
  counts = np.zeros(num_classes, np.int64)
  zy = np.zeros((num_classes, z, y), bool)
  zx = np.zeros((num_classes, z, x), bool)
  yx = np.zeros((num_classes, y, x), bool)
  for z0 in range(0, z, slab):
    lab = store.read_slab(labels, 0, z0, min(z, z0 + slab))
    slab_counts = np.bincount(lab.reshape(-1), minlength=num_classes)
    if unlabelled is not None and unlabelled < slab_counts.size:
      slab_counts[unlabelled] = 0
    if slab_counts.size > num_classes and slab_counts[num_classes:].any():
      raise ValueError(f"label value {int(lab.max())} >= the {num_classes} classes")
    counts += slab_counts[:num_classes]
    for c in np.flatnonzero(slab_counts[:num_classes]):
      m = lab == c
      zy[c, z0:z0 + lab.shape[0]] = m.any(2)
      zx[c, z0:z0 + lab.shape[0]] = m.any(1)
      yx[c] |= m.any(0)
  return counts, zy, zx, yx


def pick_rare_classes(counts: np.ndarray) -> list[int]:
  """Classes present at under half the mean share of the present classes; else the rarest."""
  present = np.flatnonzero(counts > 0)
  if present.size == 0:
    return []
  mean = counts[present].sum() / present.size
  rare = [int(c) for c in present if counts[c] < 0.5 * mean]
  return rare or [int(present[np.argmin(counts[present])])]


def _first_last(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """For each row of a 2D bool array: any, first True, last True."""
  anyv = m.any(1)
  first = np.argmax(m, 1)
  last = m.shape[1] - 1 - np.argmax(m[:, ::-1], 1)
  return anyv, first, last


def _rare_planes_of_scan(zy, zx, yx, axes) -> list[tuple[int, int, int, int, int, int]]:
  """(axis, plane, row0, row1, col0, col1) for every plane holding a rare voxel."""
  out = []
  # Rows/cols of a plane along `axis` index its two remaining dims in order (see _plane_dims).
  sources = {0: (zy, zx), 1: (zy.T, yx), 2: (zx.T, yx.T)}
  for a in axes:
    rows_m, cols_m = sources[a]
    has_r, r0, r1 = _first_last(rows_m)
    _, c0, c1 = _first_last(cols_m)
    for p in np.flatnonzero(has_r):
      out.append((a, int(p), int(r0[p]), int(r1[p]), int(c0[p]), int(c1[p])))
  return out


# ---------------------------------------------------------------------------------------------
# Sparse labels: where the labelled voxels are.
# ---------------------------------------------------------------------------------------------

LABEL_BLOCK = 16  # side of the in-plane cells that locate labelled voxels (capped by the patch)


@dataclasses.dataclass
class LabelMap:
  """Where a scan's labelled voxels are, at `block` resolution within each plane.

  counts: labelled voxels per class (C,); unlabelled: voxels with the unlabelled value;
  occupancy[a]: bool (n_a, rows / block, cols / block) (rounded up), "plane p along axis a has
  a labelled voxel in cell (i, j)"; memory 3 N / block^2 bits for N voxels.
  """
  counts: np.ndarray
  unlabelled: int
  block: int
  occupancy: tuple[np.ndarray, np.ndarray, np.ndarray]

  def planes(self, axis: int) -> np.ndarray:
    """The planes along `axis` holding a labelled voxel."""
    return np.flatnonzero(self.occupancy[axis].any((1, 2)))


def _cells(known: np.ndarray, b: int, keep: tuple[int, ...]) -> np.ndarray:
  """any() of `known` (z, y, x) over b-blocks of the axes not in `keep` (padded up to b)."""
  pads = [(0, 0 if d in keep else -known.shape[d] % b) for d in range(3)]
  k = np.pad(known, pads)
  shape, red = [], []
  for d in range(3):
    if d in keep:
      shape.append(k.shape[d])
    else:
      shape += [k.shape[d] // b, b]
      red.append(len(shape) - 1)
  return k.reshape(shape).any(tuple(red))


def label_map(labels: store.ts.TensorStore, num_classes: int, unlabelled: int | None,
              block: int = LABEL_BLOCK) -> LabelMap:
  """One slab-wise pass over a scan's labels: class counts and the labelled cells per plane.

  Raises ValueError for a value that is neither a class nor `unlabelled`.
  """
  z, y, x = (int(v) for v in labels.shape)
  b = max(1, int(block))
  cdiv = lambda n: -(-n // b)  # noqa: E731
  occ = (np.zeros((z, cdiv(y), cdiv(x)), bool), np.zeros((y, cdiv(z), cdiv(x)), bool),
         np.zeros((x, cdiv(z), cdiv(y)), bool))
  counts = np.zeros(num_classes, np.int64)
  n_unlabelled = 0
  slab = max(b, 64 // b * b)  # a multiple of the block: cells along z never straddle slabs
  for z0 in range(0, z, slab):
    lab = store.read_slab(labels, 0, z0, min(z, z0 + slab))
    c = np.bincount(lab.reshape(-1), minlength=max(num_classes, 256))
    if unlabelled is not None:
      n_unlabelled += int(c[unlabelled])
      c[unlabelled] = 0
    if c[num_classes:].any():
      raise ValueError(f"label value {int(np.flatnonzero(c)[-1])} >= the {num_classes} classes")
    counts += c[:num_classes]
    known = lab != unlabelled if unlabelled is not None else np.ones(lab.shape, bool)
    zb = z0 // b
    occ[0][z0:z0 + lab.shape[0]] = _cells(known, b, (0,))
    occ[1][:, zb:zb + cdiv(lab.shape[0])] = _cells(known, b, (1,)).transpose(1, 0, 2)
    occ[2][:, zb:zb + cdiv(lab.shape[0])] = _cells(known, b, (2,)).transpose(2, 0, 1)
  return LabelMap(counts, n_unlabelled, b, occ)


def class_counts(labels: store.ts.TensorStore, num_classes: int, slab: int = 64) -> np.ndarray:
  """Voxels of each class in a fully labelled volume, in one slab-wise pass (values beyond the
  classes are left to `patches.check_labels`, which names them)."""
  z = int(labels.shape[0])
  counts = np.zeros(num_classes, np.int64)
  for z0 in range(0, z, slab):
    lab = store.read_slab(labels, 0, z0, min(z, z0 + slab))
    counts += np.bincount(lab.reshape(-1), minlength=num_classes)[:num_classes]
  return counts


def check_labelled(counts_per_scan: Sequence[np.ndarray], names: Sequence[str],
                   classes: Sequence[str], split: str) -> None:
  """Bad input before training: a split with no labelled voxel, or a class none of it labels
  (`counts_per_scan`: each scan's labelled voxels per class, `LabelMap.counts`)."""
  counts = sum(counts_per_scan)
  if not counts.sum():
    raise errors.UserError(f"the {split} scans ({', '.join(names)}) have no labelled voxel "
                           "(every label is the dataset's unlabelled value)")
  missing = [classes[c] for c in np.flatnonzero(counts == 0)]
  if missing:
    raise errors.UserError(f"class{'es' if len(missing) > 1 else ''} {', '.join(missing)} "
                           f"{'have' if len(missing) > 1 else 'has'} no labelled voxel in the "
                           f"{split} scans ({', '.join(names)})")


