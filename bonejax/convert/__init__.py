"""BONe's PyTorch models in and out of bonejax: smp weights <-> model bundles, without torch.

BONe (DLFit) trains segmentation_models_pytorch (smp) networks and saves them as `.pth`; bonejax's
U-Net, UNet++, DeepLabV3+ (ResNet-18/34/50) and MiT-B0 models (Segformer, and U-Net with a MiT
encoder) follow smp's layouts exactly, so a trained model moves either way losslessly:

    import_weights("BP-2D-03.pth", "bundle/")       # -> a bonejax bundle (model.json + orbax)
    export_weights("bundle/", "model.pth")           # -> an smp state dict (.pth or .safetensors)

`launch/convert_weights.py` is the command line. Reading never executes pickled code
(`torch_pickle`: an allow-list unpickler); neither direction imports torch. The architecture
comes from the state dict's keys (or is checked against `arch` when given); classes, 2.5D depth,
normalisation and patch size come from DLFit's metadata (`metadata`) or the arguments.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from bonejax.core import errors, outputs
from bonejax.io import intensity
from bonejax.convert import checkpoint, metadata, smp_layout

DEFAULT_PATCH = 256  # BONe's default patch side
DEFAULT_PATCH_3D = 128  # a 3D window's side (smp-3d models); 256^3 would not fit a GPU
DEFAULT_NORMALIZATION = "zscore_nonzero"  # BONe's default: z-score over the voxels > 0
EXPORT_SUFFIXES = (".pth", ".pt", ".safetensors")

__all__ = ["export_weights", "import_weights", "smp_kwargs"]


def _classes(names: Sequence[str] | None, meta_names: list[str] | None, n: int,
             head: str) -> list[str]:
  if names:
    if len(names) != n:
      raise errors.UserError(f"--classes names {len(names)} classes but the weights give {n} "
                          f"({head} has {n} output channels)")
    return list(names)
  if meta_names:
    if len(meta_names) != n:
      raise errors.UserError(f"the metadata names {len(meta_names)} classes but the weights give {n}")
    return meta_names
  return ["background"] + [f"class_{i}" for i in range(1, n)]


def _context(info: dict[str, Any], context_slices: int | None, in_channels: int) -> int:
  """2.5D: k slices each side of the plane, 2k + 1 input channels; 0 for a 2D model."""
  if context_slices is not None:
    k = int(context_slices)
  elif info.get("context_slices") is not None:
    k = int(info["context_slices"])
  elif info.get("mode_25d") and in_channels % 2 == 1:
    k = (in_channels - 1) // 2
  else:
    return 0  # 2D (more than one channel is then a multi-channel input, not slices)
  if k < 0 or 2 * k + 1 != in_channels:
    raise errors.UserError(f"a 2.5D context of {k} slice(s) each side needs {2 * k + 1} input "
                        f"channels, but the weights take {in_channels}")
  return k


def _recognised(sd: dict[str, Any]) -> str | None:
  try:
    return smp_layout.recognise_name(sd)
  except errors.UserError:
    return None


def import_weights(path: str | os.PathLike, out: str | os.PathLike, *, arch: str | None = None,
                   classes: Sequence[str] | None = None, normalization: str | None = None,
                   patch_size: int | None = None, context_slices: int | None = None,
                   overwrite: bool = False) -> dict[str, Any]:
  """Converts a DLFit checkpoint, smp state dict or .safetensors into a bundle at `out`."""
  outputs.check_output(out, overwrite, inputs=[path])
  if normalization is not None and normalization not in intensity.RULES:
    raise errors.UserError(f"--normalization={normalization!r} must be one of "
                        f"{', '.join(intensity.RULES)}")
  ckpt = checkpoint.read(path)
  info = metadata.interpret(ckpt.metadata)
  sd = ckpt.state_dict

  if arch is not None or info.get("bonejax_model") in smp_layout.CONVERTIBLE:
    name = arch or info["bonejax_model"]
    smp_layout.smp_arch(name)  # known and convertible
    seen = _recognised(sd)
    if seen is not None and seen != name:
      given = f"--arch={name}" if arch else f"the metadata's model {name}"
      raise errors.UserError(f"{given} does not fit the weights: their keys are those of "
                          f"{seen} (smp {'/'.join(smp_layout.smp_arch(seen))})")
  else:
    name = smp_layout.recognise_name(sd)
  if info.get("arch") and info["arch"] in smp_layout.BY_SMP and \
      smp_layout.BY_SMP[info["arch"]] != name:
    c, e = info["arch"]
    raise errors.UserError(f"the metadata says smp {c} with encoder {e}, but the weights are "
                        f"taken as {name}")
  for key in (smp_layout.head_key(name), smp_layout.stem_key(name)):
    rank = smp_layout.kernel_ndim(name)
    if key not in sd or len(sd[key].shape) != rank:
      smp_class, encoder = smp_layout.smp_arch(name)
      raise errors.UserError(f"the weights do not fit {name} (smp {smp_class}, encoder {encoder}): "
                          f"no {rank}-d {key}")
  num_classes = int(sd[smp_layout.head_key(name)].shape[0])
  in_channels = int(sd[smp_layout.stem_key(name)].shape[1])
  names = _classes(classes, info.get("class_names"), num_classes, smp_layout.head_key(name))
  if info.get("num_classes") not in (None, num_classes):
    raise errors.UserError(f"the metadata says {info['num_classes']} classes but the weights give "
                        f"{num_classes}")
  if info.get("in_channels") not in (None, in_channels):
    raise errors.UserError(f"the metadata says {info['in_channels']} input channels (or 2.5D "
                        f"slices) but the weights take {in_channels}")
  k = _context(info, context_slices, in_channels)
  kwargs = smp_layout.infer_kwargs(name, sd)
  # jax, flax and orbax only from here on: bad input above fails in a fraction of a second.
  from bonejax import models  # pylint: disable=import-outside-toplevel
  from bonejax.models import bundle
  from bonejax.convert import weights  # pylint: disable=import-outside-toplevel
  model = weights.model_from_state_dict(name, sd, num_classes=num_classes,
                                        in_channels=in_channels, model_kwargs=kwargs)
  rule = normalization or info.get("normalization") or DEFAULT_NORMALIZATION
  extra: dict[str, Any] = {"context_slices": k, "source": ckpt.source()}
  if info.get("normalization_source") and normalization is None:
    extra["normalization_source"] = info["normalization_source"]
  meta = bundle.make_meta(model_name=name, model_kwargs=kwargs, classes=names,
                          in_channels=in_channels, normalization=rule,
                          patch_size=int(patch_size or info.get("patch_size") or (
                              DEFAULT_PATCH if smp_layout.kernel_ndim(name) == 4
                              else DEFAULT_PATCH_3D)),
                          train_axes=info.get("train_axes", [0]), **extra)
  bundle.save_bundle(out, model, meta)
  smp_class, encoder = smp_layout.smp_arch(name)
  return {"bundle": str(out), "arch": name, "params": models.count_params(model),
          "smp": {"class": smp_class, "encoder_name": encoder, **_package(name),
                  **smp_kwargs(name, kwargs)},
          "in_channels": in_channels, "context_slices": k, "classes": names,
          "normalization": rule, "patch_size": meta["patch_size"], "source_kind": ckpt.kind,
          **({"normalization_source": extra["normalization_source"]}
             if "normalization_source" in extra else {})}


def _package(name: str) -> dict[str, str]:
  """{"package": ...} for a model of another package than smp (smp-3d's 3D models)."""
  pkg = smp_layout.package(name)
  return {} if pkg == "segmentation_models_pytorch" else {"package": pkg}


def smp_kwargs(name: str, model_kwargs: dict[str, Any]) -> dict[str, Any]:
  """smp constructor arguments that reproduce a bonejax model's non-default arguments."""
  smp_class, _ = smp_layout.smp_arch(name)
  out = {}
  if "decoder_channels" in model_kwargs:
    key = "decoder_segmentation_channels" if smp_class == "Segformer" else "decoder_channels"
    out[key] = model_kwargs["decoder_channels"]
  if "atrous_rates" in model_kwargs:
    out["decoder_atrous_rates"] = list(model_kwargs["atrous_rates"])
  return out


def export_weights(bundle_dir: str | os.PathLike, to: str | os.PathLike, *,
                   overwrite: bool = False) -> dict[str, Any]:
  """Writes a bundle's model as an smp state dict: `.pth` (torch.save format) or `.safetensors`."""
  to = Path(to)
  if to.suffix.lower() not in EXPORT_SUFFIXES:
    raise errors.UserError(f"--to_pth={str(to)!r} must end in {', '.join(EXPORT_SUFFIXES)}")
  outputs.check_output(to, overwrite, inputs=[bundle_dir])
  errors.require_exists(bundle_dir, "model bundle")
  from bonejax import models  # pylint: disable=import-outside-toplevel
  from bonejax.models import bundle
  from bonejax.convert import safetensors_io, torch_pickle, weights  # pylint: disable=C0415
  meta = bundle.read_meta(bundle_dir)
  name = meta["model"]
  smp_class, encoder = smp_layout.smp_arch(name)
  b = bundle.load_bundle(bundle_dir)
  sd = weights.state_dict_from_model(name, b.model)
  smp = {"class": smp_class, "encoder_name": encoder, **_package(name),
         "in_channels": b.in_channels,
         "classes": b.num_classes, **smp_kwargs(name, meta.get("model_kwargs", {}))}
  with outputs.atomic_output(to, overwrite=overwrite, inputs=[bundle_dir]) as tmp:
    if to.suffix.lower() == ".safetensors":
      info = {"format": "pt", "bonejax_model": name, "smp_class": smp_class,
              "encoder_name": encoder, "in_channels": b.in_channels, "classes": b.classes,
              "normalization": b.normalization, "patch_size": meta.get("patch_size"),
              "context_slices": meta.get("context_slices", 0)}
      safetensors_io.save(sd, tmp, {k: v if isinstance(v, str) else json.dumps(v)
                                    for k, v in info.items() if v is not None})
    else:
      torch_pickle.save(sd, tmp)
  return {"pth": str(to), "arch": name, "params": models.count_params(b.model), "smp": smp,
          "tensors": len(sd)}
