r"""BONe's baseline: U-Net with a ResNet-18 encoder on 256-px patches, Adam 3e-4, CE + Dice.

    python launch/train.py --config=configs/baseline.py --workdir=/tmp/bone-baseline \
        --config.dataset=DATA [--config.val_scans="('scan_007','scan_012')"]

BONe (DLFit) trains this network (14.3 M parameters, about 10.6 GFLOP forward per 256^2 patch)
on 2D patches of micro-CT planes with z-score normalisation; validation is on whole scans held
out by name (never by slice). Planes of all three axes are trained so that 3-plane voting works.
Expected: BONe reports mean IoU ~0.97 on its 20-scan dataset. Throughput is not measured on a GPU
yet: `python benchmarks/train_throughput.py` measures this network's step on the machine at hand;
the only result so far is a 2-core CPU's (benchmarks/results/train_throughput_cpu-2c.md, about
1 patch/s at fp32), so no run time for 50k steps is given here. Not run here at full size.
Input: the training scans are kept in GPU memory and the patches cut there (`sampler=auto`, the
default) when they fit half of each GPU's memory, replicated or sharded over a host's GPUs;
else they are read on the host with one warning. The batches are the same either way;
`--config.sampler=host` forces the host path, `--config.sampler_device_mb=N` sets the budget.
The optimiser is Adam without weight decay: the weight_decay=1e-4 this file used to list was
never applied by adam (now refused); use `optimizer.name=adamw` for decoupled decay.

Validation: the plane-wise evaluator ("val": axis-0 planes, every 1000 steps) and the volume
evaluator ("volume": the validation scans predicted with 3 plane sets, soft vote, every 5000).

Smoke variant (a phantom made in WORKDIR/data, 64-px patches, 2 steps; tens of seconds on a
CPU, most of it compiling): `--config=configs/baseline.py:smoke`.
"""

from bonejax.train import configlib


def get_config(arg=None):
  a = configlib.parse_arg(arg, smoke=False)
  c = configlib.default_config()
  c.model.name = "unet_resnet18"
  c.model.kwargs = {}
  c.dtype = "bfloat16"
  c.normalization = "zscore"
  c.axes = (0, 1, 2)
  c.patch_size = 256
  c.patches_per_plane = 4
  c.batch_size = 32
  c.num_steps = 50_000
  c.loss = dict(ce=1.0, dice=1.0)
  c.optimizer = dict(name="adam", lr=3e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                     momentum=0.9, nesterov=False, clip_norm=0.0)
  c.schedule.name = "constant"
  c.eval_every = 1000
  c.val_axes = (0,)
  c.val_stride = 2
  c.val_batch_size = 32
  # The metric BONe reports, 3-plane soft-voted IoU of whole validation scans, every 5th
  # plane-wise evaluation; select on it with --config.best_metric=volume/miou_fg.
  c.evaluators.volume = dict(type="volume", every_steps=5000, planes=3, vote="soft")
  c.best_metric = "miou_fg"
  c.early_stopping_patience = 10
  c.checkpoint_every = 1000
  c.log_every = 100

  if a.smoke:
    c.phantom.num_scans = 3
    c.phantom.shape = (32, 64, 64)
    c.dtype = "float32"
    c.patch_size = 64
    c.batch_size = 4
    c.val_batch_size = 4
    c.num_steps = 2
    c.eval_every = 2
    c.checkpoint_every = 2
    c.log_every = 1
    c.val_stride = 16
    c.augment.enabled = False
  return c
