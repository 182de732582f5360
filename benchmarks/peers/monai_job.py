"""One measured job of the PyTorch/MONAI peer, in its own process (run by compare.py).

    python benchmarks/peers/monai_job.py --job=train --scan=DATA/scan_000 --patch=256 --batch=16
    python benchmarks/peers/monai_job.py --job=predict --scan=DATA/scan_000 --patch=256 --batch=16

The peer is what a PyTorch user would write with MONAI: `FlexibleUNet` with a ResNet-18 encoder
(pretrained=False), 1 input channel, 3 classes, 2D; Adam + cross-entropy; prediction with
`sliding_window_inference` (its default overlap 0.25, roi = patch) over the slices along each
of the three axes, softmax probabilities summed over the axes, then argmax (3-plane soft vote).

`--variant` picks the numerics and layout: fp32 | bf16 (torch.autocast) | fp32_cl | bf16_cl
(channels_last). The last stdout line is a JSON object (throughput, parameters, peak memory).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from absl import flags  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.peers import volume  # noqa: E402
from bonejax.cli import runner  # noqa: E402
from bonejax.core import errors
from bonejax.data import store

VARIANTS = ("fp32", "bf16", "fp32_cl", "bf16_cl")

_JOB = flags.DEFINE_enum("job", "train", ["train", "predict"], "What to measure.")
_SCAN = flags.DEFINE_string("scan", None, "Scan directory (zarr v3 group) to train/predict on.")
_PATCH = flags.DEFINE_integer("patch", 256, "Patch (and sliding-window roi) side in pixels.")
_BATCH = flags.DEFINE_integer("batch", 16, "Training batch and sliding-window batch size.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed training steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed training steps first.")
_RUNS = flags.DEFINE_integer("runs", 2, "Prediction runs; the first is 'cold'.")
_CHUNK = flags.DEFINE_integer("chunk", 32, "Slices handed to sliding_window_inference per call.")
_VARIANT = flags.DEFINE_enum("variant", "fp32", VARIANTS, "Numerics and memory layout.")
_BACKBONE = flags.DEFINE_string("backbone", "resnet18", "FlexibleUNet backbone.")
_CLASSES = flags.DEFINE_integer("num_classes", 3, "Output classes.")
_THREADS = flags.DEFINE_integer("threads", 0, "torch CPU threads (0 = all usable cores).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for weights and patch sampling.")


def build(torch, device, variant: str, backbone: str, num_classes: int):
  from monai.networks.nets import FlexibleUNet
  torch.manual_seed(_SEED.value)
  model = FlexibleUNet(in_channels=1, out_channels=num_classes, backbone=backbone,
                       pretrained=False, spatial_dims=2).to(device)
  if variant.endswith("_cl"):
    model = model.to(memory_format=torch.channels_last)
  return model


def _autocast(torch, device, variant: str):
  return torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant.startswith("bf16"))


def _sync(torch, device) -> None:
  if device.type == "cuda":
    torch.cuda.synchronize()


def train_job(torch, device, model, image, labels) -> dict:
  variant, patch, batch = _VARIANT.value, _PATCH.value, _BATCH.value
  fmt = torch.channels_last if variant.endswith("_cl") else torch.contiguous_format
  pool = volume.patch_pool(image, labels, patch, batch, num_batches=4, seed=_SEED.value,
                           num_classes=_CLASSES.value)
  pin = device.type == "cuda"
  pool = [(torch.from_numpy(x[:, None]), torch.from_numpy(y).long()) for x, y in pool]
  if pin:
    pool = [(x.pin_memory(), y.pin_memory()) for x, y in pool]
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  loss_fn = torch.nn.CrossEntropyLoss()
  model.train()

  def step(i: int):
    x, y = pool[i % len(pool)]
    x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
    y = y.to(device, non_blocking=True)
    opt.zero_grad(set_to_none=True)
    with _autocast(torch, device, variant):
      logits = model(x)
    loss = loss_fn(logits.float(), y)
    loss.backward()
    opt.step()
    return loss

  t0 = time.perf_counter()
  for i in range(_WARMUP.value):
    loss = step(i)
  _sync(torch, device)
  warmup_s = time.perf_counter() - t0
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  t0 = time.perf_counter()
  for i in range(_STEPS.value):
    loss = step(i)
  final_loss = float(loss.detach())
  _sync(torch, device)
  seconds = time.perf_counter() - t0
  return {"patches_per_second": _STEPS.value * batch / seconds, "seconds": seconds,
          "steps": _STEPS.value, "warmup_seconds": warmup_s, "final_loss": final_loss}


def predict_volume(torch, device, model, image: np.ndarray, num_classes: int) -> np.ndarray:
  """3-plane soft vote with sliding_window_inference on the slices along each axis."""
  from monai.inferers import sliding_window_inference
  variant, patch, batch, chunk = _VARIANT.value, _PATCH.value, _BATCH.value, _CHUNK.value
  fmt = torch.channels_last if variant.endswith("_cl") else torch.contiguous_format

  def predictor(x):
    return torch.softmax(model(x.contiguous(memory_format=fmt)).float(), dim=1)

  probs = np.zeros((num_classes,) + image.shape, np.float32)
  with torch.inference_mode(), _autocast(torch, device, variant):
    for axis in range(3):
      slices = np.moveaxis(image, axis, 0)
      acc = np.moveaxis(probs, axis + 1, 1)  # (C, N, H, W) view into probs
      for s in range(0, slices.shape[0], chunk):
        x = torch.from_numpy(np.ascontiguousarray(slices[s:s + chunk]))[:, None].to(device)
        p = sliding_window_inference(x, roi_size=(patch, patch), sw_batch_size=batch,
                                     predictor=predictor)
        acc[:, s:s + chunk] += p.float().permute(1, 0, 2, 3).cpu().numpy()
  return probs.argmax(0).astype(np.uint8)


def predict_job(torch, device, model, scan) -> dict:
  """Raw scan in memory -> labels in memory; normalisation is inside the timed block, as it is
  inside bonejax's predictor. The first run is 'cold', the median of the rest is reported."""
  from bonejax.io import intensity
  model.eval()
  raw = scan.read_image()
  times = []
  for _ in range(max(1, _RUNS.value)):
    t0 = time.perf_counter()
    image = intensity.normalize(raw, scan.stats, "percentile").astype(np.float32)
    labels = predict_volume(torch, device, model, image, _CLASSES.value)
    _sync(torch, device)
    times.append(time.perf_counter() - t0)
  warm = times[1:] or times
  seconds = common.median(warm)
  return {"voxels_per_second": raw.size / seconds, "seconds": seconds, "run_seconds": times,
          "cold_seconds": times[0],
          "api": "monai.inferers.sliding_window_inference(overlap=0.25) x 3 axes, soft",
          "label_counts": np.bincount(labels.ravel()).tolist()}


