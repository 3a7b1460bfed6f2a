"""Online randomized Hadamard rotation on GPU: y = (x ⊙ s)·(F_a ⊗ H_b)/√n in one Triton launch.

n = a·2^k. Powers of two beyond 256 move into the small factor (F ⊗ H_(c·b) = (F ⊗ H_c) ⊗ H_b for Sylvester
H), so the kernel multiplies a token's [a', b] view by a ±1 b×b matrix (b ≤ 256) and then by the a'×a' factor
(a' ≤ 128), both on tensor cores with fp32 sums (see ``triton_kernels.hadamard_kernel``). 1536 = 12·128,
11008 = 43·256 (orthogonal 43×43 factor), 14336 = 56·256 (F_28 ⊗ H_2), 4096 = 16·256.
Prepared operands are cached per sign vector, dtype and device; after one warm-up call a rotation launches
one kernel and reads nothing back to the host, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from ..transforms.hadamard import small_hadamard
from .triton_quant import usable_on

MAX_INNER = 256  # b: the ±1 matrix applied per token is b×b
MAX_OUTER = 128  # a': the small factor, zero-padded to a power of two ≥ 16

# id(sign tensor) -> {(dtype, device): prepared}; entries leave with their sign tensor (weakref.finalize),
# since tensors cannot be keys of a WeakKeyDictionary (their == is elementwise).
_CACHE: dict[int, dict] = {}


@dataclass
class _Prepared:
    factor: torch.Tensor  # the Rotation's factor this was built from (identity check)
    signs: torch.Tensor  # [n] ±1 in the activation dtype
    H: torch.Tensor  # [b, b] ±1
    f_hi: torch.Tensor  # [A_PAD, A_PAD] Fᵀ (zero-padded) rounded to the activation dtype
    f_lo: torch.Tensor  # Fᵀ − f_hi, same dtype (zeros for a ±1 factor)
    n: int
    a: int
    b: int
    a_pad: int
    has_lo: bool
    prescale: float
    scale: float


def _prepare(signs: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype) -> _Prepared | None:
    n, a = signs.numel(), factor.shape[0]
    b0 = n // a
    if a * b0 != n or b0 & (b0 - 1):
        return None
    F = factor.detach().to("cpu", torch.float64)
    hadamard = bool((F.abs() == 1).all())
    b, c = b0, 1
    while b > MAX_INNER:
        b, c = b // 2, c * 2
    a2 = a * c
    a_pad = max(16, 1 << (a2 - 1).bit_length())
    if b < 16 or a_pad > MAX_OUTER:
        return None
    if c > 1:
        F = torch.kron(F, small_hadamard(c))
    fT = torch.zeros(a_pad, a_pad, dtype=torch.float64)
    fT[:a2, :a2] = F.T
    dev = signs.device
    f_hi = fT.to(dtype)
    f_lo = (fT - f_hi.double()).to(dtype)
    scale = 1 / math.sqrt(n if hadamard else b0)  # as `hadamard_transform`
    return _Prepared(factor, signs.detach().to(dtype).contiguous(), small_hadamard(b).to(dev, dtype).contiguous(),
                     f_hi.to(dev), f_lo.to(dev), n, a2, b, a_pad, bool(f_lo.abs().max() > 0), 1.0 / b, scale * b)


def _get(signs: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype) -> _Prepared | None:
    per_signs = _CACHE.get(id(signs))
    if per_signs is None:
        per_signs = _CACHE[id(signs)] = {}
        weakref.finalize(signs, _CACHE.pop, id(signs), None)
    key = (dtype, str(signs.device))
    p = per_signs.get(key)
    if p is None or p is False or p.factor is not factor:
        if p is False:
            return None
        p = _prepare(signs, factor, dtype)
        per_signs[key] = p if p is not None else False
    return p


def triton_rotate(signs: torch.Tensor, factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """(x ⊙ signs)·(F ⊗ H_b)/√n along the last dim with the Triton kernel, or None when this size, dtype or
    device is not covered (the caller then uses the torch path)."""
    if x.dtype not in (torch.float16, torch.bfloat16) or not usable_on(x.device):
        return None
    p = _get(signs, factor, x.dtype)
    if p is None or x.shape[-1] != p.n:
        return None
    from .triton_kernels import hadamard_kernel

    x2 = x.reshape(-1, p.n)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = torch.empty_like(x2)
    bn = min(32, p.b)
    if x2.shape[0]:
        hadamard_kernel[(x2.shape[0], p.b // bn)](x2, p.signs, p.H, p.f_hi, p.f_lo, y, p.n, p.a, p.prescale, p.scale,
                                                  BDIM=p.b, A_PAD=p.a_pad, BN=bn, BK=min(p.b, 64), HAS_LO=p.has_lo,
                                                  num_warps=4)
    return y.view(x.shape)
