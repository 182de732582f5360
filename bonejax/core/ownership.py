"""Which paths are bonejax's own outputs: what `--overwrite` may replace.

bonejax recognises what it wrote by its own marks, never by a name or a suffix alone:
- a zarr v3 node (prediction, probabilities, OME-Zarr) whose attributes hold `bonejax_version`
  (`store.set_array_attrs` and `store.write_group_attrs` add it to everything they write), or,
  from before that mark, the attributes of a predicted labels array (model, planes, vote,
  classes);
- a scan (a zarr group with an image array) holding nothing but zarr.json, image and labels;
- a dataset: dataset.json and such scans, nothing else;
- a model bundle (model.json with model and classes);
- a TIFF from `io.tiff.export_tiff` (software tag `bonejax ...`, `bonejax_version` in its
  description);
- a file whose first 64 KiB hold `"bonejax_version"` (reports, JSON, safetensors metadata), an
  HTML page with `<meta name="generator" content="bonejax ...">`, a PNG with the `Software:
  bonejax` tag; an evaluation report from before those marks (REPORT.json with iou / dice /
  miou_all / miou_fg, REPORT.md with its title, its Matplotlib pictures);
- an empty directory or file, which holds nothing to lose.
bonejax's own leftovers inside a directory (locks, temporaries) never count against it.
Everything else is somebody's data.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

# What bonejax itself leaves beside or inside its outputs: locks and (stale) temporaries.
# (`.NAME.tmp-` + 8 hex digits is the name older versions gave temporaries.)
_HIDDEN_OURS = re.compile(r"^\.+.+\.(lock|(tmp|old)-[0-9a-f]{6}-\d+-[0-9a-f]+.*|tmp-[0-9a-f]{8})$"
                          r"|^\.bonejax-")
_SCAN_ENTRIES = {"zarr.json", "image", "labels"}
# Attribute keys of a predicted labels array written before outputs carried bonejax_version.
_PREDICTION_KEYS = {"model", "planes", "vote", "classes"}
_REPORT_KEYS = {"iou", "dice", "miou_all", "miou_fg"}
_REPORT_TITLE = "# Segmentation evaluation"


def short_list(names: Sequence[str], n: int = 3) -> str:
  """'a', 'b', 'c' and 2 more."""
  shown = ", ".join(repr(x) for x in names[:n])
  return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _json(path: Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _marked(attrs: Any) -> bool:
  return isinstance(attrs, dict) and ("bonejax_version" in attrs or _PREDICTION_KEYS <= set(attrs))


def _foreign_entries(p: Path, allowed: Iterable[str] = ()) -> list[str]:
  allowed = set(allowed)
  return sorted(e for e in os.listdir(p) if e not in allowed and not _HIDDEN_OURS.match(e))


def _is_scan(p: Path) -> bool:
  meta = _json(p / "zarr.json")
  return (isinstance(meta, dict) and meta.get("node_type") == "group"
          and (p / "image" / "zarr.json").exists())


def _dir_reason(p: Path) -> str | None:
  entries = _foreign_entries(p)
  if not entries:
    return None  # empty, or only our own leftovers: nothing to lose
  meta = _json(p / "zarr.json")
  if isinstance(meta, dict) and meta.get("zarr_format") == 3:
    if _is_scan(p):
      extra = _foreign_entries(p, _SCAN_ENTRIES)
      return f"is a scan holding {short_list(extra)} that bonejax did not write" if extra else None
    if _marked(meta.get("attributes")):
      return None
    return "is a zarr node bonejax did not write (no bonejax_version attribute)"
  if "dataset.json" in entries and isinstance(_json(p / "dataset.json"), dict):
    extra = [e for e in entries if e != "dataset.json"
             and not (_is_scan(p / e) and _dir_reason(p / e) is None)]
    return f"is a dataset holding {short_list(extra)} that bonejax did not write" if extra else None
  bundle = _json(p / "model.json")
  if isinstance(bundle, dict) and "model" in bundle and "classes" in bundle:
    return None
  return f"is a directory bonejax did not write (it holds {short_list(entries)})"


def _tiff_is_ours(p: Path) -> bool:
  try:
    import tifffile
    with tifffile.TiffFile(p) as tif:
      page = tif.pages.first
      return (str(page.software).startswith("bonejax")
              or "bonejax_version" in str(page.description))
  except Exception:  # pylint: disable=broad-except  # unreadable: not recognisably ours
    return False


def _file_reason(p: Path) -> str | None:
  suffix = p.suffix.lower()
  if suffix in (".tif", ".tiff", ".btf", ".tf8"):
    return None if _tiff_is_ours(p) else "is a TIFF bonejax did not write"
  try:
    with open(p, "rb") as f:
      head = f.read(1 << 16)
  except OSError as e:
    return f"cannot be read ({os.strerror(e.errno) if e.errno else e})"
  if (b'"bonejax_version"' in head or b"Software\x00bonejax" in head
      or b'<meta name="generator" content="bonejax' in head):
    return None
  if suffix == ".json":
    obj = _json(p)
    if isinstance(obj, dict) and _REPORT_KEYS <= set(obj):
      return None
  if suffix == ".md" and head.startswith(_REPORT_TITLE.encode()):
    return None
  if suffix == ".png" and b"Software\x00Matplotlib" in head:
    return None  # a report picture from before pictures carried the bonejax mark
  if p.stat().st_size == 0:
    return None  # nothing to lose
  return "is a file bonejax did not write"


def foreign_reason(path: str | os.PathLike) -> str | None:
  """None when `path` is a bonejax output (--overwrite may replace it), else why not."""
  p = Path(path)
  if p.is_symlink() and not p.exists():
    return None  # a dangling link: replacing it loses nothing
  if p.is_dir():
    return _dir_reason(p)
  if p.is_file():
    return _file_reason(p)
  return "is not a regular file or directory"
