"""A weights file on disk -> (state dict of numpy arrays, metadata, what kind of file it was).

Three kinds are read, all without torch and without running pickled code:
- a DLFit checkpoint: a `.pth` holding a dict with `model_state` (the smp state dict) and
  `metadata` (architecture, classes, channels, normalisation, patch size; see `metadata.py`);
- a bare smp state dict saved with `torch.save(model.state_dict(), path)`, or a training
  checkpoint holding one under `state_dict` / `model_state_dict` / `model`;
- a `.safetensors` file (its `__metadata__` strings are read as metadata).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from bonejax.core import errors
from bonejax.convert import safetensors_io, smp_layout, torch_pickle

STATE_KEYS = ("model_state", "state_dict", "model_state_dict", "model")
SAFETENSORS = (".safetensors",)


@dataclasses.dataclass
class Checkpoint:
  state_dict: dict[str, np.ndarray]
  metadata: dict[str, Any]
  kind: str  # "dlfit" | "checkpoint" | "state_dict" | "safetensors"
  path: Path

  def source(self) -> dict[str, Any]:
    """What model.json records about where the weights came from."""
    h = hashlib.sha256()
    with open(self.path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return {"file": self.path.name, "kind": self.kind, "sha256": h.hexdigest(),
            "metadata": self.metadata}


def _is_state_dict(obj: Any) -> bool:
  return isinstance(obj, dict) and bool(obj) and all(
      isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())


def _plain(v: Any, depth: int = 0) -> Any:
  """Metadata made JSON-able: arrays and anything exotic become short descriptions."""
  if depth > 8:
    return "..."
  if v is None or isinstance(v, (bool, int, float, str)):
    return v
  if isinstance(v, dict):
    return {str(k): _plain(x, depth + 1) for k, x in v.items()}
  if isinstance(v, (list, tuple, set, frozenset)):
    return [_plain(x, depth + 1) for x in v]
  if isinstance(v, np.ndarray):
    return v.tolist() if v.size <= 16 else f"<array {v.dtype} {list(v.shape)}>"
  if isinstance(v, bytes):
    return f"<{len(v)} bytes>"
  return str(v)


def _from_safetensors_meta(meta: dict[str, str]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for k, v in meta.items():
    try:
      out[k] = json.loads(v)  # bonejax writes lists and numbers as JSON text
    except (json.JSONDecodeError, TypeError):
      out[k] = v
  return out


def read(path: str | os.PathLike) -> Checkpoint:
  p = errors.require_exists(path, "weights file")
  if p.is_dir():
    raise errors.UserError(f"weights file {str(p)!r} is a directory")
  if p.suffix.lower() in SAFETENSORS:
    tensors, meta = safetensors_io.load(p)
    if not tensors:
      raise errors.UserError(f"{str(p)!r} holds no tensors")
    return Checkpoint(smp_layout.strip_prefixes(tensors), _from_safetensors_meta(meta),
                      "safetensors", p)
  obj = torch_pickle.load(p)
  meta: Any = {}
  if _is_state_dict(obj):
    sd, kind = obj, "state_dict"
  elif isinstance(obj, dict) and any(_is_state_dict(obj.get(k)) for k in STATE_KEYS):
    key = next(k for k in STATE_KEYS if _is_state_dict(obj.get(k)))
    sd = obj[key]
    kind = "dlfit" if key == "model_state" else "checkpoint"
    meta = obj.get("metadata", {k: v for k, v in obj.items() if k != key and not
                                isinstance(v, (dict, np.ndarray))})
  elif isinstance(obj, dict):
    tops = ", ".join(sorted(map(str, obj))[:6])
    raise errors.UserError(f"{str(p)!r} holds a dict without a state dict of tensors (keys: {tops}); "
                        f"expected a state dict or a dict with one of {', '.join(STATE_KEYS)}")
  else:
    raise errors.UserError(f"{str(p)!r} holds a {type(obj).__name__}, not a state dict")
  if not isinstance(meta, dict):
    raise errors.UserError(f"{str(p)!r}: its metadata is a {type(meta).__name__}, not a dict")
  return Checkpoint(smp_layout.strip_prefixes(dict(sd)), _plain(meta), kind, p)
