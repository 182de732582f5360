"""Tests for launch/convert_weights.py and bonejax.convert: DLFit checkpoints in, smp state dicts
out, model.json from the metadata, every bad input one line with nothing written, and a BONe
U-Net-R18 predicting a phantom through launch/predict.py as smp does in torch."""

import collections
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import bonejax.convert as convert
from bonejax import models
from bonejax.core import errors
from bonejax.models import bundle
from bonejax.convert import metadata, safetensors_io, torch_pickle, weights
from smp_reference import random_smp, require

REPO = Path(__file__).resolve().parents[1]
DLFIT_META = {"architecture": "Unet", "encoder": "resnet18", "num_classes": 3, "in_channels": 1,
              "normalization": "ZScore", "patch_size": 256, "epochs": 40}


@pytest.fixture(scope="module")
def smp_sd():
  """An smp Unet-R18 state dict (1 channel, 3 classes) made from bonejax weights, no torch."""
  model = models.fill_from_numpy(models.abstract_model(
      models.create, "unet_resnet18", num_classes=3, in_channels=1), seed=1)
  return weights.state_dict_from_model("unet_resnet18", model)


def _dlfit(path, sd, meta=None):
  torch_pickle.save({"model_state": collections.OrderedDict(sd),
                     "metadata": DLFIT_META if meta is None else meta}, path)
  return path


def _cli(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, str(REPO / "launch" / "convert_weights.py"), *args],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def _nothing_written(out: Path):
  assert not out.exists()
  assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_cli_dlfit_to_bundle_and_back(tmp_path, smp_sd):
  src = _dlfit(tmp_path / "bp.pth", smp_sd)
  r = _cli(f"--pth={src}", f"--out={tmp_path / 'bundle'}", "--classes=background,bone,pores")
  assert r.returncode == 0, r.stderr[-2000:]
  result = json.loads(r.stdout.strip().splitlines()[-1])
  assert result["bundle"] == str(tmp_path / "bundle") and result["arch"] == "unet_resnet18"
  assert result["params"] == 14_322_227
  meta = bundle.read_meta(tmp_path / "bundle")
  assert meta["model"] == "unet_resnet18" and meta["classes"] == ["background", "bone", "pores"]
  assert (meta["in_channels"], meta["context_slices"], meta["normalization"],
          meta["patch_size"]) == (1, 0, "zscore_nonzero", 256)
  assert meta["source"]["kind"] == "dlfit" and meta["source"]["metadata"]["epochs"] == 40

  r = _cli(f"--bundle={tmp_path / 'bundle'}", f"--to_pth={tmp_path / 'back.pth'}")
  assert r.returncode == 0, r.stderr[-2000:]
  result = json.loads(r.stdout.strip().splitlines()[-1])
  assert (result["pth"], result["arch"], result["params"]) == (
      str(tmp_path / "back.pth"), "unet_resnet18", 14_322_227)
  assert result["smp"] == {"class": "Unet", "encoder_name": "resnet18", "in_channels": 1,
                           "classes": 3}
  back = torch_pickle.load(tmp_path / "back.pth")
  assert set(back) == set(smp_sd)
  for k, v in smp_sd.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_safetensors_and_bare_state_dicts_carry_over(tmp_path, smp_sd):
  torch_pickle.save(smp_sd, tmp_path / "bare.pth")
  r = convert.import_weights(tmp_path / "bare.pth", tmp_path / "a", normalization="percentile")
  meta = bundle.read_meta(tmp_path / "a")
  assert r["arch"] == "unet_resnet18" and r["source_kind"] == "state_dict"
  assert meta["classes"] == ["background", "class_1", "class_2"]
  assert meta["normalization"] == "percentile"
  # bonejax's own .safetensors keep classes, normalisation and 2.5D context in their metadata.
  convert.export_weights(tmp_path / "a", tmp_path / "a.safetensors")
  tensors, st_meta = safetensors_io.load(tmp_path / "a.safetensors")
  assert set(tensors) == set(smp_sd) and json.loads(st_meta["classes"])[0] == "background"
  convert.import_weights(tmp_path / "a.safetensors", tmp_path / "b")
  meta_b = bundle.read_meta(tmp_path / "b")
  for key in ("model", "classes", "in_channels", "normalization", "patch_size",
              "context_slices"):
    assert meta_b[key] == meta[key], key
  # A DataParallel / DDP checkpoint: every key prefixed with `module.`.
  torch_pickle.save({"state_dict": {f"module.{k}": v for k, v in smp_sd.items()}, "epoch": 3},
                    tmp_path / "ddp.pth")
  assert convert.import_weights(tmp_path / "ddp.pth", tmp_path / "c")["source_kind"] == \
      "checkpoint"


