"""Synthetic micro-CT phantoms: the embedded default dataset that trains and tests everything.

Two kinds (class names in CLASSES):
- "bone": a long-bone shaft (cortex with canals, trabecular metaphysis, marrow); background /
  bone / pore, where pore and background share one grey value (bone.py);
- "implant": a corroding threaded Mg screw in new bone; background / bone / degradation layer /
  residual material (implant.py).
ct.py then gives them the look of a scan. Labels are defined on the clean geometry.

Scan `index` of a dataset with `seed` draws from its own random stream (seed, kind, index), so
it is the same whatever the number of scans generated. Every scan has exactly the requested
shape; its size, porosity, noise and contrast vary from scan to scan.

    image, labels, attrs = make_scan("bone", (96, 128, 128), seed=0, index=3)
    ds = make_dataset("/tmp/ph", num_scans=4, shape=(96, 128, 128), seed=0)
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bonejax.core import errors, jsonable, memory_plan, outputs
from bonejax.core.progress import Progress
from bonejax.data import store
from bonejax.phantom import bone, ct, implant

_GENERATORS = {"bone": bone, "implant": implant}
KINDS = tuple(_GENERATORS)
CLASSES = {kind: list(mod.CLASSES) for kind, mod in _GENERATORS.items()}
MIN_SIDE = 32
_KIND_STREAM = {"bone": 1, "implant": 2}  # part of the seed, so kinds never share streams
# Peak host memory while one scan is generated, per voxel: float fields, distance maps and the
# rendered image (measured with tracemalloc: 84-93 B/voxel for both kinds, 32^3 to 96x128^2).
PEAK_BYTES_PER_VOXEL = 100


def _gib(n: float) -> str:
  return f"{n / 2**30:,.1f} GiB"


def check_memory(shape: Sequence[int], kind: str = "bone") -> None:
  """Refuses up front a scan that could not be generated in this machine's memory."""
  need = math.prod(int(s) for s in shape) * PEAK_BYTES_PER_VOXEL
  avail = memory_plan.available_bytes()[0]  # RAM, cgroup v1/v2 and ulimit -v
  if avail is not None and need > avail:
    raise errors.UserError(f"shape {tuple(int(s) for s in shape)}: generating one {kind} phantom "
                        f"scan needs about {_gib(need)} of memory, but only {_gib(avail)} is "
                        f"available; choose a smaller shape")


def check_args(kind: str, shape: Sequence[int], num_scans: int = 1,
               seed: int = 0) -> tuple[int, int, int]:
  """Validates the generator's arguments; errors.UserError names what is wrong."""
  if kind not in _GENERATORS:
    raise errors.UserError(f"unknown phantom kind {kind!r} (known: {', '.join(KINDS)})")
  try:
    shape = tuple(int(s) for s in shape)
  except (TypeError, ValueError):
    raise errors.UserError(f"shape {shape!r} is not 3 integers (Z, Y, X)") from None
  if len(shape) != 3:
    raise errors.UserError(f"shape {shape} must have 3 sides (Z, Y, X)")
  if min(shape) < MIN_SIDE:
    raise errors.UserError(f"shape {shape}: every side must be >= {MIN_SIDE} voxels")
  if int(num_scans) < 1:
    raise errors.UserError(f"num_scans must be >= 1, got {num_scans}")
  if not isinstance(seed, (int, np.integer)) or int(seed) < 0:
    raise errors.UserError(f"seed must be a non-negative integer, got {seed!r}")
  return shape


def make_scan(kind: str, shape: Sequence[int], seed: int,
              index: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """One phantom scan: (image uint16 (Z, Y, X), labels uint8, attrs)."""
  shape = check_args(kind, shape, seed=seed)
  seq = np.random.SeedSequence([int(seed), _KIND_STREAM[kind], int(index)])
  # Separate streams for geometry and scanner: changing one never reshuffles the other.
  geom_rng, ct_rng = (np.random.default_rng(s) for s in seq.spawn(2))
  labels, mu, params, geom = _GENERATORS[kind].generate(geom_rng, shape)
  ct_params = ct.sample_params(ct_rng, kind)
  image = ct.render(mu, geom, ct_params, ct_rng)
  attrs = {
      "voxel_size_um": ct_params.pop("voxel_size_um"),
      "source": "phantom",
      "kind": kind,
      "seed": int(seed),
      "index": int(index),
      "classes": CLASSES[kind],
      "params": jsonable.to_jsonable({"geometry": params, "ct": ct_params}),
  }
  return image, labels, attrs


def scan_name(index: int) -> str:
  return f"scan_{index:03d}"


def make_dataset(path: str | os.PathLike, *, num_scans: int, shape: Sequence[int], seed: int,
                 kind: str = "bone", overwrite: bool = False, progress: bool = True,
                 chunks: Sequence[int] = store.DEFAULT_CHUNKS) -> store.Dataset:
  """Writes DATA/dataset.json and DATA/scan_000... atomically (all of it, or nothing)."""
  shape = check_args(kind, shape, num_scans, seed)
  check_memory(shape, kind)
  classes = CLASSES[kind]
  names = [scan_name(i) for i in range(int(num_scans))]
  bar = Progress(total=len(names), desc=f"phantom {kind}", unit="scans", every_s=0.0,
                     stream=None) if progress else None
  with outputs.atomic_output(path, overwrite) as tmp:
    tmp.mkdir(parents=True)
    for i, name in enumerate(names):
      t0 = time.perf_counter()
      image, labels, attrs = make_scan(kind, shape, seed, i)
      store.write_scan(tmp / name, image, labels, attrs, chunks=chunks, num_classes=len(classes))
      if bar:
        bar.update(1, extra=f"{name} {time.perf_counter() - t0:.1f}s")
    store.write_dataset_json(tmp, classes, names)
  if bar:
    bar.close()
  return store.open_dataset(Path(path))
