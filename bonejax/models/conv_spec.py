"""The static shape of one convolution call: what a lowering choice (conv_lowering) and the
oneDNN extension (onednn) both depend on."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """The static shape of one convolution call: what a lowering choice depends on."""
  batch: int
  height: int
  width: int
  cin: int
  cout: int
  kernel: tuple[int, int]
  stride: tuple[int, int]
  dilation: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]
  groups: int
  dtype: str  # compute dtype of the operands

  def key(self) -> str:
    return (f"b{self.batch}_{self.height}x{self.width}_{self.cin}to{self.cout}"
            f"_k{self.kernel[0]}x{self.kernel[1]}_s{self.stride[0]}x{self.stride[1]}"
            f"_d{self.dilation[0]}x{self.dilation[1]}_p{self.padding[0][0]}.{self.padding[0][1]}"
            f".{self.padding[1][0]}.{self.padding[1][1]}_g{self.groups}_{self.dtype}")

  @property
  def out_hw(self) -> tuple[int, int]:
    return tuple(
        (n + p[0] + p[1] - d * (k - 1) - 1) // s + 1
        for n, p, d, k, s in zip((self.height, self.width), self.padding, self.dilation,
                                 self.kernel, self.stride))

  @property
  def flops(self) -> int:
    ho, wo = self.out_hw
    return 2 * self.batch * ho * wo * self.cout * self.kernel[0] * self.kernel[1] * (
        self.cin // self.groups)
