"""Two-level scales: each group's scale an integer multiple of one float16 step per super-block of columns.

GGML's K-quants Q3_K and Q6_K store, per 256 weights of a row, a float16 ``d`` and one small signed integer ``k``
per 16 weights (6 bits for Q3_K, 8 for Q6_K); a weight is d·k·(code − zero) on the symmetric grid. flexquant
keeps its own layout (a float16 scale per group) and makes every group scale exactly d·k: ``d`` is rounded to few
enough significant bits that d·k is exact in float16 for every allowed k, so the GGUF export recovers (d, k) from
the stored scales without loss (`interop.gguf_kquants`). ``GridConfig.superblock`` turns it on (the gguf target
sets it for its 16-weight groups).
"""

from __future__ import annotations

import math

import torch

SUPERBLOCK = 256  # columns per float16 step (GGML's QK_K)
SCALE_BITS = {3: 6, 6: 8}  # code width -> signed bits of the per-group integer multiple (Q3_K, Q6_K)
_F16_TINY = 2.0**-24  # float16's smallest subnormal


def k_range(bits: int) -> tuple[int, int]:
    """The integer multiples a group scale may take at code width ``bits``: [−2^(s−1), 2^(s−1) − 1]."""
    s = SCALE_BITS[bits]
    return -(2 ** (s - 1)), 2 ** (s - 1) - 1


def step_digits(bits: int) -> int:
    """Significant bits of the float16 step so that step·k is exact in float16 (11 bits) for every allowed k."""
    lo, _ = k_range(bits)
    return 11 - math.ceil(math.log2(-lo))  # |k| ≤ 2^(s−1): at most s−1 significant bits


def steps(scales: torch.Tensor, bits: int) -> torch.Tensor:
    """The step of each super-block from its groups' (unconstrained) scales [..., groups]: the largest
    |scale| over the most negative multiple, rounded up to `step_digits` significant bits and to a multiple of
    float16's smallest subnormal 2^−24 (so step·k is a float16 for every allowed k, subnormal steps included:
    a 6-bit grid of weights of 0.02 needs steps near 2e−5, below float16's smallest normal). Returns [..., 1]."""
    lo, _ = k_range(bits)
    raw = (scales.abs().amax(-1, keepdim=True) / -lo).double().clamp(min=_F16_TINY)
    e = torch.floor(torch.log2(raw))
    unit = torch.exp2(torch.clamp(e - (step_digits(bits) - 1), min=math.log2(_F16_TINY)))
    return (torch.ceil(raw / unit - 1e-9) * unit).float()


def snap(scale: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """``scale`` moved to the nearest nonzero allowed multiple of ``step`` (float16-exact by construction)."""
    lo, hi = k_range(bits)
    k = torch.round(scale / step).clamp(lo, hi)
    k = torch.where(k == 0, torch.where(scale < 0, -1.0, 1.0), k)
    return k * step


def multiples(scales: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Recover (step [..., 1] float32, k [..., groups] int) with scales = step·k exactly, or None when some
    super-block has no such float16 step. ``scales`` [..., groups] are one super-block per leading index."""
    lo, hi = k_range(bits)
    s = scales.double()
    smallest = s.abs().where(s != 0, torch.full_like(s, math.inf)).amin(-1, keepdim=True)
    smallest = torch.where(torch.isinf(smallest), torch.ones_like(smallest), smallest)  # an all-zero block
    found = torch.zeros_like(smallest, dtype=torch.bool)
    step = torch.ones_like(smallest)
    for kmin in range(1, -lo + 1):  # the smallest |scale| is step·kmin for some kmin (largest step first)
        cand = smallest / kmin
        exact = cand.float().half().double() == cand
        k = s / cand
        ok = exact & (k == torch.round(k)).all(-1, keepdim=True) & (k >= lo).all(-1, keepdim=True) \
            & (k <= hi).all(-1, keepdim=True) & ~found
        step = torch.where(ok, cand, step)
        found |= ok
        if bool(found.all()):
            break
    if not bool(found.all()):
        return None
    return step.float(), torch.round(s / step).to(torch.int32)
