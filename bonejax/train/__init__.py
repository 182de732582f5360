"""Training: on-device augmentation (augment.py), the loop, losses and optimisers."""
