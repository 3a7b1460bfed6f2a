"""`QuantLinear`: a linear layer whose weight is stored packed (see `flexquant.format.pack`)."""

from __future__ import annotations

import torch
from torch import nn

from ..format.pack import result_to_tensors, stored_bits, tensors_to_result
from ..kernels import select
from ..quant.result import QuantResult


class QuantLinear(nn.Module):
    """y = x Wᵀ + b with W held as packed codes, scales, zeros, bit map and permutation buffers."""

    def __init__(self, in_features: int, out_features: int, group_size: int, sym: bool,
                 tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.sym = group_size, sym
        self.buffer_names = sorted(tensors)
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.kernel_name: str | None = None
        self._kernel = None
        self._dense_cache: torch.Tensor | None = None

    @classmethod
    def from_result(cls, r: QuantResult, bias: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float32) -> QuantLinear:
        m, n = r.shape
        b = None if bias is None else bias.detach().to(dtype).clone()
        return cls(n, m, r.group_size, r.sym, result_to_tensors(r), b)

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.buffer_names}

    def to_result(self) -> QuantResult:
        return tensors_to_result(self.packed_tensors(), self.out_features, self.in_features,
                                 self.group_size, self.sym)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.to_result().dequantize(dtype)

    def stored_bits(self) -> int:
        """Bits stored for the weight (codes, scales, zeros, bit map, permutation, fp16 columns)."""
        return stored_bits(self.packed_tensors())

    @property
    def bpw(self) -> float:
        return self.stored_bits() / (self.in_features * self.out_features)

    def set_kernel(self, name: str | None) -> None:
        self.kernel_name, self._kernel, self._dense_cache = name, None, None

    def _apply(self, fn, recurse=True):
        self._dense_cache, self._kernel = None, None  # device/dtype moves invalidate caches
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is None:
            self._kernel = select(self, x.device, self.kernel_name)
        return self._kernel.forward(self, x)

    def extra_repr(self) -> str:
        bits = sorted(set(self.group_bits.tolist()))
        return (f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}, "
                f"bits={bits}, bpw={self.bpw:.3f}, kernel={self.kernel_name or 'auto'}")
