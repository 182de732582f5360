"""The small training set-up the trainer's test modules share: phantom scans to train on and the
smoke demo config (U-Net depth 2 width 4, 32-px patches) cut down to a few steps.

tests/conftest.py makes `tiny_dataset` from `phantom_dataset` for every module that asks for it.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOKE_CONFIG = str(REPO / "configs/demo.py") + ":smoke"


def phantom_dataset(tmp_path_factory, name="tiny", num_scans=3):
  """`num_scans` phantom scans of 32 x 48 x 48 (seed 0) in a new temporary folder NAME*/data."""
  from bonejax import phantom
  path = tmp_path_factory.mktemp(name) / "data"
  phantom.make_dataset(path, num_scans=num_scans, shape=(32, 48, 48), seed=0, progress=False)
  return path


def smoke_config(dataset_path, num_steps=4, eval_every=2, checkpoint_every=4, **overrides):
  """The smoke config on `dataset_path`: batch 8, validation batch 4, a log line every 2 steps.

  `overrides` set config fields after these; a key "model.NAME" sets the model's field NAME.
  """
  from bonejax.train import configlib
  c = configlib.load_config_file(SMOKE_CONFIG)
  c.dataset = str(dataset_path)
  c.num_steps, c.batch_size, c.val_batch_size = num_steps, 8, 4
  c.eval_every, c.checkpoint_every, c.log_every = eval_every, checkpoint_every, 2
  for k, v in overrides.items():
    if k.startswith("model."):
      c.model[k[len("model."):]] = v
    else:
      c[k] = v
  return c
