"""Reports: numbers in tables, the machine in one line, result files tagged with the machine.

    print(markdown_table(rows, ["model", "patches/s"]))
    write_results("roofline", payload, markdown)   # results/roofline_<machine>.{json,md}
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from bonejax.core import outputs

from .machine import machine, machine_tag
from . import RESULTS


def fmt(value: Any, digits: int = 3) -> str:
  """Numbers for tables: 3 significant digits, thousands separators for large ones."""
  if value is None:
    return "-"
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, int):
    return f"{value:,}"
  if isinstance(value, float):
    if value != value:
      return "-"
    if abs(value) >= 10 ** digits:
      return f"{value:,.0f}"
    return f"{value:.{digits}g}"
  return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str],
                   headers: Sequence[str] | None = None) -> str:
  headers = list(headers or columns)
  out = ["| " + " | ".join(headers) + " |",
         "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
  for row in rows:
    out.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
  return "\n".join(out)


def result_paths(name: str, tag: str | None = None,
                 results_dir: str | os.PathLike | None = None) -> dict[str, Path]:
  d = Path(results_dir) if results_dir else RESULTS
  stem = f"{name}_{tag or machine_tag()}"
  return {ext: d / f"{stem}.{ext}" for ext in ("json", "md", "csv", "png")}


def write_results(name: str, payload: dict[str, Any], markdown: str | None = None,
                  tag: str | None = None,
                  results_dir: str | os.PathLike | None = None) -> dict[str, Path]:
  """Writes NAME_<machine>.json (payload + machine + time) and, if given, the .md, atomically."""
  paths = result_paths(name, tag, results_dir)
  payload = dict(payload)
  payload.setdefault("machine", machine())
  payload.setdefault("date", time.strftime("%Y-%m-%d %H:%M:%S %Z"))
  payload.setdefault("command", " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]))
  outputs.atomic_write_json(paths["json"], payload)
  if markdown is not None:
    outputs.atomic_write_text(paths["md"], markdown.rstrip() + "\n")
  return paths


def machine_line(info: dict[str, Any]) -> str:
  """One Markdown line naming the machine and the load it carried during the run."""
  accs = [a for a in info.get("accelerators", []) if a.get("platform") != "cpu"]
  acc = ", ".join(f"{a['count']} x {a['kind']}" for a in accs) or "no accelerator"
  return (f"Machine `{info.get('tag')}`: {info.get('cpu')}, {info.get('cores')} usable cores, "
          f"{info.get('memory_gb')} GB RAM, {acc}; "
          + ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items()))
