"""The 3D models: unet3d_resnet18 against segmentation_models_pytorch_3d, unet3d against torch.

smp-3d cannot share the dev environment (it pins timm 0.9.7), so its side is a committed fixture
(tests/fixtures/make_smp3d_reference.py, run in its own environment): its key list, parameter
count, and its logits on a fixed 32^3 input for weights that both sides draw from the same
seeded numpy generator. The bonejax side goes the whole converter path: state dict -> `.pth`
(torch's zip format) -> bundle -> logits, and bundle -> `.pth` -> the very same tensors.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bonejax import convert, models
from bonejax.convert import checkpoint, smp_layout, torch_pickle, weights
from bonejax.core import errors
from bonejax.models import bundle
from fixtures.make_smp3d_reference import OUT, scaled_head, seeded_state_dict
from smp_reference import require

ATOL = 1e-4


@pytest.fixture(scope="module")
def reference():
  with np.load(OUT, allow_pickle=False) as f:
    meta = json.loads(str(f["meta"]))
    return f["x"], f["logits"], meta


def _forward(model, x_ncdhw):
  graphdef, state = nnx.split(model)
  out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(
      state, jnp.asarray(x_ncdhw.transpose(0, 2, 3, 4, 1)))
  return np.asarray(out).transpose(0, 4, 1, 2, 3)


def test_layout_and_parameter_count_are_smp3d(reference):
  _, _, meta = reference
  model = models.abstract_model(models.create, "unet3d_resnet18", num_classes=meta["classes"],
                                in_channels=meta["in_channels"])
  assert models.spatial_dims("unet3d_resnet18") == 3 and models.spatial_dims("unet_resnet18") == 2
  assert models.count_params(model) == meta["params"] == 42_611_987
  entries, bns = smp_layout.layout("unet3d_resnet18", model)
  expected = {k: tuple(s) for k, s in meta["shapes"].items()}
  got = {e.key: e.torch_shape for e in entries}
  got.update({f"{b}.num_batches_tracked": () for b in bns})
  assert got == expected


def test_pth_in_logits_parity_and_pth_out(reference, tmp_path):
  x, ref, meta = reference
  sd = scaled_head(seeded_state_dict({k: tuple(s) for k, s in meta["shapes"].items()}),
                   meta["head_scale"])
  assert smp_layout.recognise_name(sd) == "unet3d_resnet18"
  torch_pickle.save(sd, tmp_path / "smp3d.pth")
  res = convert.import_weights(tmp_path / "smp3d.pth", tmp_path / "bundle")
  assert res["arch"] == "unet3d_resnet18" and res["params"] == meta["params"]
  assert res["smp"]["package"] == "segmentation_models_pytorch_3d"
  assert res["patch_size"] == convert.DEFAULT_PATCH_3D

  b = bundle.load_bundle(tmp_path / "bundle")
  out = _forward(b.model, x)
  assert out.shape == ref.shape == (1, 3, 32, 32, 32)
  err = float(np.abs(out - ref).max())
  assert err < ATOL, f"max abs logit difference to smp-3d {err:.2e} (logit std {ref.std():.2f})"

  convert.export_weights(tmp_path / "bundle", tmp_path / "back.pth")
  back = checkpoint.read(tmp_path / "back.pth").state_dict
  assert set(back) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(np.asarray(back[k]), v, err_msg=k)


def test_2d_weights_are_not_taken_for_3d():
  """The keys of smp's 2D and 3D U-Nets are the same: the kernels' rank tells them apart."""
  model2d = models.abstract_model(models.create, "unet_resnet18", num_classes=2, in_channels=1)
  entries, bns = smp_layout.layout("unet_resnet18", model2d)
  sd = {e.key: np.zeros(e.torch_shape, np.float32) for e in entries}
  assert smp_layout.recognise_name(sd) == "unet_resnet18"
  with pytest.raises(errors.UserError, match=r"\(256, 768, 3, 3\), \(256, 768, 3, 3, 3\) expected"):
    weights.check_keys("unet3d_resnet18", *smp_layout.layout(
        "unet3d_resnet18", models.abstract_model(models.create, "unet3d_resnet18",
                                                 num_classes=2, in_channels=1)), sd)


# ---------------------------------------------------------------------------------------------
# The classic 3D U-Net against the same network written in torch.
# ---------------------------------------------------------------------------------------------


def _torch_unet3d(torch, depth, width, cin, k):
  nn = torch.nn

  def block(a, b):
    return nn.Sequential(nn.Conv3d(a, b, 3, padding=1, bias=False), nn.BatchNorm3d(b), nn.Mish(),
                         nn.Conv3d(b, b, 3, padding=1, bias=False), nn.BatchNorm3d(b), nn.Mish())

  chans = [width * 2**i for i in range(depth)]

  class Net(nn.Module):

    def __init__(self):
      super().__init__()
      self.down = nn.ModuleList([block(a, b) for a, b in zip([cin] + chans[:-1], chans)])
      self.up = nn.ModuleList([nn.ConvTranspose3d(chans[i + 1], chans[i], 2, stride=2)
                               for i in reversed(range(depth - 1))])
      self.up_blocks = nn.ModuleList([block(2 * chans[i], chans[i])
                                      for i in reversed(range(depth - 1))])
      self.head = nn.Conv3d(width, k, 1)

    def forward(self, x):
      skips = []
      for i, b in enumerate(self.down):
        x = b(torch.nn.functional.max_pool3d(x, 2) if i else x)
        skips.append(x)
      for up, b, s in zip(self.up, self.up_blocks, reversed(skips[:-1])):
        x = b(torch.cat([up(x), s], 1))
      return self.head(x)

  return Net().eval()


def test_unet3d_matches_torch():
  torch = require("torch")
  depth, width, cin, k = 3, 4, 1, 3
  model = models.fill_from_numpy(models.abstract_model(
      models.create, "unet3d", num_classes=k, in_channels=cin, depth=depth, width=width), 1)
  model.eval()
  rng = np.random.default_rng(0)
  # Random BatchNorm statistics and affines, so that they are tested too.
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))):
    if len(var.shape) == 1:
      lo, hi = (0.5, 1.5) if path[-1] in ("scale", "var") else (-0.3, 0.3)
      var[...] = jnp.asarray(rng.uniform(lo, hi, var.shape), jnp.float32)
  net = _torch_unet3d(torch, depth, width, cin, k)

  flat = {tuple(str(getattr(p, "key", p)) for p in path): np.asarray(v[...])
          for path, v in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))}

  def conv(t, a):  # flax (kd, kh, kw, in, out) -> torch (out, in, kd, kh, kw)
    t.copy_(torch.from_numpy(a.transpose(4, 3, 0, 1, 2).copy()))

  def cbn(seq, i, prefix):
    conv(seq[i].weight, flat[prefix + ("conv", "kernel")])
    bn = seq[i + 1]
    for name, leaf in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"),
                       ("running_var", "var")):
      getattr(bn, name).copy_(torch.from_numpy(flat[prefix + ("bn", leaf)].copy()))

  with torch.no_grad():
    for tb, path in [(net.down[i], ("down", str(i))) for i in range(depth)] + \
        [(net.up_blocks[i], ("up_blocks", str(i))) for i in range(depth - 1)]:
      cbn(tb, 0, path + ("conv1",))
      cbn(tb, 3, path + ("conv2",))
    for i, up in enumerate(net.up):
      # flax's ConvTranspose (transpose_kernel=False) is torch's with the taps mirrored and
      # in/out swapped: (kd, kh, kw, in, out) -> (in, out, kd, kh, kw), flipped.
      kern = flat[("up", str(i), "kernel")][::-1, ::-1, ::-1]
      up.weight.copy_(torch.from_numpy(kern.transpose(3, 4, 0, 1, 2).copy()))
      up.bias.copy_(torch.from_numpy(flat[("up", str(i), "bias")].copy()))
    conv(net.head.weight, flat[("head", "kernel")])
    net.head.bias.copy_(torch.from_numpy(flat[("head", "bias")].copy()))
    assert models.count_params(model) == sum(p.numel() for p in net.parameters())
    x = rng.normal(size=(2, cin, 8, 12, 16)).astype(np.float32)
    ref = net(torch.from_numpy(x)).numpy()
  out = _forward(model, x)
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_unet3d_shapes_and_bad_input():
  model = models.fill_from_numpy(models.abstract_model(
      models.create, "unet3d", num_classes=2, in_channels=1, depth=2, width=2))
  assert model(jnp.zeros((1, 4, 6, 8, 1))).shape == (1, 4, 6, 8, 2)
  with pytest.raises(ValueError, match="multiples of 2"):
    model(jnp.zeros((1, 5, 6, 8, 1)))
  with pytest.raises(ValueError, match="NDHWC"):
    model(jnp.zeros((1, 6, 8, 1)))
  with pytest.raises(ValueError, match="depth"):
    models.create("unet3d", num_classes=2, rngs=nnx.Rngs(0), depth=7)


# ---- FLOPs of 3D models (bonejax summary) ----------------------------------------------------


def test_3d_flops_of_a_hand_counted_conv():
  class OneConv3d(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(2, 4, (3, 3, 3), padding="SAME", use_bias=False, rngs=rngs)

    def __call__(self, x):
      return self.conv(x)

  model = OneConv3d(nnx.Rngs(0))
  # Every tap of every output voxel, padding included: 2 x D*H*W x 27 x Cin x Cout.
  assert round(models.forward_gflops(model, (4, 6, 8), 2) * 1e9) == 2 * 4 * 6 * 8 * 27 * 2 * 4
  # XLA counts only taps inside the volume: per axis of n, 3n - 2.
  assert round(models.forward_gflops(model, (4, 6, 8), 2, convention="xla") * 1e9) == \
      2 * (3 * 4 - 2) * (3 * 6 - 2) * (3 * 8 - 2) * 2 * 4


def _unet3d_macs(side, width=4, cin=1, classes=3):
  """unet3d depth 2 by hand: two 3^3 convs per block, a 2^3 stride-2 transposed conv, a 1^3 head."""
  v, h = side**3, (side // 2)**3
  return (v * 27 * (cin * width + width * width)              # encoder block, full resolution
          + h * 27 * (width * 2 * width + 4 * width * width)  # bottom block, half resolution
          + h * 8 * 2 * width * width                         # up-conv: each input voxel, 2^3 taps
          + v * 27 * (2 * width * width + width * width)      # decoder block on the concatenation
          + v * width * classes)                              # head


def test_unet3d_summary_counts_the_3d_forward():
  import subprocess
  import sys
  abstract = models.abstract_model(models.create, "unet3d", num_classes=3, depth=2, width=4)
  assert round(models.forward_gflops(abstract, 16, 1) * 1e9) == 2 * _unet3d_macs(16)
  assert round(models.forward_gflops(abstract, (16, 8, 24), 1) * 1e9) == round(
      2 * _unet3d_macs(16) * (16 * 8 * 24) / 16**3)
  with pytest.raises(ValueError, match="takes 3D input"):
    models.forward_gflops(abstract, (16, 16), 1)
  repo = Path(__file__).resolve().parents[1]

  def summary(*args):
    return subprocess.run([sys.executable, str(repo / "launch/model_summary.py"),
                           "--model=unet3d", '--model_args={"depth": 2, "width": 4}', *args],
                          capture_output=True, text=True, timeout=120, cwd=repo)

  r = summary("--patch=16")
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["patch"] == [16, 16, 16] and out["output_shape"] == [1, 16, 16, 16, 3]
  assert out["gflops_per_patch"] == round(2 * _unet3d_macs(16) / 1e9, 4)
  assert 0 < out["xla_gflops_per_patch"] <= out["gflops_per_patch"] * 1.2
  r = summary("--patch=16,16")  # (each run costs seconds of start-up: one bad case)
  assert r.returncode == 2 and "3D model" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_unet3d_resnet18_flops_scale_with_the_voxels():
  abstract = models.abstract_model(models.create, "unet3d_resnet18", num_classes=3)
  small, large = (models.forward_gflops(abstract, s, 1) for s in (32, 64))
  # Dense counts are linear in the voxels; the 7^3 stride-2 stem alone is a lower bound.
  assert large == pytest.approx(8 * small, rel=1e-9)
  assert small > 2 * 16**3 * 64 * 343 / 1e9
