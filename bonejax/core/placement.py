"""Where an output may go: never at an input, never inside one, never inside someone's data.

`outputs.check_output` refuses an output that is, holds or lies inside one of the command's
named inputs. Commands call `refuse_inside` first, before claiming or creating anything (a
claim's lock file or a made parent directory inside an input would already change it). It
also refuses outputs inside data that is not named as an input of this run but is someone's
data all the same: a zarr node (a scan, an array, an OME-Zarr image) or a model bundle. A
dataset directory is not such a node: imports and reports are written into it on purpose.

    placement.refuse_inside(out, inputs=(image, labels), what="--out")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from bonejax.core import errors

# Files whose presence makes a directory a data node (zarr v3 / v2, a model bundle).
_NODE_MARKERS = (("zarr.json", "zarr node"), (".zarray", "zarr array"),
                 (".zgroup", "zarr group"), ("model.json", "model bundle"))


def data_node(path: str | os.PathLike) -> str | None:
  """What kind of data directory `path` is ("scan", "zarr node", "model bundle", ...), or
  None for any other path."""
  p = Path(path)
  if not p.is_dir():
    return None
  if (p / "zarr.json").is_file() and (p / "image" / "zarr.json").is_file():
    return "scan"
  for marker, kind in _NODE_MARKERS:
    if (p / marker).is_file():
      return kind
  return None


def _contains(outer: str, inner: str) -> bool:
  return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def refuse_inside(output: str | os.PathLike, inputs: Iterable[Any] = (),
                  what: str = "output") -> None:
  """A UserError when `output` is one of `inputs`, lies inside one (links resolved), or lies
  inside a data node (`data_node`) of any run. An output that holds an input, or that is
  itself an existing node, is left to `outputs.check_output` (--overwrite rules)."""
  if not output:
    return
  out = os.path.realpath(os.fspath(output))
  for given in inputs:
    if given is None or given == "":
      continue
    src = os.path.realpath(os.fspath(given))
    if out == src:
      raise errors.UserError(f"{what} {str(output)!r} is the input {str(given)!r}; writing it "
                             f"would change the input")
    if _contains(src, out):
      raise errors.UserError(f"{what} {str(output)!r} lies inside the input {str(given)!r}; "
                             f"writing it would change the input")
  parent = Path(out).parent
  while True:
    kind = data_node(parent)
    if kind is not None:
      raise errors.UserError(f"{what} {str(output)!r} lies inside the {kind} {str(parent)!r}; "
                             f"writing there would change it: choose a path outside")
    if parent.parent == parent:
      return
    parent = parent.parent
