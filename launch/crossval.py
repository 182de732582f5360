"""`python launch/crossval.py` runs the command in bonejax/cli/crossval.py (also `bonejax ...`)."""

import sys
from pathlib import Path

# Lets `python launch/crossval.py` run from a checkout that is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bonejax.cli import crossval as command  # noqa: E402

__doc__ = command.__doc__  # absl's --help shows the main module's docstring

if __name__ == "__main__":
  command.run()
