"""Volumes in and out. `registry.open_volume` picks the reader of any input (one module per
format: `tiff`, `slices`, `npy`, `zarr`, `ome_zarr`, `hdf5`, `mrc`, `isq`, each a
`source.VolumeSource`); `registry.output_format` names the writer of an output (`tiff`,
`ome_zarr`, zarr v3 through `bonejax.data.store`). Also: class colours (`colours`), voxel sizes
and units (`voxel`), resampling (`resample`), intensity statistics (`intensity`)."""