def test_metadata_spellings_2p5d_and_minmax():
  info = metadata.interpret({"model": {"Architecture": "UNet++", "Encoder_Name": "ResNet34"},
                             "Class Names": ["bg", "bone"], "2.5D depth": 5,
                             "normalisation": "minMax", "patch_size": [512, 512]})
  assert info == {"arch": ("UnetPlusPlus", "resnet34"), "class_names": ["bg", "bone"],
                  "num_classes": 2, "in_channels": 5, "context_slices": 2,
                  "normalization": "percentile", "normalization_source": "minMax",
                  "patch_size": 512}
  assert metadata.interpret({"arch": "Segformer", "backbone": "mit_b0"})["arch"] == \
      ("Segformer", "mit_b0")
  with pytest.raises(errors.UserError, match="odd"):
    metadata.interpret({"slices": 4})
  with pytest.raises(errors.UserError, match="'histogram' has no bonejax counterpart"):
    metadata.interpret({"normalization": "histogram"})


def test_2p5d_checkpoint_keeps_its_depth(tmp_path):
  model = models.fill_from_numpy(models.abstract_model(
      models.create, "unet_resnet18", num_classes=2, in_channels=5))
  sd = weights.state_dict_from_model("unet_resnet18", model)
  _dlfit(tmp_path / "m.pth", sd, {"architecture": "Unet", "encoder": "resnet18",
                                  "num_slices": 5, "normalization": "minMax"})
  r = convert.import_weights(tmp_path / "m.pth", tmp_path / "b")
  meta = bundle.read_meta(tmp_path / "b")
  assert (r["in_channels"], meta["in_channels"], meta["context_slices"]) == (5, 5, 2)
  assert (meta["normalization"], meta["normalization_source"]) == ("percentile", "minMax")


def _gadget_pth(path):
  class Gadget:
    def __reduce__(self):
      return (os.system, (f"touch {path.parent / 'pwned'}",))

  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps({"model_state": Gadget()}, protocol=2))
  return path


