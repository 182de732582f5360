r"""BONe's DLFit recipe: U-Net / ResNet-18, 256-px patches, Adam 1e-3 on a cosine, Jaccard loss.

    python launch/train.py --config=configs/bone_dlfit.py --workdir=/tmp/bone-dlfit \
        --config.dataset=DATA [--config.val_scans="('scan_007','scan_012')"]
    # fine-tune BONe's published model on new scans (the same network and class count):
    python launch/train.py --config=configs/bone_dlfit.py --workdir=/tmp/bp2d03-ft \
        --config.dataset=DATA --config.model.init_from=BP-2D-03.pth
    # from an ImageNet ResNet-18 (a torchvision state dict), the decoder alone for 1000 steps:
    python launch/train.py --config=configs/bone_dlfit.py --workdir=/tmp/bone-in1k \
        --config.dataset=DATA --config.model.encoder_weights=resnet18-f37072fd.pth \
        --config.model.freeze_encoder_steps=1000
    # 2.5D: 2k + 1 adjacent planes as channels (BONe: 3 to 9 planes), here 5:
    python launch/train.py --config=configs/bone_dlfit.py:context=2 --workdir=/tmp/bone-25d ...

DLFit's defaults (as issue 12 lists them; DLFit's source is not public): smp U-Net with a
ResNet-18 encoder, 256 x 256 patches, 4 per slice, batch 32, Adam with lr 1e-3 and a cosine
schedule down to 1e-6, Jaccard (IoU) loss, mixed precision (bf16 here), z-score normalisation
with the statistics of the voxels > 0 (the zero padding of reconstructed scans left out:
`zscore_nonzero`), and per slice ONE geometric operation drawn from the table none / flip H /
flip V / rot90 / rot180 / rot270 (uniformly: the table's weights are an assumption), an intensity
shift in +-0.15 and a scale in [0.75, 1.25] each with probability 0.4, then a clip to [-5, 5].
The best model is the one with the highest validation mean IoU over ALL classes (background
included), as DLFit selects it (`best_metric=miou_all`; `miou_fg` stays reported).
The clip bounds the augmented training inputs; the predictor does not clip (voxels beyond 5
standard deviations, e.g. metal, reach the model unclipped). Planes of all three axes are
trained (for 3-plane voting; which axes DLFit samples is not documented). DLFit counts epochs;
here `num_steps` (50,000 batches of 32) is a placeholder to set for the dataset at hand. Not run
at full size here (no GPU in this session): no run time or IoU is claimed; BONe's benchmark
reports mean IoU ~0.97 for its best models on its 20-scan dataset.

Arguments (`:a=1,b=2`): context (2.5D planes each side, 0: 2D), smoke.
Smoke variant (a phantom made in WORKDIR/data, the same recipe on a tiny classic U-Net with 32-px
patches for 4 steps; 19 s wall on 2 shared CPU cores, most of it compiling):
`--config=configs/bone_dlfit.py:smoke`.
"""

from bonejax.train import configlib

# BONe's table of geometric operations, one drawn per slice.
BONE_GEOMETRY = ("none", "flip_h", "flip_v", "rot90", "rot180", "rot270")


def get_config(arg=None):
  a = configlib.parse_arg(arg, context=0, smoke=False)
  c = configlib.default_config()
  c.model.name = "unet_resnet18"
  c.model.kwargs = {}
  c.dtype = "bfloat16"
  c.normalization = "zscore_nonzero"
  c.context_slices = a.context
  c.axes = (0, 1, 2)
  c.patch_size = 256
  c.patches_per_plane = 4
  c.batch_size = 32
  c.num_steps = 50_000
  c.loss = dict(jaccard=1.0)
  c.optimizer = dict(name="adam", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                     momentum=0.9, nesterov=False, clip_norm=0.0)
  c.schedule.name = "cosine"
  c.schedule.warmup_steps = 0
  c.schedule.final_lr_fraction = 1e-6 / 1e-3  # down to 1e-6
  c.augment.update(dict(
      crop=False, flip_h=False, flip_v=False, rot90=False, rotate_degrees=0.0,
      elastic_prob=0.0, contrast=0.0, gamma=0.0, noise_std=0.0,
      one_of=BONE_GEOMETRY, brightness=0.15, brightness_prob=0.4, scale=(0.75, 1.25),
      scale_prob=0.4, clip=(-5.0, 5.0)))
  c.eval_every = 1000
  c.val_axes = (0,)
  c.val_stride = 2
  c.val_batch_size = 32
  c.best_metric = "miou_all"
  c.early_stopping_patience = 0
  c.checkpoint_every = 1000
  c.log_every = 100

  if a.smoke:
    c.phantom.num_scans = 3
    c.phantom.shape = (32, 64, 64)
    c.model.name = "unet"
    c.model.kwargs = dict(depth=2, width=4)
    c.dtype = "float32"  # CPU: bf16 convolutions are emulated and slower
    c.patch_size = 32
    c.batch_size = 4
    c.val_batch_size = 4
    c.num_steps = 4
    c.eval_every = 2
    c.checkpoint_every = 2
    c.log_every = 1
    c.val_stride = 8
  return c
