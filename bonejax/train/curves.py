"""WORKDIR/metrics.csv (crash-safe appends) and the training-curve PNG drawn from it.

Rows are appended and fsync'ed one at a time, so a killed run leaves at most one partial last
line. On resume the file is cut back (atomically) to the rows at or before the restored step:
rows a killed run wrote after its last checkpoint are replayed, never duplicated.
"""

from __future__ import annotations

import csv
import io
import math
import os
import uuid
from pathlib import Path
from typing import Any, Sequence

from bonejax.core import outputs


def columns(classes: Sequence[str], evaluator_columns: Sequence[str] | None = None) -> list[str]:
  """The training columns, the evaluators' (default: the plane-wise "val" evaluator's) and the
  timing per step of the logging interval: step_ms (wall time) and data_ms (waiting for
  input, included in step_ms)."""
  if evaluator_columns is None:
    evaluator_columns = (["val_loss", "val_miou_all", "val_miou_fg"] +
                         [f"val_iou_{c}" for c in classes])
  return (["step", "loss", "lr", "patches_per_s"] + list(evaluator_columns) +
          ["step_ms", "data_ms"])


def _fmt(v: Any) -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return ""
  if isinstance(v, float):
    return f"{v:.6g}"
  return str(v)


class MetricsLog:

  def __init__(self, path: str | Path, classes: Sequence[str], resume_step: int | None,
               enabled: bool = True, columns: Sequence[str] | None = None):
    self.path, self.enabled = Path(path), enabled
    self.columns = list(columns) if columns is not None else globals()["columns"](classes)
    if not enabled:
      return
    rows = []
    if resume_step is not None and self.path.exists():
      rows = [r for r in self.read() if _step_of(r) is not None and _step_of(r) <= resume_step]
    out = io.StringIO()
    writer = csv.DictWriter(out, self.columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
      writer.writerow(r)
    outputs.atomic_write_text(self.path, out.getvalue())

  def read(self) -> list[dict[str, str]]:
    return read_rows(self.path)

  def append(self, row: dict[str, Any]) -> None:
    if not self.enabled or not row:
      return
    line = ",".join(_fmt(row.get(c)) for c in self.columns) + "\n"
    with open(self.path, "a") as f:
      f.write(line)
      f.flush()
      os.fsync(f.fileno())


def read_rows(path: str | Path) -> list[dict[str, str]]:
  """The complete rows of a metrics CSV (a torn last line is dropped)."""
  with open(path, newline="") as f:
    text = f.read()
  lines = text.splitlines()
  if not lines:
    return []
  if not text.endswith("\n"):
    lines = lines[:-1]
  return list(csv.DictReader(lines))


def _step_of(row: dict[str, str]) -> int | None:
  try:
    return int(row["step"])
  except (KeyError, TypeError, ValueError):
    return None


def plot(csv_path: str | Path, png_path: str | Path, best_metric: str = "val_miou_fg") -> Path:
  """Loss, validation mIoU and learning rate against step; written atomically."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = read_rows(csv_path)

  def series(key):
    pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
    return [p[0] for p in pts], [p[1] for p in pts]

  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  ax = axes[0]
  ax.plot(*series("loss"), label="train loss")
  ax.plot(*series("val_loss"), "o-", label="val loss")
  ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_yscale("log"), ax.legend()
  ax = axes[1]
  keys = list(rows[0].keys()) if rows else []
  for key in [c for c in keys if c.startswith("val_iou_")] + [
      c for c in keys if c.endswith(("_miou_all", "_miou_fg"))]:  # every evaluator's means
    xs, ys = series(key)
    if xs:
      ax.plot(xs, ys, "o-" if key == best_metric else ".-", label=key.removeprefix("val_"),
              linewidth=2.5 if key == best_metric else 1)
  ax.set_xlabel("step"), ax.set_ylabel("validation IoU"), ax.set_ylim(0, 1)
  if ax.get_legend_handles_labels()[0]:  # no evaluation yet (e.g. stopped early): no legend
    ax.legend()
  ax = axes[2]
  ax.plot(*series("lr"))
  ax.set_xlabel("step"), ax.set_ylabel("learning rate"), ax.set_yscale("log")
  fig.tight_layout()
  png = Path(png_path)
  tmp = png.with_name(f".{png.stem}.tmp-{uuid.uuid4().hex[:8]}.png")
  try:
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, png)
  finally:
    plt.close(fig)
    if tmp.exists():
      tmp.unlink()
  return png