def _bad_cases(tmp_path, sd):
  """name -> (weights file, import_weights arguments, expected message)."""
  good = _dlfit(tmp_path / "good.pth", sd)
  data = good.read_bytes()
  (tmp_path / "cut.pth").write_bytes(data[: len(data) * 2 // 3])
  extra = dict(sd, **{"decoder.extra.weight": np.zeros(3, np.float32)})
  missing = {k: v for k, v in sd.items() if k != "decoder.blocks.2.conv1.0.weight"}
  misshapen = dict(sd, **{"decoder.blocks.1.conv2.1.bias": np.zeros(5, np.float32)})
  head = {k: v for k, v in sd.items() if not k.startswith("segmentation_head")}
  return {
      "gadget": (_gadget_pth(tmp_path / "evil.pth"), {}, "refusing to unpickle (posix|os).system"),
      "truncated": (tmp_path / "cut.pth", {}, "damaged zip archive"),
      "unknown keys": (_dlfit(tmp_path / "x.pth", extra), {},
                       "1 unexpected key.*decoder.extra.weight"),
      "missing keys": (_dlfit(tmp_path / "m.pth", missing), {},
                       "1 missing key.*decoder.blocks.2.conv1.0.weight"),
      "misshapen": (_dlfit(tmp_path / "s.pth", misshapen), {},
                    r"decoder.blocks.1.conv2.1.bias has shape \(5,\)"),
      "no head": (_dlfit(tmp_path / "h.pth", head), {}, "no 4-d segmentation_head.0.weight"),
      "classes": (good, {"classes": ["a", "b"]}, "--classes names 2 classes but the weights "
                                                  "give 3"),
      "meta classes": (_dlfit(tmp_path / "c.pth", sd, dict(DLFIT_META, num_classes=4)), {},
                       "metadata says 4 classes"),
      "meta channels": (_dlfit(tmp_path / "i.pth", sd, dict(DLFIT_META, in_channels=3)), {},
                        "metadata says 3 input channels"),
      "context": (good, {"context_slices": 1}, "needs 3 input channels.*weights take 1"),
      "arch": (good, {"arch": "unetpp_resnet18"}, "--arch=unetpp_resnet18 does not fit.*"
                                                  "unet_resnet18"),
      "arch keys": (good, {"arch": "segformer_b0"}, "segformer_b0 does not fit the weights"),
      "no smp": (good, {"arch": "unet"}, "'unet' has no segmentation_models_pytorch"),
      "meta arch": (_dlfit(tmp_path / "a.pth", sd, dict(DLFIT_META, architecture="DeepLabV3+")),
                    {}, "metadata says smp DeepLabV3Plus"),
      "not smp": (_dlfit(tmp_path / "n.pth", {"fc.weight": np.zeros((2, 2), np.float32)}), {},
                  "not a segmentation_models_pytorch"),
      "normalization": (good, {"normalization": "minmax"}, "must be one of percentile, zscore"),
  }


def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path, smp_sd):
  for name, (src, kwargs, pattern) in _bad_cases(tmp_path, smp_sd).items():
    out = tmp_path / f"out-{name.replace(' ', '-')}"
    with pytest.raises(errors.UserError, match=pattern) as e:
      convert.import_weights(src, out, **kwargs)
    assert "\n" not in str(e.value), name
    _nothing_written(out)
  assert not (tmp_path / "pwned").exists()


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, smp_sd):
  cases = _bad_cases(tmp_path, smp_sd)
  for name, flag in (("gadget", None), ("classes", "--classes=a,b")):
    src = cases[name][0]
    out = tmp_path / "out"
    r = _cli(f"--pth={src}", f"--out={out}", *([flag] if flag else []))
    assert r.returncode == 2, (name, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (name, r.stderr)
    _nothing_written(out)
  existing = tmp_path / "exists.pth"
  existing.write_text("keep")
  r = _cli(f"--bundle={tmp_path}", f"--to_pth={existing}")
  assert r.returncode == 2 and "exists" in r.stderr and existing.read_text() == "keep"
  r = _cli(f"--pth={cases['gadget'][0]}", f"--to_pth={tmp_path / 'x.pth'}")
  assert r.returncode == 2 and "either" in r.stderr
  r = _cli("--help")
  assert r.returncode == 0 and "--to_pth" in r.stdout
  assert not (tmp_path / "pwned").exists()


def _tree(root: Path) -> dict[str, bytes]:
  return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def test_cli_never_writes_into_its_input(tmp_path, smp_sd):
  from bundle_helpers import make_bundle  # pylint: disable=import-outside-toplevel
  b = make_bundle(tmp_path / "b")
  before = _tree(b)
  for target in (b / "weights" / "m.pth", b / "m.safetensors"):
    r = _cli(f"--bundle={b}", f"--to_pth={target}")
    assert r.returncode == 2 and r.stderr.startswith("error: --to_pth"), r.stderr[-2000:]
    assert "lies inside the input" in r.stderr and len(r.stderr.strip().splitlines()) == 1
  src = _dlfit(tmp_path / "w.pth", smp_sd)
  kept = src.read_bytes()
  r = _cli(f"--pth={src}", f"--out={src}", "--overwrite")
  assert r.returncode == 2 and "is the input" in r.stderr, r.stderr[-2000:]
  assert _tree(b) == before and src.read_bytes() == kept


def test_export_refuses_models_smp_does_not_have(tmp_path):
  model = models.fill_from_numpy(models.abstract_model(
      models.create, "unet", num_classes=2, in_channels=1, depth=2, width=4))
  meta = bundle.make_meta(model_name="unet", model_kwargs={"depth": 2, "width": 4},
                          classes=["a", "b"], in_channels=1, normalization="percentile",
                          patch_size=64, train_axes=[0])
  bundle.save_bundle(tmp_path / "b", model, meta)
  with pytest.raises(errors.UserError, match="'unet' has no segmentation_models_pytorch"):
    convert.export_weights(tmp_path / "b", tmp_path / "u.pth")
  _nothing_written(tmp_path / "u.pth")
  with pytest.raises(errors.UserError, match="must end in"):
    convert.export_weights(tmp_path / "b", tmp_path / "u.bin")


# --- end to end: a BONe model predicts a phantom in bonejax as it does in PyTorch --------------

def test_bone_unet_r18_predicts_like_smp_in_torch(tmp_path):
  torch = require("torch")
  net, _, _ = random_smp("unet_resnet18")  # BatchNorm statistics random, as a trained model's
  import tifffile
  from bonejax import phantom
  from bonejax.data import store

  phantom.make_dataset(tmp_path / "data", num_scans=1, shape=(32, 96, 96), seed=3,
                       progress=False)
  scan = store.open_scan(tmp_path / "data" / "scan_000")
  torch.save({"model_state": net.state_dict(), "metadata": DLFIT_META}, tmp_path / "bp.pth")

  r = _cli(f"--pth={tmp_path / 'bp.pth'}", f"--out={tmp_path / 'bundle'}",
           "--classes=background,bone,pore")
  assert r.returncode == 0, r.stderr[-2000:]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, str(REPO / "launch" / "predict.py"),
                      f"--model={tmp_path / 'bundle'}", f"--input={scan.path}",
                      f"--output={tmp_path / 'pred.tif'}", "--planes=1", "--axis=0"],
                     capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  pred = tifffile.imread(tmp_path / "pred.tif")

  # smp in torch, slice by slice along Z, on the same z-scored intensities.
  stats = scan.stats
  x = (scan.read_image().astype(np.float32) - np.float32(stats["mean"])) * np.float32(
      1.0 / stats["std"])
  with torch.no_grad():
    ref = net(torch.from_numpy(x[:, None])).argmax(1).numpy()
  assert pred.shape == ref.shape == scan.shape
  shares = np.bincount(ref.ravel(), minlength=3) / ref.size
  assert (shares > 0.05).sum() >= 2, shares  # the check means something only if labels vary
  agreement = float((pred == ref).mean())
  assert agreement >= 0.999, agreement
