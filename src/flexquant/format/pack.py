"""Bit packing of integer codes into int32 words, and a `QuantResult` <-> tensor-dict layout.

Layout (format version 1): every 32 consecutive codes of b bits fill b int32 words, code i at bit
offset i·b of that little-endian 32·b-bit chunk (a code may straddle two words when b = 3, 5, ...).
Within a layer, the groups of each bit-width b are stored contiguously per row in ``qweight_b{b}``
[m, words], in group order, so a kernel streams one uniform-width array per bit-width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant.result import FP16_BITS, QuantResult

PACK_BITS = tuple(range(1, 9))


def _layout(b: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.arange(32, device=device) * b  # bit position of each code in its 32·b-bit chunk
    return pos // 32, pos % 32


def pack_bits(codes: torch.Tensor, b: int) -> torch.Tensor:
    """Pack codes [m, N] (values < 2^b) into int32 [m, ceil(N/32)·b]."""
    if b not in PACK_BITS:
        raise ValueError(f"cannot pack {b}-bit codes; supported: 1..8")
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
        out["scales"] = r.scales.half()
        if not r.sym:
            out["zeros"] = r.zeros.to(torch.uint8)
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
    return QuantResult(
        codes=C.view(m, n),
        scales=t["scales"].float() if qmask.any() else torch.zeros(m, 0, device=device),
        zeros=None if sym else (t["zeros"] if qmask.any() else torch.zeros(m, 0, dtype=torch.uint8)),
        group_bits=group_bits.cpu(),
        group_size=g,
        sym=sym,
        perm=t["perm"].long() if "perm" in t else None,
        fp16_cols=t.get("fp16_cols"),
    )


def stored_bits(tensors: dict[str, torch.Tensor]) -> int:
    """Bits actually stored for a set of tensors."""
    return sum(v.numel() * v.element_size() * 8 for v in tensors.values())
