"""The `bonejax` console command: `bonejax SUBCOMMAND --flag=value ...`.

Each subcommand is the module bonejax/cli/NAME.py that `python launch/NAME.py` also runs, with
the same flags, output and exit codes; only that module is imported, so `bonejax --help` and
`bonejax evaluate --help` stay fast and flags of one command never reach another.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module in bonejax.cli, one line for `bonejax --help`)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "make-phantom": ("make_phantom", "synthetic micro-CT dataset with exact labels"),
    "import": ("import_volume", "a volume (TIFF, slices, HDF5, MRC, ISQ, zarr...) into a dataset"),
    "train": ("train", "train a model from a config; resumes from the newest checkpoint"),
    "predict": ("predict", "segment a scan (or a study of scans) with a model bundle"),
    "evaluate": ("evaluate", "IoU / Dice, bone measures and morphometry against the truth"),
    "crossval": ("crossval", "k-fold cross-validation by scan"),
    "convert": ("convert_weights", "BONe / smp PyTorch weights to a bundle and back"),
    "demo": ("demo", "the whole job on a synthetic phantom"),
    "summary": ("model_summary", "parameters and forward GFLOP of a model"),
}


def usage() -> str:
  width = max(len(n) for n in SUBCOMMANDS)
  lines = ["usage: bonejax SUBCOMMAND [--flag=value ...]   (bonejax SUBCOMMAND --help for its flags)",
           "", "subcommands:"]
  lines += [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  name = argv[1]
  if name not in SUBCOMMANDS:
    print(f"error: unknown subcommand {name!r}; one of: {', '.join(SUBCOMMANDS)}",
          file=sys.stderr)
    sys.exit(2)
  # Before the import: train and demo read their --config flags when their module loads.
  sys.argv = [f"bonejax {name}"] + argv[2:]
  module = importlib.import_module(f"bonejax.cli.{SUBCOMMANDS[name][0]}")
  # absl shows the main module's docstring in --help; the console script's own has none.
  sys.modules["__main__"].__doc__ = module.__doc__
  module.run()


if __name__ == "__main__":
  main()
