"""The reader registry: each input goes to the reader that declares it (suffix, magic bytes or
folder), a new reader is one list entry, and no io module imports another's private names."""

import ast
from pathlib import Path

import numpy as np
import pytest
import tifffile

from bonejax.core import errors
from bonejax.data import store
from bonejax.io import hdf5, isq, npy, ome_zarr, registry, slices, source, tiff, zarr

IO = Path(__file__).resolve().parent.parent / "bonejax" / "io"


def test_files_by_suffix_then_magic(tmp_path):
  vol = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
  np.save(tmp_path / "v.npy", vol)
  tifffile.imwrite(tmp_path / "v.tif", vol)
  (tmp_path / "v.npy").rename(tmp_path / "v.data")  # no suffix any reader knows: magic bytes
  (tmp_path / "v.tif").rename(tmp_path / "t.raw")
  (tmp_path / "h.h5").write_bytes(hdf5.HDF5_MAGIC + bytes(8))
  (tmp_path / "s.bin").write_bytes(isq.ISQ_MAGIC + bytes(8))
  assert registry.reader_for(tmp_path / "v.data") is npy.NpySource
  assert registry.reader_for(tmp_path / "t.raw") is tiff.TiffSource
  assert registry.reader_for(tmp_path / "h.h5") is hdf5.H5Source
  assert registry.reader_for(tmp_path / "s.bin") is isq.IsqSource
  with registry.open_volume(tmp_path / "v.data") as src:
    np.testing.assert_array_equal(src.read_slab(0, 2), vol)
  with registry.open_volume(tmp_path / "t.raw") as src:
    np.testing.assert_array_equal(src.read_slab(0, 2), vol)
  (tmp_path / "x.txt").write_text("hello")
  with pytest.raises(errors.UserError, match="unsupported input"):
    registry.open_volume(tmp_path / "x.txt")


def test_folders_by_claim(tmp_path):
  vol = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
  store.create_array(tmp_path / "a.zarr", vol.shape, vol.dtype)
  ome_zarr.write_volume(vol, tmp_path / "o.ome.zarr", kind="image")
  (tmp_path / "pngs").mkdir()
  import imageio.v3 as iio
  for z in range(2):
    iio.imwrite(tmp_path / "pngs" / f"s{z}.png", vol[z])
  (tmp_path / "empty").mkdir()
  assert registry.reader_for(tmp_path / "a.zarr") is zarr.ZarrSource
  assert registry.reader_for(tmp_path / "o.ome.zarr") is ome_zarr.OmeZarrSource
  assert registry.reader_for(tmp_path / "pngs") is slices.ImageFolderSource
  assert registry.reader_for(tmp_path / "empty") is slices.TiffFolderSource
  with pytest.raises(errors.UserError, match="contains no .tif/.tiff slices"):
    registry.open_volume(tmp_path / "empty")


def test_every_reader_declares_what_it_reads():
  for reader in registry.READERS:
    assert issubclass(reader, source.VolumeSource)
    folder = reader.claims_folder is not source.VolumeSource.claims_folder
    assert folder or reader.suffixes or reader.magic, reader
  assert registry.output_format("a.ome.zarr") == "ome-zarr"
  assert registry.output_format("a.TIF") == "tiff" and registry.output_format("a.zarr") == "zarr"
  assert registry.output_format("a.png") is None


def test_no_io_module_reaches_into_another_s_private_names():
  for f in IO.glob("*.py"):
    tree = ast.parse(f.read_text())
    modules = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
               and n.module in ("bonejax.io", "bonejax.data", "bonejax.core") for a in n.names}
    for n in ast.walk(tree):
      if (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
          and n.value.id in modules and n.attr.startswith("_")):
        pytest.fail(f"{f.name} uses {n.value.id}.{n.attr}")
