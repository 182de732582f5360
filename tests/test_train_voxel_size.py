"""The bundle records the voxel size its training scans share (predict.py resamples to it)."""

import numpy as np

from bonejax.data import store
from bonejax.train import trainer


def _dataset(tmp_path, sizes):
  names = []
  for i, size in enumerate(sizes):
    name = f"scan_{i:03d}"
    attrs = {} if size is None else (
        {"voxel_size_um": size} if np.isscalar(size) else
        {"voxel_size_um": size[2], "voxel_size_zyx_um": list(size)})
    store.write_scan(tmp_path / name, np.zeros((4, 4, 4), np.uint8), attrs=attrs)
    names.append(name)
  store.write_dataset_json(tmp_path, ["background", "bone"], names)
  return store.open_dataset(tmp_path), names


def test_shared_isotropic_and_anisotropic_sizes(tmp_path):
  ds, names = _dataset(tmp_path / "iso", [5.0, 5.0])
  assert trainer.training_voxel_size(ds, names) == [5.0, 5.0, 5.0]
  ds, names = _dataset(tmp_path / "aniso", [(10.0, 5.0, 5.0), (10.0, 5.0, 5.0)])
  assert trainer.training_voxel_size(ds, names) == [10.0, 5.0, 5.0]


def test_differing_or_unknown_sizes_record_none(tmp_path, capsys):
  ds, names = _dataset(tmp_path / "mixed", [5.0, 9.0])
  assert trainer.training_voxel_size(ds, names) is None
  assert "different voxel sizes" in capsys.readouterr().err
  ds, names = _dataset(tmp_path / "unknown", [5.0, None])
  assert trainer.training_voxel_size(ds, names) is None
