r"""3D: segmentation_models_pytorch_3d's U-Net with a ResNet-18 encoder on 3D patches.

    python launch/train.py --config=configs/unet3d.py --workdir=/tmp/bonejax-unet3d

The 3D recipe of issue 28 (BONe's DLFit trains the same network in 3D): `unet3d_resnet18`
(42.6 M parameters, logits identical to smp-3d's `Unet("resnet18")`), 64^3 patches from
`data.patches3d` (a third centred on foreground voxels, as nnU-Net), 3D augmentation
(`train.augment3d`: mirrors on every axis, 90-degree rotations, axis permutations, brightness
and contrast), validation on a grid of 64^3 crops of the held-out scans. Prediction is by 3D
sliding windows (`predict.windows3d`: `predict_window`, overlap 0.5, Gaussian blending).
With no `dataset` it first writes a 5-scan bone phantom (96 x 128 x 128) to WORKDIR/data.

`model.name=unet3d` (`model.kwargs.depth`, `.width`) gives the classic 3D U-Net instead.
Smoke variant (seconds): `--config=configs/unet3d.py:smoke` (classic unet3d, depth 2, width 4,
16^3 patches, 4 steps).

The trainer's 3D hook (models.spatial_dims(model.name) == 3) takes the feed and validation
crops from `train.input3d` and the bundle records `patch_size_zyx`, `predict_window` and
`predict_overlap`; `launch/predict.py` then predicts a 3D bundle by sliding windows
(`predict.predict_volume_3d`). The planes evaluator validates on 3D crops; a `volume` evaluator
(`c.evaluators.volume = dict(type="volume", every_steps=N)`) predicts the validation scans whole
by 3D sliding windows (`window`, `overlap`: default predict_window, predict_overlap). tests/test_3d_end_to_end.py runs the smoke variant through train, predict, evaluate.
"""

import dataclasses

import ml_collections

from bonejax.train import augment3d, configlib


def get_config(arg=None):
  a = configlib.parse_arg(arg, smoke=False)
  c = configlib.default_config()
  c.phantom.num_scans = 5
  c.phantom.shape = (96, 128, 128)
  c.phantom.kind = "bone"
  c.phantom.seed = 0
  c.val_fraction = 0.2

  c.model.name = "unet3d_resnet18"
  c.model.kwargs = dict()
  c.dtype = "bfloat16"  # GPUs; use float32 on a CPU
  c.patch_size = 64                # a cube: 64^3 voxels
  c.batch_size = 4
  c.num_steps = 2000
  c.loss = dict(ce=1.0, dice=1.0)
  c.optimizer.lr = 1e-3
  c.schedule.name = "cosine"
  c.schedule.warmup_steps = 50
  c.schedule.final_lr_fraction = 0.05
  c.augment = ml_collections.ConfigDict(dataclasses.asdict(augment3d.AugmentConfig3d()))

  # 3D-only fields (read by the trainer's 3D hook).
  c.patches_per_scan = 64          # records per training scan per epoch
  c.foreground = 1 / 3             # share of crops centred on a voxel of a class > 0
  c.val_max_crops = 0              # 0: the whole validation scans, as a grid of crops
  c.predict_window = 96            # sliding-window side for 3D prediction
  c.predict_overlap = 0.5

  c.eval_every = 200
  c.val_batch_size = 2
  c.log_every = 25
  c.checkpoint_every = 200
  c.early_stopping_patience = 0

  if a.smoke:
    c.phantom.num_scans = 3
    c.phantom.shape = (32, 48, 48)
    c.model.name = "unet3d"
    c.model.kwargs = dict(depth=2, width=4)
    c.dtype = "float32"
    c.patch_size = 16
    c.batch_size = 4
    c.num_steps = 4
    c.patches_per_scan = 8
    c.schedule.warmup_steps = 0
    c.eval_every = 2
    c.checkpoint_every = 2
    c.log_every = 2
    c.val_max_crops = 4
    c.predict_window = 16
  return c
