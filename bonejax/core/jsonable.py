"""Plain JSON from what results hold: numpy / jax scalars and arrays, Paths, tuples, NaN."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def to_jsonable(obj: Any) -> Any:
  """numpy/jax scalars and arrays, Paths and tuples to plain JSON types."""
  if isinstance(obj, dict):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if isinstance(obj, Path):
    return str(obj)
  if hasattr(obj, "tolist"):  # numpy / jax arrays and scalars
    return to_jsonable(obj.tolist())
  if isinstance(obj, float) and obj != obj:  # NaN is not JSON
    return None
  return obj