def main(argv):
  del argv
  if not _SCAN.value:
    raise errors.UserError("--scan is required")
  t_start = time.perf_counter()
  import torch  # only here: the bonejax package never imports torch
  threads = _THREADS.value or common.usable_cores()
  torch.set_num_threads(threads)
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  model = build(torch, device, _VARIANT.value, _BACKBONE.value, _CLASSES.value)
  params = sum(p.numel() for p in model.parameters() if p.requires_grad)
  scan = store.open_scan(_SCAN.value)
  if _JOB.value == "train":
    image, labels = volume.load_scan(_SCAN.value)
    result = train_job(torch, device, model, image, labels)
  else:
    result = predict_job(torch, device, model, scan)
  result.update({
      "framework": "pytorch+monai", "job": _JOB.value, "variant": _VARIANT.value,
      "model": f"monai.FlexibleUNet({_BACKBONE.value})", "params": int(params),
      "patch": _PATCH.value, "batch": _BATCH.value, "volume": list(scan.shape),
      "device": str(device), "threads": threads, "torch": torch.__version__,
      "peak_rss_mb": common.peak_rss_mb(),
      "peak_device_mb": (torch.cuda.max_memory_allocated() / 2**20
                         if device.type == "cuda" else None),
      "process_seconds": time.perf_counter() - t_start,
  })
  return result


if __name__ == "__main__":
  runner.run(main)
