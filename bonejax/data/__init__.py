"""Data in: scan splits (splits.py), the training/validation patch streams (patches.py, with
grain's shuffle vectorised in shuffle.py), the device-resident sampler (device_sampler.py) and
the choice between the two training inputs (feed.py), and the 2.5D context planes both training
and prediction stack (context.py)."""
