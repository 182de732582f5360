"""bonejax: deep-learning segmentation of bone in micro-CT volumes, in JAX/Flax."""

__version__ = "0.1.0"
