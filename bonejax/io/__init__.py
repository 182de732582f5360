"""Volumes in and out: every input format, OME-Zarr, resampling, intensity statistics."""
