"""The Mix Transformer encoder MiT-B0 (NVlabs/SegFormer, as vendored by smp as `mit_b0`).

Xie et al. 2021, "SegFormer: Simple and Efficient Design for Semantic Segmentation with
Transformers". Four stages of overlapping patch embeddings (7x7 stride 4, then 3x3 stride 2;
conv + LayerNorm), transformer blocks with efficient self-attention (keys/values from a map shrunk
by a strided conv, reduction ratios 8/4/2/1) and Mix-FFN (linear, 3x3 depthwise conv, GELU,
linear), a LayerNorm after each stage; dims 32/64/160/256, depths 2/2/2/2, heads 1/2/5/8, MLP
ratio 4, stochastic depth up to 0.1 (smp's default). LayerNorm eps as smp: 1e-6 in the blocks and
after each stage, 1e-5 in the patch embeddings and the attention's reduction.

Shared by `segformer_b0` (smp.Segformer) and `unet_mit_b0` (smp.Unet with encoder "mit_b0").
Tokens stay in NHWC layout throughout: the linear layers act on the channel axis and the
convolutions need no reshapes. Attention uses `jax.nn.dot_product_attention`, which XLA (or
cuDNN) fuses on GPU. Stochastic depth draws from the model's own `dropout` RNG stream.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from bonejax.models.layers import activation, conv2d, edge_dtype, layer_norm, linear

MIT_B0 = dict(dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), heads=(1, 2, 5, 8),
              sr_ratios=(8, 4, 2, 1))


class Attention(nnx.Module):
  """Efficient multi-head self-attention with spatial reduction of the keys and values."""

  def __init__(self, dim: int, heads: int, sr: int, **kw):
    self.heads, self.sr = heads, sr
    self.q = linear(dim, dim, **kw)
    self.kv = linear(dim, 2 * dim, **kw)
    self.proj = linear(dim, dim, **kw)
    if sr > 1:
      self.reduce = conv2d(dim, dim, sr, stride=sr, padding=0, bias=True, **kw)
      self.norm = layer_norm(dim, 1e-5, **kw)

  def __call__(self, x):
    b, h, w, c = x.shape
    q = self.q(x).reshape(b, h * w, self.heads, c // self.heads)
    kv_in = self.norm(self.reduce(x)) if self.sr > 1 else x
    kv = self.kv(kv_in).reshape(b, -1, 2, self.heads, c // self.heads)
    out = jax.nn.dot_product_attention(q, kv[:, :, 0], kv[:, :, 1])
    return self.proj(out.reshape(b, h, w, c))


class MixFFN(nnx.Module):

  def __init__(self, dim: int, hidden: int, **kw):
    self.fc1 = linear(dim, hidden, **kw)
    self.dwconv = conv2d(hidden, hidden, 3, groups=hidden, bias=True, **kw)
    self.fc2 = linear(hidden, dim, **kw)

  def __call__(self, x):
    return self.fc2(activation("gelu")(self.dwconv(self.fc1(x))))


class Block(nnx.Module):

  def __init__(self, dim: int, heads: int, sr: int, drop_path: float, **kw):
    self.norm1 = layer_norm(dim, 1e-6, **kw)
    self.attn = Attention(dim, heads, sr, **kw)
    self.norm2 = layer_norm(dim, 1e-6, **kw)
    self.mlp = MixFFN(dim, 4 * dim, **kw)
    # Stochastic depth = dropout of a whole sample's residual branch.
    self.drop_path = nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3), rngs=kw["rngs"])

  def __call__(self, x):
    x = x + self.drop_path(self.attn(self.norm1(x)))
    return x + self.drop_path(self.mlp(self.norm2(x)))


class Stage(nnx.Module):

  def __init__(self, cin: int, dim: int, depth: int, heads: int, sr: int, first: bool,
               drop_paths, **kw):
    k, s = (7, 4) if first else (3, 2)
    embed_kw = {**kw, "dtype": edge_dtype(kw.get("dtype"))} if first else kw  # see layers.FP32_EDGES
    self.embed = conv2d(cin, dim, k, stride=s, bias=True, **embed_kw)
    self.embed_norm = layer_norm(dim, 1e-5, **kw)
    self.blocks = nnx.List([Block(dim, heads, sr, float(drop_paths[i]), **kw)
                            for i in range(depth)])
    self.norm = layer_norm(dim, 1e-6, **kw)

  def __call__(self, x):
    x = self.embed_norm(self.embed(x))
    for blk in self.blocks:
      x = blk(x)
    return self.norm(x)


def mit_stages(in_channels: int, drop_path_rate: float = 0.1, **kw) -> nnx.List:
  """The four MiT-B0 stages; each maps NHWC to NHWC at strides 4, 8, 16, 32."""
  dims, depths = MIT_B0["dims"], MIT_B0["depths"]
  dpr = np.linspace(0.0, float(drop_path_rate), sum(depths))  # the usual linear decay
  stages, cin, start = [], in_channels, 0
  for i, (dim, depth) in enumerate(zip(dims, depths)):
    stages.append(Stage(cin, dim, depth, MIT_B0["heads"][i], MIT_B0["sr_ratios"][i], i == 0,
                        dpr[start:start + depth], **kw))
    cin, start = dim, start + depth
  return nnx.List(stages)


def run_stages(stages, x: jax.Array) -> list[jax.Array]:
  """Features at strides 4, 8, 16, 32 (the first embedding sees the input in float32)."""
  y, feats = x.astype(edge_dtype(x.dtype)), []
  for stage in stages:
    y = stage(y)
    feats.append(y)
  return feats
