"""Asymmetric / symmetric uniform integer grids with a scale (and integer zero) per row and group.

Scales are rounded to what is stored when chosen (float16, or a code of the 8-bit logarithmic grid
``base · 2^(−c/32)`` with an fp16 ``base`` per row), so that the fake-quantized weight written back
during calibration is bit-identical to what the packed checkpoint dequantizes to.
"""

from __future__ import annotations

import torch

from ..errors import FlexQuantError
from .superblock import SCALE_BITS, snap, steps

# Shrink factors tried by the "mse" clip search: the range scaled by 1.00, 0.98, ..., 0.60.
_SHRINK = torch.linspace(1.0, 0.6, 21)
# Elements per piece of the clip search: its temporaries stay in the L2 cache (~10× faster than whole), and at
# 256 KiB they stay fast under a memory budget's 128 KiB mmap threshold too (`pipeline.progress`), where 512 KiB
# ones cost 2.4× in page faults (a 5632 × 2048 table at 3 bits, one thread: 0.41 s both ways at 2^16).
MSE_CHUNK = 2**16
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


def _params_from_range(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool, base=None,
                       signed: bool = False, step=None):
    if step is not None:  # a multiple of the super-block's float16 step (`quant.superblock`; symmetric grids)
        scale, zero = _signed_params(xmin, xmax, maxq) if signed else _params_from_range(xmin, xmax, maxq, True)
        return snap(scale, step[0], step[1]), zero
    if sym and signed:
        return _signed_params(xmin, xmax, maxq)
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


def _signed_params(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int):
    """The symmetric grid with the group's largest-magnitude value ``e`` on code 0: scale −e/2^(b−1) (its
    sign is the opposite of e's, so the 2^(b−1) negative-side steps cover e's side of zero exactly, with no
    step wasted on the other side's missing extreme). GGML's Q4_0 / Q5_0 choose their scale this way."""
    half = (maxq + 1) // 2
    ext = torch.where(xmax >= -xmin, xmax, xmin)
    ext = torch.where(ext == 0, torch.ones_like(ext), ext)
    scale = -ext / half
    scale = torch.where(scale < 0, scale.clamp(max=-1e-6), scale.clamp(min=1e-6)).half().float()
    return scale, torch.full_like(scale, half)


