"""`QuantLinear`: a linear layer whose weight is stored packed (see `flexquant.quant.pack`)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import FlexQuantError
from ..kernels import rotate, select
from ..quant.pack import pack_bits, result_to_tensors, stored_bits, tensors_to_result, unpack_bits
from ..quant.result import QuantResult
from ..transforms.hadamard import small_hadamard
from ..transforms.rotate import Rotation

# Buffers describing an online input rotation (counted in the layer's stored bits).
ROTATION_BUFFERS = ("rot_signs", "rot_factor")


def rotation_tensors(R: Rotation) -> dict[str, torch.Tensor]:
    """Signs packed at one bit each; the small factor only when it is not a rebuildable Hadamard matrix."""
    out = {"rot_signs": pack_bits((R.signs > 0).to(torch.int64)[None, :], 1)}
    if not bool((R.factor.abs() == 1).all()):
        out["rot_factor"] = R.factor.float()
    return out


def rotation_from_tensors(t: dict[str, torch.Tensor], n: int, order: int) -> Rotation:
    signs = unpack_bits(t["rot_signs"], 1, n)[0].double() * 2 - 1
    factor = t["rot_factor"].double() if "rot_factor" in t else small_hadamard(order)
    return Rotation(signs, factor)


class QuantLinear(nn.Module):
    """y = x Wᵀ + b with W held as packed codes, scales, zeros, bit map and permutation buffers."""

    def __init__(self, in_features: int, out_features: int, group_size: int, sym: bool,
                 tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None, rotation_order: int = 0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.sym = group_size, sym
        self.buffer_names = sorted(tensors)
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        # Online input rotation (FlexibleLLM's down_proj): order of its small factor, 0 = none.
        self.rotation_order = rotation_order
        self._rotation = (rotation_from_tensors(tensors, in_features, rotation_order)
                          if rotation_order else None)
        self.kernel_name: str | None = None
        self._kernel = None
        self._kernel_cache = None  # the kernel's prepared weight (a dense tensor, or packed-cpu's layout)
        self._lean_bits: int | None = None  # set once the checkpoint buffers are released (`release_packed`)

    @classmethod
    def from_result(cls, r: QuantResult, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                    rotation: Rotation | None = None) -> QuantLinear:
        m, n = r.shape
        b = None if bias is None else bias.detach().to(dtype).clone()
        tensors = result_to_tensors(r)
        if rotation is not None:
            tensors.update(rotation_tensors(rotation))
        return cls(n, m, r.group_size, r.sym, tensors, b, rotation.factor.shape[0] if rotation is not None else 0)

    @property
    def rotation(self) -> Rotation | None:
        """The online input rotation applied before the matmul (None: none)."""
        return self._rotation

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        if self._lean_bits is not None:
            raise FlexQuantError("this model was loaded with lean=True (inference only): its layers keep the "
                                 "kernel's layout, not the checkpoint's tensors; load it again without lean to "
                                 "save, export or inspect it")
        return {name: getattr(self, name) for name in self.buffer_names}

    def release_packed(self) -> None:
        """Inference only: build the kernel's own layout of the weight now and drop the checkpoint's packed
        buffers (they are what `to_result`, saving and export read), so the layer holds one copy of its weight.
        The kernel must prepare a self-contained layout (`packed-cpu`)."""
        if self._lean_bits is not None:
            return
        kernel = select(self, torch.device("cpu"), self.kernel_name)
        if not hasattr(kernel, "prepare"):
            raise FlexQuantError(f"kernel {kernel.name!r} keeps no layout of its own; a lean load needs "
                                 "kernel='packed-cpu'")
        self._kernel, self._kernel_cache = kernel, kernel.prepare(self, compact=True)
        self._lean_bits = self.stored_bits()
        for name in self.buffer_names:
            if name not in ROTATION_BUFFERS:
                del self._buffers[name]

    def to_result(self) -> QuantResult:
        t = {k: v for k, v in self.packed_tensors().items() if k not in ROTATION_BUFFERS}
        return tensors_to_result(t, self.out_features, self.in_features, self.group_size, self.sym)

    def input_order_codes(self) -> torch.Tensor:
        """The integer codes [out, in] with any act-order permutation undone (column j is input j): what two
        checkpoints of one model compare code by code."""
        r = self.to_result()
        codes = r.codes.clone()
        if r.perm is not None:
            codes[:, r.perm] = r.codes
        return codes

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.to_result().dequantize(dtype)

    def stored_bits(self) -> int:
        """Bits stored for the weight (codes, scales, zeros, bit map, permutation, fp16 columns)."""
        return self._lean_bits if self._lean_bits is not None else stored_bits(self.packed_tensors())

    @property
    def bpw(self) -> float:
        return self.stored_bits() / (self.in_features * self.out_features)

    def set_kernel(self, name: str | None) -> None:
        self.kernel_name, self._kernel, self._kernel_cache = name, None, None

    def _apply(self, fn, recurse=True):
        if self._lean_bits is not None:  # the kernel's layout is all there is: it stays (on the CPU)
            if fn(torch.zeros(1)).device.type != "cpu":
                raise FlexQuantError("a model loaded with lean=True runs on the CPU only; load it without lean "
                                     "to move it to another device")
        else:
            self._kernel_cache, self._kernel = None, None  # device/dtype moves invalidate caches
        out = super()._apply(fn, recurse)
        if self._rotation is not None:
            self._rotation = Rotation(self._rotation.signs.to(self.rot_signs.device),
                                      self._rotation.factor.to(self.rot_signs.device))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._rotation is not None:
            x = rotate(self._rotation, x)
        if self._kernel is None:
            self._kernel = select(self, x.device, self.kernel_name)
        return self._kernel.forward(self, x)

    def extra_repr(self) -> str:
        bits = sorted(set(self.group_bits.tolist()))
        return (f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}, "
                f"bits={bits}, bpw={self.bpw:.3f}, kernel={self.kernel_name or 'auto'}")
