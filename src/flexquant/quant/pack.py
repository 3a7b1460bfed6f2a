"""Bit packing of integer codes into int32 words, and a `QuantResult` <-> tensor-dict layout.

Layout (format version 1): every 32 consecutive codes of b bits fill b int32 words, code i at bit
offset i·b of that little-endian 32·b-bit chunk (a code may straddle two words when b = 3, 5, ...).
Within a layer, the groups of each bit-width b are stored contiguously per row in ``qweight_b{b}``
[m, words], in group order, so a kernel streams one uniform-width array per bit-width.

Per quantized group and row: ``scales`` fp16 [m, nq], or (compact, format 2) ``scale_codes`` uint8
[m, nq] with ``scale_base`` fp16 [m] (scale = base·2^(−code/32)); asymmetric zero points ``zeros``
uint8 [m, nq], or ``zeros_b4``: the row-major [m·nq] zeros packed at 4 bits into one int32 row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .grid import log_scale, log_scale_codes
from .result import FP16_BITS, QuantResult

PACK_BITS = tuple(range(1, 9))


def _layout(b: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.arange(32, device=device) * b  # bit position of each code in its 32·b-bit chunk
    return pos // 32, pos % 32


# Codes packed per call of `_pack_rows` at most (its int64 temporaries are ~3 × 8 bytes per code).
PACK_SLAB_CODES = 1 << 20


def pack_bits(codes: torch.Tensor, b: int) -> torch.Tensor:
    """Pack codes [m, N] (values < 2^b) into int32 [m, ceil(N/32)·b], in row slabs of about PACK_SLAB_CODES
    codes (a 2048 × 8192 weight packed at once held ~400 MiB of int64 temporaries)."""
    if b not in PACK_BITS:
        raise ValueError(f"cannot pack {b}-bit codes; supported: 1..8")
    m, N = codes.shape
    rows = max(1, PACK_SLAB_CODES // max(N, 1))
    if m <= rows:
        return _pack_rows(codes, b)
    return torch.cat([_pack_rows(codes[a:a + rows], b) for a in range(0, m, rows)])


def _pack_rows(codes: torch.Tensor, b: int) -> torch.Tensor:
    m, N = codes.shape
    c = F.pad(codes.to(torch.int64), (0, (-N) % 32)).view(m, -1, 32)  # [m, chunks, 32]
    word, off = _layout(b, codes.device)
    out = torch.zeros(m, c.shape[1], b + 1, dtype=torch.int64, device=codes.device)  # +1: spill word
    idx = word.expand_as(c)
    out.scatter_add_(2, idx, (c << off) & 0xFFFFFFFF)
    out.scatter_add_(2, idx + 1, c >> (32 - off))  # high bits of codes that straddle a word boundary
    out = out[..., :b].reshape(m, -1)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack_bits(packed: torch.Tensor, b: int, N: int) -> torch.Tensor:
    """Inverse of `pack_bits`: int32 [m, words] -> int64 codes [m, N]."""
    m = packed.shape[0]
    p = (packed.to(torch.int64) & 0xFFFFFFFF).view(m, -1, b)  # [m, chunks, b]
    p = F.pad(p, (0, 1))  # a zero spill word so word + 1 is always valid
    word, off = _layout(b, packed.device)
    lo = p[..., word] >> off
    hi = p[..., word + 1] << (32 - off)
    return ((lo | hi) & (2**b - 1)).reshape(m, -1)[:, :N]


def result_to_tensors(r: QuantResult) -> dict[str, torch.Tensor]:
    """The stored tensors of one quantized linear (no bias)."""
    m, n = r.shape
    g = r.group_size
    ng = n // g
    C = r.codes.view(m, ng, g)
    out: dict[str, torch.Tensor] = {"group_bits": r.group_bits.to(torch.uint8).cpu()}
    for b in sorted(set(r.group_bits.tolist()) - {FP16_BITS}):
        sel = (r.group_bits == b).nonzero().flatten().to(C.device)
        out[f"qweight_b{b}"] = pack_bits(C[:, sel].reshape(m, -1), b)
    if r.quantized_groups.any():
        if r.scale_base is None:
            out["scales"] = r.scales.half()
        else:  # 8-bit codes of the per-row log grid (exact: the scales were chosen on it)
            out["scale_codes"] = log_scale_codes(r.scales, r.scale_base[:, None]).to(torch.uint8)
            out["scale_base"] = r.scale_base.half()
        if not r.sym and r.zero_bits == 8:
            out["zeros"] = r.zeros.to(torch.uint8)
        elif not r.sym:  # nibbles, flattened so that rows are not padded to 32 codes each
            out["zeros_b4"] = pack_bits(r.zeros.reshape(1, -1), 4)
    if r.fp16_cols is not None:
        out["fp16_cols"] = r.fp16_cols.half()
    if r.perm is not None:
        out["perm"] = r.perm.to(torch.int16 if n <= 2**15 else torch.int32)
    return {k: v.contiguous() for k, v in out.items()}


def tensors_to_result(t: dict[str, torch.Tensor], m: int, n: int, group_size: int, sym: bool) -> QuantResult:
    """Inverse of `result_to_tensors`."""
    g = group_size
    group_bits = t["group_bits"].to(torch.uint8)
    ng = n // g
    device = t["group_bits"].device
    C = torch.zeros(m, ng, g, dtype=torch.uint8, device=device)
    for b in sorted(set(group_bits.tolist()) - {FP16_BITS}):
        sel = (group_bits == b).nonzero().flatten()
        codes = unpack_bits(t[f"qweight_b{b}"], b, sel.numel() * g)
        C[:, sel.to(device)] = codes.view(m, -1, g).to(torch.uint8)
    qmask = group_bits < FP16_BITS
    nq = int(qmask.sum())
    base = t["scale_base"].float() if "scale_base" in t else None
    if base is not None:
        scales = log_scale(base[:, None], t["scale_codes"])
    else:
        scales = t["scales"].float() if nq else torch.zeros(m, 0, device=device)
    if sym:
        zeros = None
    elif "zeros_b4" in t:
        zeros = unpack_bits(t["zeros_b4"], 4, m * nq).view(m, nq).to(torch.uint8)
    else:
        zeros = t["zeros"] if nq else torch.zeros(m, 0, dtype=torch.uint8)
    return QuantResult(
        codes=C.view(m, n),
        scales=scales,
        zeros=zeros,
        group_bits=group_bits.cpu(),
        group_size=g,
        sym=sym,
        perm=t["perm"].long() if "perm" in t else None,
        fp16_cols=t.get("fp16_cols"),
        scale_base=base,
        zero_bits=4 if "zeros_b4" in t else 8,
    )


def stored_bits(tensors: dict[str, torch.Tensor]) -> int:
    """Bits actually stored for a set of tensors."""
    return sum(v.numel() * v.element_size() * 8 for v in tensors.values())
