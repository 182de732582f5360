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
import itertools
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


PLAIN_NODES = 10_000  # values of metadata kept in model.json; the rest become "..."
PLAIN_DEPTH = 8
PLAIN_TEXT = 4096    # characters of one string kept


def _key(k: Any) -> str:
  if isinstance(k, str):
    return k[:PLAIN_TEXT]
  if k is None or isinstance(k, (bool, float)) or (isinstance(k, int) and k.bit_length() < 64):
    return str(k)
  return f"<{type(k).__name__}>"


def _leaf(x: Any) -> Any:
  if x is None or isinstance(x, (bool, float)):
    return x
  if isinstance(x, int):
    return x if x.bit_length() < 64 else f"<{x.bit_length()}-bit integer>"
  if isinstance(x, str):
    return x if len(x) <= PLAIN_TEXT else f"<text of {len(x):,} characters>"
  if isinstance(x, np.ndarray):
    return x.tolist() if x.size <= 16 else f"<array {x.dtype} {list(x.shape)}>"
  if isinstance(x, bytes):
    return f"<{len(x)} bytes>"
  return str(x)[:PLAIN_TEXT]


def _plain(v: Any) -> Any:
  """Metadata made JSON-able and small: arrays and anything exotic become short descriptions.

  At most about PLAIN_NODES values with every shared reference expanded (as json.dump writes
  them), containers deeper than PLAIN_DEPTH levels and whatever is past the budget become "...".
  A shared object is converted once and reused at its expanded size, so a tower of dicts that
  each reference one dict ten times costs PLAIN_NODES steps, not 10^levels.
  """
  budget = [PLAIN_NODES]
  done: dict[int, tuple[Any, int]] = {}  # id -> (converted, expanded size); all alive in v

  def convert(x: Any, depth: int) -> tuple[Any, int]:
    container = isinstance(x, (dict, list, tuple, set, frozenset))
    if container and id(x) in done and done[id(x)][1] <= budget[0]:
      budget[0] -= done[id(x)][1]
      return done[id(x)]
    budget[0] -= 1
    if budget[0] < 0 or (container and depth > PLAIN_DEPTH):
      return "...", 1
    if not container:
      return _leaf(x), 1
    size = 1
    out: Any = {} if isinstance(x, dict) else []
    for k, item in (x.items() if isinstance(x, dict) else ((None, item) for item in x)):
      cut = budget[0] <= 0  # then one marker stands for everything left out of this container
      value, n = ("...", 1) if cut else convert(item, depth + 1)
      size += n
      if isinstance(out, dict):
        out["..." if cut else _key(k)] = value
      else:
        out.append(value)
      if cut:
        break
    done[id(x)] = (out, size)
    return out, size

  return convert(v, 0)[0]


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
    tops = ", ".join(sorted(_key(k)[:40] for k in itertools.islice(obj, 1000))[:6])
    raise errors.UserError(f"{str(p)!r} holds a dict without a state dict of tensors (keys: "
                           f"{tops}); expected a state dict or a dict with one of "
                           f"{', '.join(STATE_KEYS)}")
  else:
    raise errors.UserError(f"{str(p)!r} holds a {type(obj).__name__}, not a state dict")
  if not isinstance(meta, dict):
    raise errors.UserError(f"{str(p)!r}: its metadata is a {type(meta).__name__}, not a dict")
  return Checkpoint(smp_layout.strip_prefixes(dict(sd)), _plain(meta), kind, p)
