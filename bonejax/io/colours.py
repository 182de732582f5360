"""Class colours, fixed by class index so a class looks the same in every picture, report,
OME-Zarr label table and napari layer (Okabe-Ito, colour-blind safe)."""

from __future__ import annotations

COLOURS = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00",
           "#CC79A7")


def colour(k: int) -> str:
  """Class k's colour; past the table, foreground colours repeat (black stays background)."""
  return COLOURS[k] if k < len(COLOURS) else COLOURS[1 + (k - 1) % (len(COLOURS) - 1)]


def rgba(hex_colour: str, alpha: int = 255) -> list[int]:
  """'#RRGGBB' as [R, G, B, alpha] in 0..255."""
  h = hex_colour.lstrip("#")
  return [int(h[i:i + 2], 16) for i in (0, 2, 4)] + [alpha]