def quantize(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes in [0, maxq] (as float) for W on the grid (scale, zero); broadcasting shapes."""
    return torch.clamp(torch.round(W / scale) + zero, 0, maxq)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (codes - zero) * scale


def _sq_error(W, scale, zero, maxq, weights=None):
    """Σ (w − dequantize(quantize(w)))² per row: `quantize` then `dequantize` op by op (the same values) in one
    buffer, so the clip search's 21 tries allocate one temporary each instead of seven."""
    d = torch.div(W, scale)
    d.round_().add_(zero).clamp_(0, maxq).sub_(zero).mul_(scale)
    torch.sub(W, d, out=d)
    if weights is None:
        return d.mul_(d).sum(-1, keepdim=True)
    return (weights * d).mul_(d).sum(-1, keepdim=True)


def _refit(W, scale, zero, maxq, weights, step):
    """The (weighted) least-squares scale for the codes ``scale`` gives: Σ w·x·q / Σ w·q² with q = code − zero
    (symmetric grids), float16-exact (or a multiple of the super-block step)."""
    q = quantize(W, scale, zero, maxq) - zero
    w = torch.ones_like(W) if weights is None else weights.expand_as(W)
    num, den = (w * W * q).sum(-1, keepdim=True), (w * q * q).sum(-1, keepdim=True)
    fit = torch.where(den > 0, num / den.clamp(min=1e-30), scale)
    fit = torch.where(fit.abs() < 1e-6, scale, fit)
    return snap(fit, step[0], step[1]) if step is not None else fit.half().float()


def choose_qparams(W: torch.Tensor, bits: int, sym: bool = False, clip: str | None = "minmax",
                   scale_base: torch.Tensor | None = None, signed: bool = False, step=None, weights=None):
    """Scale and zero for each row of ``W`` [..., g] (one group per row). Returns ([..., 1], [..., 1]).

    The range always contains 0 (so the zero point is an integer code). ``clip="mse"`` (or None) shrinks the
    range by the factor (of 21 tried) that minimises the group's rounding error. ``scale_base``
    (broadcastable to [..., 1]) puts the scales on the 8-bit logarithmic grid below it. ``signed`` (symmetric
    grids with float16 scales: ``GridConfig.sym_grid="signed"``) puts the largest-magnitude value on the most
    negative code, the scale carrying the sign (`_signed_params`). ``step`` (tensor broadcastable to [..., 1],
    code width) makes each scale an integer multiple of the step (`quant.superblock`: GGML's K-quants).
    ``clip="lsq"`` also tries, for each shrunk range, the least-squares scale of the codes it gives (symmetric
    grids with float16 scales), and both searches minimise the error weighted by ``weights`` (broadcastable to
    W: GPTQ passes each column's cost 1/U_jj², the role llama.cpp's importance matrix plays).
    """
    if signed and scale_base is not None:
        raise ValueError("signed symmetric scales are float16 scales; the log-coded scales are positive")
    if step is not None and (not sym or scale_base is not None):
        raise ValueError("super-block steps are for symmetric grids with float16 scales")
    if clip != "minmax" and scale_base is None and step is None and W.dim() >= 2 and W.shape[0] > 1 \
            and W.numel() > MSE_CHUNK:
        # a piece of rows at a time: the same result (per-group arithmetic; the log grid's and the super-block's
        # exp2/log2 are left whole, as vector and scalar lanes of those may round apart)
        rows = max(1, MSE_CHUNK * W.shape[0] // W.numel())
        parts = [choose_qparams(W[r:r + rows], bits, sym, clip, signed=signed, weights=_rows(weights, W, r, rows))
                 for r in range(0, W.shape[0], rows)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    maxq = 2**bits - 1
    W = W.float()
    xmin = W.amin(-1, keepdim=True).clamp(max=0)
    xmax = W.amax(-1, keepdim=True).clamp(min=0)
    scale, zero = _params_from_range(xmin, xmax, maxq, sym, scale_base, signed, step)
    if clip == "minmax":
        return scale, zero
    refit = clip == "lsq" and sym and scale_base is None
    best = _sq_error(W, scale, zero, maxq, weights)
    for p in _SHRINK.tolist():
        s, z = _params_from_range(p * xmin, p * xmax, maxq, sym, scale_base, signed, step)
        for cand in (s, _refit(W, s, z, maxq, weights, step)) if refit else (s,):
            err = _sq_error(W, cand, z, maxq, weights)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, cand, scale)
            zero = torch.where(better, z, zero)
    return scale, zero


def _rows(t: torch.Tensor | None, W: torch.Tensor, r: int, rows: int) -> torch.Tensor | None:
    """Rows ``r:r+rows`` of ``t`` where it has W's leading dimension (else ``t``, broadcast as it is)."""
    if t is None or not torch.is_tensor(t) or t.dim() != W.dim() or t.shape[0] != W.shape[0]:
        return t
    return t[r:r + rows]


def superblock_steps(W: torch.Tensor, bits: int, group_size: int, signed: bool = False) -> torch.Tensor:
    """The float16 step of each super-block: W [..., S] (one super-block per leading index, S columns in
    groups of ``group_size``) → [..., 1] (`quant.superblock.steps` of the groups' min-max scales)."""
    if bits not in SCALE_BITS:
        raise FlexQuantError(f"--superblock needs 3- or 6-bit groups (GGML's Q3_K / Q6_K); {bits}-bit codes "
                             "have no super-block layout: pass --bits 3 --group-size 16 --sym (6-bit ones come "
                             "from --target gguf's search), or drop --superblock")
    Wg = W.float().reshape(*W.shape[:-1], W.shape[-1] // group_size, group_size)
    s, _ = choose_qparams(Wg, bits, sym=True, signed=signed)
    return steps(s[..., 0], bits)
