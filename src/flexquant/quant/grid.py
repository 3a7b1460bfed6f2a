"""Asymmetric / symmetric uniform integer grids with a scale (and integer zero) per row and group.

Scales are rounded to float16 when chosen, so that the fake-quantized weight written back during
calibration is bit-identical to what the packed checkpoint (fp16 scales) dequantizes to.
"""

from __future__ import annotations

import torch

# Shrink factors tried by the "mse" clip search: the range scaled by 1.00, 0.98, ..., 0.60.
_SHRINK = torch.linspace(1.0, 0.6, 21)


def _params_from_range(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool):
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, -torch.ones_like(xmin), xmin)
    xmax = torch.where(both_zero, torch.ones_like(xmax), xmax)
    scale = ((xmax - xmin) / maxq).clamp(min=1e-6).half().float()
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes in [0, maxq] (as float) for W on the grid (scale, zero); broadcasting shapes."""
    return torch.clamp(torch.round(W / scale) + zero, 0, maxq)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (codes - zero) * scale


def _sq_error(W, scale, zero, maxq):
    d = W - dequantize(quantize(W, scale, zero, maxq), scale, zero)
    return (d * d).sum(-1, keepdim=True)


def choose_qparams(W: torch.Tensor, bits: int, sym: bool = False, clip: str = "minmax"):
    """Scale and zero for each row of ``W`` [..., g] (one group per row). Returns ([..., 1], [..., 1]).

    The range always contains 0 (so the zero point is an integer code). ``clip="mse"`` shrinks the
    range by the factor (of 21 tried) that minimises the group's rounding error.
    """
    maxq = 2**bits - 1
    W = W.float()
    xmin = W.amin(-1, keepdim=True).clamp(max=0)
    xmax = W.amax(-1, keepdim=True).clamp(min=0)
    scale, zero = _params_from_range(xmin, xmax, maxq, sym)
    if clip == "minmax":
        return scale, zero
    best = _sq_error(W, scale, zero, maxq)
    for p in _SHRINK[1:].tolist():
        s, z = _params_from_range(p * xmin, p * xmax, maxq, sym)
        err = _sq_error(W, s, z, maxq)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero
