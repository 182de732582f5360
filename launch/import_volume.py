"""`python launch/import_volume.py` runs the command in bonejax/cli/import_volume.py (also `bonejax ...`)."""

import sys
from pathlib import Path

# Lets `python launch/import_volume.py` run from a checkout that is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bonejax.cli import import_volume as command  # noqa: E402

__doc__ = command.__doc__  # absl's --help shows the main module's docstring

if __name__ == "__main__":
  command.run()
