"""Asymmetric / symmetric uniform integer grids with a scale (and integer zero) per row and group.

Scales are rounded to what is stored when chosen (float16, or a code of the 8-bit logarithmic grid
``base · 2^(−c/32)`` with an fp16 ``base`` per row), so that the fake-quantized weight written back
during calibration is bit-identical to what the packed checkpoint dequantizes to.
"""

from __future__ import annotations

import torch

# Shrink factors tried by the "mse" clip search: the range scaled by 1.00, 0.98, ..., 0.60.
_SHRINK = torch.linspace(1.0, 0.6, 21)
# 8-bit log-coded scales: code c in [0, 255] means base·2^(−c/LOG_SCALE_STEPS) (2.2% apart, 250× range).
LOG_SCALE_STEPS = 32
LOG_SCALE_MAX_CODE = 255
# The row base sits this far above the largest min-max scale of the row: GPTQ's compensation can widen
# a group's range beyond the original weights' (costs 10 of the 256 codes).
LOG_SCALE_HEADROOM = 1.25


def log_scale(base: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Scales of the 8-bit logarithmic grid (float32; the one formula used when quantizing and loading)."""
    return base.float() * torch.exp2(-codes.float() / LOG_SCALE_STEPS)


def log_scale_codes(scale: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The largest-scale grid code not below ``scale`` (so the min-max range stays covered), clamped."""
    c = torch.floor(-LOG_SCALE_STEPS * torch.log2(scale / base.float()) + 1e-4)
    return c.clamp(0, LOG_SCALE_MAX_CODE)


def log_scale_base(Wg: torch.Tensor, group_bits: torch.Tensor, sym: bool) -> torch.Tensor:
    """fp16-exact per-row base [m] of the log grid for W grouped as [m, ng, g] with bits [ng] per group."""
    xmin, xmax = Wg.amin(-1).clamp(max=0), Wg.amax(-1).clamp(min=0)  # [m, ng]
    span = 2 * torch.maximum(-xmin, xmax) if sym else xmax - xmin
    maxq = (2 ** group_bits.to(Wg.device).double() - 1).float()
    base = (span / maxq).amax(-1).clamp(min=1e-6) * LOG_SCALE_HEADROOM
    return base.half().float()


def _params_from_range(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool, base=None):
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, -torch.ones_like(xmin), xmin)
    xmax = torch.where(both_zero, torch.ones_like(xmax), xmax)
    scale = ((xmax - xmin) / maxq).clamp(min=1e-6)
    scale = scale.half().float() if base is None else log_scale(base, log_scale_codes(scale, base))
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


def choose_qparams(W: torch.Tensor, bits: int, sym: bool = False, clip: str = "minmax",
                   scale_base: torch.Tensor | None = None):
    """Scale and zero for each row of ``W`` [..., g] (one group per row). Returns ([..., 1], [..., 1]).

    The range always contains 0 (so the zero point is an integer code). ``clip="mse"`` shrinks the
    range by the factor (of 21 tried) that minimises the group's rounding error. ``scale_base``
    (broadcastable to [..., 1]) puts the scales on the 8-bit logarithmic grid below it.
    """
    maxq = 2**bits - 1
    W = W.float()
    xmin = W.amin(-1, keepdim=True).clamp(max=0)
    xmax = W.amax(-1, keepdim=True).clamp(min=0)
    scale, zero = _params_from_range(xmin, xmax, maxq, sym, scale_base)
    if clip == "minmax":
        return scale, zero
    best = _sq_error(W, scale, zero, maxq)
    for p in _SHRINK[1:].tolist():
        s, z = _params_from_range(p * xmin, p * xmax, maxq, sym, scale_base)
        err = _sq_error(W, s, z, maxq)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero
