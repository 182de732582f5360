"""The evaluation as one self-contained HTML page: what a person opens first after a run.

A JSON report is for scripts; people want to see. `write(ev, path, ...)` makes a single file
(every picture an inlined PNG data URI, no scripts, no external links, so it can be mailed or
archived) with:
- a header naming the prediction, the truth, the model, planes, vote and the (Z, Y, X) voxel
  size (and how it was known), the unlabelled voxels of a sparse truth (drawn as nothing, never
  as errors), and any warning (assumed voxel size, truth used in training);
- the per-class IoU / Dice / precision / recall table and the means;
- IoU in the volume's outer band (evaluate.py --border_band) against the interior;
- the bone measures and, with --morphometry, the bone indices of prediction and truth (numbers
  come before pictures);
- the confusion matrix, cells shaded by their share of the truth row;
- the per-slice foreground IoU profile along Z, Y and X;
- the training curves, when a metrics.csv is known (beside the bundle's workdir);
- the voting comparison (single axes vs fused votes), when given;
- for each axis, the middle slice: image, truth, prediction, errors (prediction != truth in
  red over the image) and, when given, the uncertainty (entropy) map; pixels keep their
  physical aspect (Y and X slices of 8 x 6.24 x 6.24 um voxels are drawn 8 : 6.24).
The page carries `<meta name="generator" content="bonejax ...">`, so `--overwrite` knows it.
"""

from __future__ import annotations

import base64
import html
import io
import math
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import bonejax
from bonejax.core import outputs
from bonejax.evaluate import provenance, report
from bonejax.io import colours

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1100px;
color:#222;padding:0 16px}
h1{font-size:1.5em;margin-bottom:0.2em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px
solid #ddd;padding-bottom:4px} table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ccc;padding:4px 10px;text-align:right} th{background:#f4f4f4}
td.name,th.name{text-align:left} img{max-width:100%;height:auto;display:block;margin:6px 0}
.meta{color:#555;font-size:0.92em} .warning{color:#a33;font-weight:600}
#header td,#header th{border:none;padding:1px 12px 1px 0;background:none} .swatch{display:inline-block;width:0.9em;height:0.9em;
margin-right:6px;vertical-align:-0.1em;border:1px solid #888}
"""


def _fmt(v: Any, spec: str = ".4f") -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "n/a"
  return format(v, spec)


def _png(fig) -> str:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
  import matplotlib.pyplot as plt
  plt.close(fig)
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, alt: str) -> str:
  return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


# ---------------------------------------------------------------------------------------------
# Sections.
# ---------------------------------------------------------------------------------------------


def _scores_table(r: dict[str, Any]) -> str:
  rows = []
  for k, n in enumerate(r["classes"]):
    sw = f'<span class="swatch" style="background:{colours.colour(k)}"></span>'
    rows.append(f'<tr><td class="name">{sw}{k} {html.escape(n)}</td>'
                f'<td>{_fmt(r["iou"][n])}</td><td>{_fmt(r["dice"][n])}</td>'
                f'<td>{_fmt(r["precision"][n])}</td><td>{_fmt(r["recall"][n])}</td>'
                f'<td>{r["truth_voxels"][n]:,}</td><td>{r["pred_voxels"][n]:,}</td></tr>')
  rows.append(f'<tr><th class="name">mean, all classes</th><th>{_fmt(r["miou_all"])}</th>'
              f'<th>{_fmt(r["mdice_all"])}</th><th colspan="4"></th></tr>')
  rows.append(f'<tr><th class="name">mean, foreground</th><th>{_fmt(r["miou_fg"])}</th>'
              f'<th>{_fmt(r["mdice_fg"])}</th><th colspan="4"></th></tr>')
  return ('<table id="scores"><tr><th class="name">class</th><th>IoU</th><th>Dice</th>'
          '<th>precision</th><th>recall</th><th>truth voxels</th><th>predicted voxels</th></tr>'
          + "".join(rows) + "</table>"
          f'<p class="meta">Voxel accuracy {_fmt(r["accuracy"])}.</p>')


def _border_table(sec: dict[str, Any]) -> str:
  """IoU in the outer band against the interior, per class and for the means."""
  def row(name, v, cell="td"):
    return (f'<tr><{cell} class="name">{name}</{cell}><{cell}>{_fmt(v["border"])}</{cell}>'
            f'<{cell}>{_fmt(v["interior"])}</{cell}><{cell}>{_fmt(v["difference"], "+.4f")}'
            f'</{cell}></tr>')
  rows = [row(f"{k} {html.escape(n)}", v) for k, (n, v) in enumerate(sec["iou"].items())]
  rows += [row("mean, all classes", sec["miou_all"], "th"),
           row("mean, foreground", sec["miou_fg"], "th")]
  band, v = sec["band_voxels"], sec["voxels"]
  return ('<table id="border"><tr><th class="name">class</th><th>border IoU</th>'
          '<th>interior IoU</th><th>difference</th></tr>' + "".join(rows) + "</table>"
          f'<p class="meta">Border: the {v["border"]:,} voxels within {band} of a face of the '
          f'volume; interior: the other {v["interior"]:,}. Difference = interior - border '
          "(positive: the border is worse).</p>")


def _confusion_table(r: dict[str, Any]) -> str:
  names = r["classes"]
  head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
  rows = []
  for n, row in zip(names, r["confusion"]):
    total = max(1, sum(row))
    cells = "".join(
        f'<td style="background:rgba(0,114,178,{0.08 + 0.6 * v / total:.2f})">{v:,}</td>'
        for v in row)
    rows.append(f'<tr><th class="name">{html.escape(n)}</th>{cells}</tr>')
  return (f'<table id="confusion"><tr><th class="name">truth \\ prediction</th>{head}</tr>'
          + "".join(rows) + "</table>")


def _profile_png(profiles: Sequence[np.ndarray]) -> str:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8, 3.2))
  report.draw_profile(ax, profiles)
  return _png(fig)


def _curves_png(metrics_csv: Path) -> str | None:
  from bonejax.train import curves
  with tempfile.TemporaryDirectory() as d:
    try:
      png = curves.plot(metrics_csv, Path(d) / "curves.png")
      data = Path(png).read_bytes()
    except Exception:  # pylint: disable=broad-except  # no rows yet, damaged CSV: no curves
      return None
  return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _voting_table(voting: Sequence[tuple[str, dict[str, Any]]], classes: Sequence[str]) -> str:
  head = "".join(f"<th>{html.escape(c)}</th>" for c in classes)
  rows = []
  best = max((s.get("miou_fg") or -1) for _, s in voting)
  for name, s in voting:
    iou = s["iou"]
    ious = [iou.get(c) if isinstance(iou, dict) else iou[k] for k, c in enumerate(classes)]
    cells = "".join(f"<td>{_fmt(v)}</td>" for v in ious)
    fg = _fmt(s.get("miou_fg"))
    fg = f"<b>{fg}</b>" if s.get("miou_fg") == best else fg
    rows.append(f'<tr><td class="name">{html.escape(name)}</td>{cells}<td>{fg}</td></tr>')
  return (f'<table id="voting"><tr><th class="name">method</th>{head}<th>miou_fg</th></tr>'
          + "".join(rows) + "</table>")


def _grey(image: np.ndarray) -> np.ndarray:
  img = np.asarray(image, np.float32)
  lo, hi = np.percentile(img, (0.5, 99.5))
  return np.clip((img - lo) / max(hi - lo, 1e-12), 0, 1)


def errors_mask(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
  """Where the prediction is wrong; a sparse truth's unlabelled voxels (values >= the number
  of classes) are never errors."""
  return (pred != truth) & (truth < num_classes)


def _slices_png(axis: int, m: dict[str, Any], names: Sequence[str],
                voxel: Sequence[float] | None) -> str:
  """Image, truth, prediction, errors (and uncertainty) of the middle slice across `axis`."""
  from matplotlib.colors import ListedColormap
  from matplotlib.patches import Patch
  plt = _pyplot()
  c = len(names)
  cmap = ListedColormap([colours.colour(k) for k in range(c)])
  truth, pred = m["truth"], m["pred"]
  grey = _grey(m["image"]) if m.get("image") is not None else None
  panels = ["image", "truth", "prediction", "errors"] + (
      ["uncertainty"] if m.get("uncertainty") is not None else [])
  # Every picture gets a cell of the same size; the uncertainty's colour bar sits in a narrow
  # column of its own (room for its ticks and label), so that panel is not shrunk out of line.
  bar = m.get("uncertainty") is not None
  widths = [1.0] * len(panels) + ([0.28] if bar else [])
  # Z runs down the page in Y and X slices; pixels keep their physical aspect when known, and
  # the figure is as tall as the pictures then are (no band of white under flat slices).
  dims = [d for d in range(3) if d != axis]
  aspect = voxel[dims[0]] / voxel[dims[1]] if voxel else 1.0
  height = min(1.6, max(0.25, truth.shape[0] * aspect / truth.shape[1])) * 3.0
  fig = plt.figure(figsize=(3.3 * len(panels) + (0.9 if bar else 0), height + 0.9))
  grid = fig.add_gridspec(1, len(widths), width_ratios=widths, wspace=0.08)
  axes = [fig.add_subplot(grid[0, i]) for i in range(len(panels))]
  for ax, title in zip(axes, panels):
    if grey is not None and title != "uncertainty":
      ax.imshow(grey, cmap="gray", interpolation="nearest", aspect=aspect)
    if title in ("truth", "prediction"):
      lab = truth if title == "truth" else pred
      shown = np.ma.masked_equal(lab, 0) if grey is not None else lab
      shown = np.ma.masked_where(lab >= c, shown)  # a sparse truth's unlabelled voxels
      ax.imshow(shown, cmap=cmap, vmin=-0.5, vmax=c - 0.5, interpolation="nearest",
                alpha=0.55 if grey is not None else 1.0, aspect=aspect)
    elif title == "errors":
      wrong = np.ma.masked_equal(errors_mask(pred, truth, c).astype(np.uint8), 0)
      if grey is None:
        ax.imshow(np.zeros(truth.shape), cmap="gray", vmin=0, vmax=1, aspect=aspect)
      ax.imshow(wrong, cmap=ListedColormap(["#ff0000"]), vmin=0, vmax=1,
                interpolation="nearest", aspect=aspect)
      title = f"errors ({int(wrong.count()):,} voxels)"
    elif title == "uncertainty":
      im = ax.imshow(m["uncertainty"], cmap="magma", vmin=0, vmax=255,
                     interpolation="nearest", aspect=aspect)
      # In the axes' own coordinates: as tall as the picture, just right of it.
      cax = ax.inset_axes([1.04, 0.0, 0.06, 1.0])
      fig.colorbar(im, cax=cax, label="entropy x 255")
    elif grey is None:
      ax.text(0.5, 0.5, "no image", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_axis_off()
  fig.legend(handles=[Patch(color=colours.colour(k), label=f"{k} {n}")
                      for k, n in enumerate(names)] + [Patch(color="#ff0000", label="error")],
             loc="lower center", ncol=min(c + 1, 7), frameon=False)
  fig.subplots_adjust(bottom=0.55 / (height + 0.9))
  return _png(fig)


def _measures_table(measures: dict[str, Any]) -> str:
  rows = "".join(
      f'<tr><td class="name">{html.escape(k)}</td><td>{_fmt(v["pred"], ".4g")}</td>'
      f'<td>{_fmt(v["truth"], ".4g")}</td><td>'
      f'{"n/a" if v["rel_diff"] is None else format(v["rel_diff"] * 100, "+.1f") + " %"}</td></tr>'
      for k, v in measures.items())
  return ('<table id="measures"><tr><th class="name">measure</th><th>prediction</th>'
          '<th>truth</th><th>relative difference</th></tr>' + rows + "</table>")


# ---------------------------------------------------------------------------------------------
# The page.
# ---------------------------------------------------------------------------------------------


def find_metrics_csv(*hints: Any) -> Path | None:
  """metrics.csv of a training workdir, from the workdir, its bundle (WORKDIR/model) or the
  csv itself."""
  for h in hints:
    if not h:
      continue
    p = Path(h)
    for cand in (p, p / "metrics.csv", p.parent / "metrics.csv"):
      if cand.name == "metrics.csv" and cand.is_file():
        return cand
  return None


def _header(r: dict[str, Any], title: str) -> list[str]:
  """Title and what was compared: files, model, planes, vote, shape and the voxel size."""
  rows = [("prediction", f'<code>{html.escape(str(r["pred"]))}</code>'),
          ("truth", f'<code>{html.escape(str(r["truth"]))}</code>')]
  info = r.get("prediction_info") or {}
  if info.get("architecture") or info.get("model"):
    model = html.escape(str(info.get("architecture") or ""))
    if info.get("model"):
      model += f' <code>{html.escape(str(info["model"]))}</code>'
    rows.append(("model", model.strip()))
  if info.get("planes") is not None:
    rows.append(("planes", html.escape(f'{info["planes"]}' + (
        f' ({", ".join(info["plane_sets"])})' if info.get("plane_sets") else ""))))
  if info.get("vote"):
    rows.append(("vote", html.escape(str(info["vote"]))))
  rows.append(("shape (Z, Y, X)", f'{tuple(r["shape"])}, {r["voxels"]:,} voxels'))
  if r.get("unlabelled_voxels"):
    rows[-1] = (rows[-1][0], rows[-1][1] + f' labelled, {r["unlabelled_voxels"]:,} unlabelled '
                f'(value {r["unlabelled_value"]}, not scored)')
  rows.append(("voxel size", html.escape(provenance.voxel_text(r))))
  cells = "".join(f'<tr><th class="name">{k}</th><td class="name">{v}</td></tr>'
                  for k, v in rows)
  out = [f"<h1>{html.escape(title)}</h1>", f'<table id="header">{cells}</table>',
         f'<p class="meta">bonejax {html.escape(bonejax.__version__)}</p>']
  for w in r.get("warnings") or ([r["warning"]] if r.get("warning") else []):
    out.append(f'<p class="warning">Warning: {html.escape(w)}.</p>')
  return out


def _morphometry_tables(morph: dict[str, Any]) -> list[str]:
  from bonejax.evaluate import morph_report
  out = []
  for key, m in morph.items():
    rows = "".join(
        f'<tr><td class="name">{html.escape(morph_report.label(name, v["unit"]))}</td>'
        f'<td>{morph_report.fmt_value(v["pred"], v["unit"])}</td>'
        f'<td>{morph_report.fmt_value(v["truth"], v["unit"])}</td><td>'
        f'{"n/a" if v["rel_diff"] is None else format(v["rel_diff"] * 100, "+.1f") + " %"}'
        f'</td></tr>' for name, v in m["indices"].items())
    out += [f"<h3>{html.escape(key)}, {html.escape(m['roi'])}</h3>",
            f'<table class="morphometry"><tr><th class="name">index</th><th>prediction</th>'
            f'<th>truth</th><th>relative difference</th></tr>{rows}</table>']
  return out


def render(ev: report.Evaluation, *, title: str = "Segmentation evaluation",
           voting: Sequence[tuple[str, dict[str, Any]]] | None = None,
           metrics_csv: str | Path | None = None) -> str:
  r = ev.result
  names = r["classes"]
  voxel = r.get("voxel_size_zyx_um") or ([r["voxel_size_um"]] * 3 if r.get("voxel_size_um")
                                          else None)
  # Numbers first (what a reader compares), pictures after.
  parts = _header(r, title) + ["<h2>Per class</h2>", _scores_table(r)]
  if r.get("border_band"):
    parts += ["<h2>Border band vs interior</h2>", _border_table(r["border_band"])]
  if r.get("measures"):
    parts += ["<h2>Bone measures</h2>", _measures_table(r["measures"])]
  if r.get("morphometry"):
    parts += ["<h2>Bone morphometry</h2>",
              '<p class="meta">ASBMR indices (Bouxsein et al. 2010) in micrometres on the '
              '(Z, Y, X) voxel size; relative difference = (prediction - truth) / truth.</p>']
    parts += _morphometry_tables(r["morphometry"])
  if voting:
    parts += ["<h2>Voting comparison</h2>", _voting_table(voting, names)]
  parts += ["<h2>Confusion matrix</h2>",
            '<p class="meta">Rows: truth, columns: prediction; shading: share of the row.</p>',
            _confusion_table(r)]
  if ev.profiles is not None:
    parts += ["<h2>Per-slice foreground IoU</h2>", _img(_profile_png(ev.profiles),
                                                        "per-slice IoU profile")]
  curves_uri = _curves_png(Path(metrics_csv)) if metrics_csv else None
  if curves_uri:
    parts += ["<h2>Training curves</h2>", _img(curves_uri, "training curves"),
              f'<p class="meta">From <code>{html.escape(str(metrics_csv))}</code>.</p>']
  if ev.middles:
    parts.append("<h2>Middle slices</h2>")
    for axis in range(3):
      m = ev.middles.get(axis)
      if not m or "truth" not in m:
        continue
      shown = ["image", "truth", "prediction", "errors (prediction != truth, red)"] + (
          ["uncertainty (entropy)"] if m.get("uncertainty") is not None else [])
      parts += [f"<h3>{'ZYX'[axis]} = {m['index']}</h3>",
                _img(_slices_png(axis, m, names, voxel), f"middle slice across {'ZYX'[axis]}"),
                f'<p class="meta">{" &middot; ".join(shown)}</p>']
  return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
          f'<meta name="generator" content="bonejax {html.escape(bonejax.__version__)}">'
          f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
          + "\n".join(parts) + "\n</body></html>\n")


def write(ev: report.Evaluation, path: str | Path, **kw) -> Path:
  """Writes the page atomically; returns its path. `kw`: see `render`."""
  path = Path(path)
  outputs.atomic_write_text(path, render(ev, **kw))
  return path
