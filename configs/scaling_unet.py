r"""Scaling the U-net (Baltruschat et al. 2021): a classic U-Net scaled by depth, width and patch.

    python launch/train.py --config=configs/scaling_unet.py:depth=4,width=64,patch=384 \
        --workdir=/tmp/scaling-d4w64p384 --config.dataset=DATA

Arguments (`:a=1,b=2`): depth (levels, 1-6), width (channels of the first level), patch
(training patch side, a multiple of 32), batch (global; the paper used 32 for the smaller and 16
for the larger models), smoke. The paper's set-up: Adam (lr 3e-4, betas 0.9/0.999),
cross-entropy, the learning rate halved when the validation loss has not improved for 10^4
iterations (here: 10 evaluations, one every 1000 steps), up to 1.5e6 iterations or early
stopping; augmentation with random resized crops (85-100 % area, 3:4-4:3), flips, rotations of
+-90 degrees, elastic deformation, brightness and contrast; validation on the centre 992 x 992
crop; percentile normalisation. Weight decay is off (adam refuses it; `optimizer.name=adamw`
takes one). Model selection here is by validation miou_fg, and early stopping waits 20
evaluations without improvement of it. The validation set (centre crops of every 4th plane)
outgrows `val_device_limit_mb` on large scans and is then streamed from the host. Training
patches are cut on the GPUs while the scans fit `sampler_device_mb` (default: half of each GPU),
sharded over a host's GPUs when one cannot hold them all (a 2510 x 2510 x 2130 uint16 scan with
its labels is 40 GB: 5 GB per GPU over eight), and read on the host otherwise (one warning).
Expected: the paper's best models reach IoU ~0.9+ on its synchrotron scans; run time depends on
the model (not run here at full size: CPU only).

Smoke variant (phantom in WORKDIR/data, depth 2 width 4, seconds): `:smoke`.
"""

from bonejax.train import configlib


def get_config(arg=None):
  a = configlib.parse_arg(arg, depth=4, width=64, patch=384, batch=32, smoke=False)
  c = configlib.default_config()
  c.model.name = "unet"
  c.model.kwargs = dict(depth=a.depth, width=a.width)
  c.dtype = "bfloat16"
  c.normalization = "percentile"
  c.patch_size = a.patch
  c.batch_size = a.batch
  c.num_steps = 1_500_000
  c.loss = dict(ce=1.0)
  c.optimizer = dict(name="adam", lr=3e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                     momentum=0.9, nesterov=False, clip_norm=0.0)
  c.schedule.name = "plateau"
  c.schedule.plateau_patience = 10
  c.schedule.plateau_factor = 0.5
  c.eval_every = 1000
  c.val_axes = (0,)
  c.val_crop = 992
  c.val_stride = 4
  c.val_batch_size = 8
  c.best_metric = "miou_fg"
  c.early_stopping_patience = 20
  c.checkpoint_every = 5000
  c.log_every = 100

  if a.smoke:
    c.phantom.num_scans = 3
    c.phantom.shape = (32, 64, 64)
    c.model.kwargs = dict(depth=2, width=4)
    c.dtype = "float32"
    c.patch_size = 32
    c.batch_size = 4
    c.val_batch_size = 4
    c.num_steps = 4
    c.eval_every = 2
    c.schedule.plateau_patience = 1
    c.checkpoint_every = 2
    c.log_every = 1
    c.val_crop = 0
    c.val_stride = 8
  return c
