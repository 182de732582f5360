"""`python launch/model_summary.py` runs the command in bonejax/cli/model_summary.py (also `bonejax ...`)."""

import sys
from pathlib import Path

# Lets `python launch/model_summary.py` run from a checkout that is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bonejax.cli import model_summary as command  # noqa: E402

__doc__ = command.__doc__  # absl's --help shows the main module's docstring

if __name__ == "__main__":
  command.run()
