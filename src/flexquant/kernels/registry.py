"""Kernels for `QuantLinear`. The reference kernel is the ground truth every other kernel is tested against."""

from __future__ import annotations

import abc
import os

import torch
import torch.nn.functional as F

from ..errors import FlexQuantError


class Kernel(abc.ABC):
    """A way to compute ``QuantLinear.forward``. Subclasses declare support and a priority."""

    name = "base"
    priority = 0

    def supports(self, layer, device: torch.device) -> bool:
        return True

    @abc.abstractmethod
    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        """y = x·Wᵀ + b for the packed ``layer``."""


class ReferenceKernel(Kernel):
    """Unpack, dequantize and matmul on every call, in plain torch (any device, any layout)."""

    name = "reference"
    priority = 0

    def forward(self, layer, x):
        W = layer.dequantized_weight(x.dtype)
        return F.linear(x, W, layer.bias)


class DenseCacheKernel(Kernel):
    """Dequantize once to a dense weight in the activation dtype and reuse it (CPU default).

    Costs the memory of the unquantized layer, buys the speed of the dense matmul on CPU, where
    unpacking on every call would dominate decode time.
    """

    name = "dense-cache"
    priority = 10

    def supports(self, layer, device):
        return device.type == "cpu"

    def forward(self, layer, x):
        W = layer._kernel_cache
        if W is None or W.dtype != x.dtype or W.device != x.device:
            W = layer.dequantized_weight(x.dtype)
            layer._kernel_cache = W
        return F.linear(x, W, layer.bias)


class PackedCPUKernel(Kernel):
    """Keep the weight packed and dequantize group by group inside the matmul (`cpu_packed`).

    Measured on smollm2-135m (bench/cpu_speed.py): 0.55 × the memory `dense-cache` adds, 1.36 × its decode
    speed, 0.76 × its prefill speed. Not the default yet: a resumed quantization replays finished blocks through
    the loaded kernels, and bit-identical resumption is tested against dense-cache's arithmetic. Select with
    --kernel packed-cpu or FLEXQUANT_KERNEL=packed-cpu."""

    name = "packed-cpu"
    priority = 5

    def supports(self, layer, device):
        if device.type != "cpu" or layer.group_size % 2:
            return False
        from .cpu_packed import extension

        return extension() is not None

    def prepare(self, layer, compact: bool = False):
        """The kernel's own layout of the layer's codes (self-contained: `QuantLinear.release_packed`; ``compact``:
        3-bit codes where they fit, `cpu_packed.prepare`)."""
        from .cpu_packed import prepare

        return prepare(layer, compact)

    def forward(self, layer, x):
        from .cpu_packed import packed_forward

        if layer._kernel_cache is None:  # the kernel's own layout of the codes, made once
            layer._kernel_cache = self.prepare(layer)
        return packed_forward(layer._kernel_cache, x, layer.bias)


KERNELS: dict[str, Kernel] = {}


def register(kernel: Kernel) -> Kernel:
    KERNELS[kernel.name] = kernel
    return kernel


register(ReferenceKernel())
register(DenseCacheKernel())
register(PackedCPUKernel())


def select(layer, device: torch.device, prefer: str | None = None) -> Kernel:
    """The kernel named by ``prefer`` (or $FLEXQUANT_KERNEL), else the highest-priority one that supports it."""
    prefer = prefer or os.environ.get("FLEXQUANT_KERNEL") or None
    if prefer:
        if prefer not in KERNELS:
            raise FlexQuantError(f"unknown kernel {prefer!r}; available: {sorted(KERNELS)}")
        k = KERNELS[prefer]
        if not k.supports(layer, device):
            raise FlexQuantError(f"kernel {prefer!r} does not support this layer on {device}")
        return k
    # highest priority first, asking each in turn (a kernel's check may build it: only the chosen one is asked)
    return next(k for k in sorted(KERNELS.values(), key=lambda k: -k.priority) if k.supports(layer, device))


def rotate(R, x: torch.Tensor) -> torch.Tensor:
    """x·Q of a `flexquant.transforms.rotate.Rotation` R: one fused Triton launch on CUDA where it covers the
    size and dtype (`kernels.triton_hadamard`), else R's own torch arithmetic."""
    if x.is_cuda:
        from .triton_hadamard import triton_rotate

        y = triton_rotate(R.signs, R.factor, x)
        if y is not None:
            return y
    return R.apply(x)
