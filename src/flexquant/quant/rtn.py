"""Round-to-nearest: per-group min-max (or clipped) quantization with no data."""

from __future__ import annotations

import torch

from ..config import GridConfig
from ..errors import FlexQuantError
from .grid import choose_qparams, log_scale_base, quantize, superblock_steps
from .result import FP16_BITS, QuantResult


def rtn_quantize(W: torch.Tensor, grid: GridConfig, group_bits: torch.Tensor | None = None) -> QuantResult:
    """RTN of W [m, n] per group of ``grid.group_size`` columns; ``group_bits`` [ng] overrides bits."""
    m, n = W.shape
    g = grid.group_size
    if n % g:
        raise FlexQuantError(f"group_size={g} does not divide the {n} input columns; pick a divisor of {n}")
    ng = n // g
    if group_bits is None:
        group_bits = torch.full((ng,), grid.bits, dtype=torch.uint8)
    group_bits = group_bits.to(torch.uint8).cpu()
    Wg = W.detach().float().reshape(m, ng, g)  # [m, ng, g]
    codes = torch.zeros(m, ng, g, dtype=torch.uint8, device=W.device)
    qmask = group_bits < FP16_BITS
    nq = int(qmask.sum())
    scales = torch.zeros(m, ng, device=W.device)
    zeros = torch.zeros(m, ng, device=W.device)
    base = log_scale_base(Wg, group_bits, grid.sym) if grid.scale_bits == 8 else None
    for b in sorted(set(group_bits[qmask].tolist())):
        sel = (group_bits == b).nonzero().flatten().to(W.device)
        step = None
        if grid.superblock:  # every group of a super-block at this width (K-quant layers have one width)
            per = grid.superblock // g
            step = (superblock_steps(W.float().reshape(m, n // grid.superblock, grid.superblock), b, g,
                                     grid.signed).repeat_interleave(per, 1)[:, sel], b)
        s, z = choose_qparams(Wg[:, sel], b, grid.sym, grid.clip,
                              None if base is None else base[:, None, None],  # [m, k, 1]
                              grid.signed, step)
        codes[:, sel] = quantize(Wg[:, sel], s, z, 2**b - 1).to(torch.uint8)
        scales[:, sel], zeros[:, sel] = s[..., 0], z[..., 0]
    qsel = qmask.to(W.device)
    fp16 = Wg[:, ~qsel].reshape(m, -1).half() if nq < ng else None
    return QuantResult(
        codes=codes.view(m, n),
        scales=scales[:, qsel].contiguous(),
        zeros=None if grid.sym else zeros[:, qsel].to(torch.uint8).contiguous(),
        group_bits=group_bits,
        group_size=g,
        sym=grid.sym,
        fp16_cols=fp16,
        scale_base=base,
        zero_bits=grid.zero_bits or 8,
    )
