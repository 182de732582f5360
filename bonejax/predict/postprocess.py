"""Clean-up of a predicted label volume: small islands, all but the largest component, holes.

Rules run in the order given, each on the result of the one before:
- `min_size`: components of a class smaller than N voxels (or a volume in um^3) are removed;
- `largest`: every component of a class but the largest is removed;
- `fill_holes`: regions of other classes that the class encloses (not touching the volume's
  faces) become the class.
A removed component takes the label most common among its face neighbours outside it (a stray
bone speck in a pore becomes pore, not background); a component with no such neighbour (the
whole volume) is kept.

Connectivity: a class's components are 26-connected (scikit-image's and BoneJ's default for
foreground); the regions tested as holes are 6-connected, the topological complement, so a hole
is never closed through a diagonal gap in the class.

Out of core: the volume is read in slabs of whole Z planes sized from a memory budget, labelled
slab by slab with scipy.ndimage.label, and components that meet across a slab face are merged
with a union-find over global ids (26-connected pairs across the face: 9 offsets). A second
pass relabels each slab the same way (labelling is deterministic) and writes it. Memory is one
slab (and its labelling, int64) plus per-component tables (size, neighbour counts per class,
border flag): O(slab voxels + components x classes), whatever the volume size.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import numpy as np
import tensorstore as ts
from scipy import ndimage

from bonejax.core import errors

OPS = ("min_size", "largest", "fill_holes")
_FULL = ndimage.generate_binary_structure(3, 3)   # 26-connected
_FACE = ndimage.generate_binary_structure(3, 1)   # 6-connected
# Bytes of work per voxel of a slab: labels in, int64 ids, masks and temporaries of the pair
# counting (measured with tracemalloc in tests/test_postprocess.py, rounded up).
_BYTES_PER_VOXEL = 48


@dataclasses.dataclass(frozen=True)
class Rule:
  op: str
  cls: int
  min_voxels: int = 0

  def describe(self, classes: Sequence[str] | None = None) -> str:
    name = classes[self.cls] if classes and self.cls < len(classes) else str(self.cls)
    return f"{name}:{self.op}" + (f"={self.min_voxels}" if self.op == "min_size" else "")


def parse_rules(text: str, classes: Sequence[str], voxel_size_um: Sequence[float] | None = None
                ) -> list[Rule]:
  """'bone:min_size=500,pore:fill_holes,1:largest,bone:min_size=2e5um3' -> rules.

  A class is named or numbered; a size ending in um3 is a volume, turned into voxels with the
  voxel size (Z, Y, X).
  """
  rules = []
  for item in (t.strip() for t in str(text).split(",")):
    if not item:
      continue
    m = re.fullmatch(r"([^:=]+):(\w+)(?:=([0-9.eE+]+)(um3)?)?", item)
    if not m:
      raise errors.UserError(f"--postprocess: {item!r} is not CLASS:OP[=SIZE] "
                             f"(OP one of {', '.join(OPS)})")
    name, op, size, um3 = m.groups()
    if op not in OPS:
      raise errors.UserError(f"--postprocess: unknown operation {op!r} in {item!r} "
                             f"(one of {', '.join(OPS)})")
    cls = _class_index(name.strip(), classes, item)
    if cls == 0 and op != "min_size":
      raise errors.UserError(f"--postprocess: {item!r} acts on the background class")
    voxels = 0
    if op == "min_size":
      if size is None:
        raise errors.UserError(f"--postprocess: {item!r} needs a size (min_size=N or =Vum3)")
      value = float(size)
      if um3:
        if not voxel_size_um or not all(v > 0 and math.isfinite(v) for v in voxel_size_um):
          raise errors.UserError(f"--postprocess: {item!r} needs a known voxel size")
        value /= math.prod(voxel_size_um)
      if not math.isfinite(value) or value < 0:
        raise errors.UserError(f"--postprocess: size in {item!r} must be >= 0")
      voxels = int(math.ceil(value))
    elif size is not None:
      raise errors.UserError(f"--postprocess: {op} takes no size ({item!r})")
    rules.append(Rule(op, cls, voxels))
  if not rules:
    raise errors.UserError("--postprocess: no rule given")
  return rules


def _class_index(name: str, classes: Sequence[str], item: str) -> int:
  if name.isdigit():
    cls = int(name)
  elif name in classes:
    cls = list(classes).index(name)
  else:
    raise errors.UserError(f"--postprocess: unknown class {name!r} in {item!r} "
                           f"(classes: {', '.join(classes)})")
  if cls >= len(classes):
    raise errors.UserError(f"--postprocess: class {cls} in {item!r} is not below the "
                           f"{len(classes)} classes")
  return cls


class _UnionFind:
  """Union-find over global component ids (0 unused), arrays grown as slabs add ids."""

  def __init__(self):
    self.parent = np.zeros(1, np.int64)

  def grow(self, n: int) -> None:
    old = len(self.parent)
    if n + 1 > old:
      self.parent = np.concatenate([self.parent, np.arange(old, n + 1, dtype=np.int64)])

  def find(self, a: int) -> int:
    p = self.parent
    root = a
    while p[root] != root:
      root = p[root]
    while p[a] != root:
      p[a], a = root, p[a]
    return root

  def union_pairs(self, pairs: np.ndarray) -> None:
    for a, b in pairs:
      ra, rb = self.find(int(a)), self.find(int(b))
      if ra != rb:
        self.parent[max(ra, rb)] = min(ra, rb)

  def roots(self) -> np.ndarray:
    """The root of every id, vectorised (pointer jumping until nothing changes)."""
    p = self.parent.copy()
    while True:
      q = p[p]
      if np.array_equal(q, p):
        return p
      p = q


class _Volume:
  """Z slabs of a numpy array or a tensorstore."""

  def __init__(self, arr: Any):
    self.arr = arr
    self.on_disk = isinstance(arr, ts.TensorStore)
    self.shape = tuple(int(s) for s in arr.shape)

  def read(self, z0: int, z1: int) -> np.ndarray:
    if self.on_disk:
      return np.asarray(self.arr[z0:z1].read().result())
    return np.asarray(self.arr[z0:z1])

  def write(self, z0: int, data: np.ndarray) -> None:
    if self.on_disk:
      self.arr[z0:z0 + len(data)].write(data).result()
    else:
      self.arr[z0:z0 + len(data)] = data


def slab_planes(shape: Sequence[int], budget_bytes: int) -> int:
  """Z planes per slab that keep the work near `budget_bytes`."""
  plane = int(shape[1]) * int(shape[2]) * _BYTES_PER_VOXEL
  return max(1, min(int(shape[0]), budget_bytes // max(plane, 1)))


def _face_pairs(prev_ids: np.ndarray, cur_ids: np.ndarray) -> np.ndarray:
  """Unique (a, b) id pairs 26-connected across a face between two planes (0 = not a member)."""
  h, w = prev_ids.shape
  found = []
  for dy in (-1, 0, 1):
    for dx in (-1, 0, 1):
      a = prev_ids[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
      b = cur_ids[max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
      both = (a > 0) & (b > 0)
      if both.any():
        found.append(np.stack([a[both], b[both]], axis=1))
  if not found:
    return np.zeros((0, 2), np.int64)
  return np.unique(np.concatenate(found), axis=0)


def _neighbour_counts(ids: np.ndarray, labels: np.ndarray, halo: np.ndarray | None,
                      halo_ids: np.ndarray | None, cls: int, n_ids: int, k: int
                      ) -> np.ndarray:
  """(n_ids + 1, k): per component, how many face neighbours outside it carry each label.

  Within the slab along Z, Y and X, and across the face to the previous slab's last plane
  (`halo`, with `halo_ids`), both ways, so every face between two voxels counts once.
  """
  counts = np.zeros((n_ids + 1) * k, np.int64)

  def add(member_ids: np.ndarray, other_labels: np.ndarray) -> None:
    sel = (member_ids > 0) & (other_labels != cls)
    if sel.any():
      counts[:] += np.bincount(member_ids[sel] * k + other_labels[sel].astype(np.int64),
                               minlength=counts.size)

  for axis in range(3):
    n = ids.shape[axis]
    if n < 2:
      continue
    lo = [slice(None)] * 3
    hi = [slice(None)] * 3
    lo[axis], hi[axis] = slice(0, n - 1), slice(1, n)
    add(ids[tuple(lo)], labels[tuple(hi)])
    add(ids[tuple(hi)], labels[tuple(lo)])
  if halo is not None:
    add(ids[0], halo)
    add(halo_ids, labels[0])
  return counts.reshape(n_ids + 1, k)


@dataclasses.dataclass
class _Components:
  offsets: list[int]          # global id offset of each slab
  roots: np.ndarray           # global id -> root id
  size: np.ndarray            # per root
  border: np.ndarray          # per root: touches a face of the volume
  neighbours: np.ndarray      # per root: (k,) neighbour label counts


def _components(vol: _Volume, mask_of, structure, slab: int, k: int, cls_for_counts: int,
                progress=None) -> _Components:
  """Pass 1: label every slab, merge across faces, sum sizes / borders / neighbour counts."""
  z_total = vol.shape[0]
  uf = _UnionFind()
  offsets: list[int] = []
  sizes = [np.zeros(1, np.int64)]
  borders = [np.zeros(1, bool)]
  neigh = np.zeros((1, k), np.int64)
  total = 0
  prev_labels = prev_ids = None
  for z0 in range(0, z_total, slab):
    z1 = min(z_total, z0 + slab)
    labels = vol.read(z0, z1)
    ids, n = ndimage.label(mask_of(labels), structure=structure)
    ids = ids.astype(np.int64)
    ids[ids > 0] += total
    offsets.append(total)
    uf.grow(total + n)
    sizes.append(np.bincount(ids.ravel(), minlength=total + n + 1)[total + 1:])
    edge = np.zeros(n, bool)
    faces = [ids[:, 0], ids[:, -1], ids[:, :, 0], ids[:, :, -1]]
    if z0 == 0:
      faces.append(ids[0])
    if z1 == z_total:
      faces.append(ids[-1])
    for f in faces:
      f = f[f > 0]
      edge[f - total - 1] = True
    borders.append(edge)
    counts = _neighbour_counts(ids, labels, prev_labels, prev_ids, cls_for_counts,
                               total + n, k)
    grown = np.zeros((total + n + 1, k), np.int64)
    grown[:len(neigh)] = neigh
    neigh = grown + counts  # rows of earlier slabs' ids gain what the halo face adds
    if prev_ids is not None:
      pairs = (_face_pairs if structure is _FULL else _straight_pairs)(prev_ids, ids[0])
      uf.union_pairs(pairs)
    prev_labels, prev_ids = labels[-1].copy(), ids[-1].copy()
    total += n
    if progress is not None:
      progress(z1)
  roots = uf.roots()
  size = np.bincount(roots, weights=np.concatenate(sizes), minlength=total + 1).astype(np.int64)
  border = np.bincount(roots, weights=np.concatenate(borders), minlength=total + 1) > 0
  root_nb = np.zeros_like(neigh)
  np.add.at(root_nb, roots, neigh)
  return _Components(offsets, roots, size, border, root_nb)


def _straight_pairs(prev_ids: np.ndarray, cur_ids: np.ndarray) -> np.ndarray:
  both = (prev_ids > 0) & (cur_ids > 0)
  if not both.any():
    return np.zeros((0, 2), np.int64)
  return np.unique(np.stack([prev_ids[both], cur_ids[both]], axis=1), axis=0)


def _apply(vol: _Volume, out: _Volume, rule: Rule, k: int, slab: int, progress=None) -> dict:
  """Two passes of one rule from `vol` into `out` (which may be `vol`: each slab is read in
  pass 2 before it is written, and pass 2 reads nothing written before)."""
  if rule.op == "fill_holes":
    mask_of = lambda lab: lab != rule.cls  # noqa: E731
    structure = _FACE
  else:
    mask_of = lambda lab: lab == rule.cls  # noqa: E731
    structure = _FULL
  comp = _components(vol, mask_of, structure, slab, k, rule.cls, progress)
  is_root = comp.roots == np.arange(len(comp.roots))
  is_root[0] = False
  replacement = np.full(len(comp.roots), -1, np.int64)  # per root: new label, -1 = keep
  if rule.op == "fill_holes":
    holes = is_root & ~comp.border
    replacement[holes] = rule.cls
  else:
    nb = comp.neighbours.copy()
    nb[:, rule.cls] = 0
    has_nb = nb.sum(axis=1) > 0
    target = np.argmax(nb, axis=1)
    if rule.op == "min_size":
      drop = is_root & (comp.size < rule.min_voxels)
    else:  # largest: every root but the one of greatest size (the first on ties)
      drop = is_root.copy()
      if is_root.any():
        drop[int(np.argmax(np.where(is_root, comp.size, -1)))] = False
    drop &= has_nb
    replacement[drop] = target[drop]
  changed_components = int((replacement[is_root] >= 0).sum())
  changed_voxels = int(comp.size[replacement >= 0].sum())
  z_total = vol.shape[0]
  for i, z0 in enumerate(range(0, z_total, slab)):
    z1 = min(z_total, z0 + slab)
    labels = vol.read(z0, z1)
    if changed_components:
      ids, _ = ndimage.label(mask_of(labels), structure=structure)
      ids = ids.astype(np.int64)
      ids[ids > 0] += comp.offsets[i]
      new = replacement[comp.roots[ids]]
      sel = (ids > 0) & (new >= 0)
      labels = labels.copy()
      labels[sel] = new[sel].astype(labels.dtype)
    if out is not vol or changed_components:
      out.write(z0, labels)
  return {"rule": rule.describe(), "components": changed_components, "voxels": changed_voxels}


def postprocess(labels: Any, rules: Sequence[Rule], num_classes: int, *,
                out: Any = None, budget_bytes: int = 1 << 30) -> list[dict]:
  """Applies `rules` to a (Z, Y, X) label volume, a numpy array or a tensorstore.

  Writes into `out` (same kind and shape; default: in place) and returns, per rule, how many
  components and voxels it changed. Memory stays near `budget_bytes` for any volume size.
  """
  vol = _Volume(labels)
  if len(vol.shape) != 3:
    raise errors.UserError(f"post-processing needs a (Z, Y, X) label volume, got {vol.shape}")
  target = vol if out is None else _Volume(out)
  if target.shape != vol.shape:
    raise errors.UserError(f"post-processing output shape {target.shape} is not the "
                           f"input's {vol.shape}")
  for r in rules:
    if not 0 <= r.cls < num_classes:
      raise errors.UserError(f"post-processing class {r.cls} is not below {num_classes}")
  slab = slab_planes(vol.shape, budget_bytes)
  done = []
  src = vol
  for rule in rules:
    done.append(_apply(src, target, rule, num_classes, slab))
    src = target
  return done
