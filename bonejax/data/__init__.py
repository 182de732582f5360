"""Data in: scan splits (splits.py) and the training/validation patch streams (patches.py)."""
