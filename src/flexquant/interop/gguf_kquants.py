"""GGML's K-quant blocks Q3_K and Q6_K written from flexquant's symmetric 16-weight groups (`quant.superblock`).

Per 256 weights of a row (a super-block) both store a float16 ``d`` and one signed integer ``k_j`` per 16 weights;
weight i of sub-block j is d·k_j·(code_i − zero). flexquant stores the group scale s_j = d·k_j in float16; the
export recovers (d, k) exactly (`quant.superblock.multiples`) and lays the bits out as llama.cpp reads them:

  Q3_K (110 bytes)  hmask[32]: bit b of byte l = third bit of code 32·b + l; qs[64]: bits 2s..2s+1 of byte
                    32·h + l = low two bits of code 128·h + 32·s + l; scales[12]: k_j + 32 in 6 bits (low
                    nibbles: byte j mod 8, nibble j div 8; high pairs: byte 8 + j mod 4, pair j div 4); d.
                    Value: code − 4 (flexquant's 3-bit symmetric grid, zero 4).
  Q6_K (210 bytes)  ql[128]: nibble t of byte 64·h + l = low four bits of code 128·h + 64·t + l; qh[64]: bits
                    2s..2s+1 of byte 32·h + l = high two bits of code 128·h + 32·s + l; scales[16] int8 k_j; d.
                    Value: code − 32 (the 6-bit symmetric grid, zero 32).
"""

from __future__ import annotations

import numpy as np
import torch

from ..quant.superblock import SUPERBLOCK, multiples

GROUP = 16
KINDS = {3: "Q3_K", 6: "Q6_K"}  # code width -> GGML type


def _steps(scales: torch.Tensor, bits: int, m: int, nsb: int) -> tuple[np.ndarray, np.ndarray] | None:
    got = multiples(scales.float().reshape(m * nsb, SUPERBLOCK // GROUP), bits)
    if got is None:
        return None
    d, k = got
    return d.half().numpy().view(np.uint8).reshape(-1, 2), k.numpy()


def representable(bits: int, group_size: int, n: int, scales: torch.Tensor) -> bool:
    """Whether a linear's grid is a K-quant block type exactly (width, 16-weight groups, 256-column rows, and
    scales that are multiples of one float16 step per super-block)."""
    if bits not in KINDS or group_size != GROUP or n % SUPERBLOCK:
        return False
    m = scales.shape[0]
    return multiples(scales.float().reshape(m * (n // SUPERBLOCK), -1), bits) is not None


def block_bytes(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> tuple[np.ndarray, str]:
    """(uint8 [m, n/256 · block size], GGML type) of a linear with codes [m, n] and group scales [m, n/16]."""
    m, n = codes.shape
    nsb = n // SUPERBLOCK
    got = _steps(scales, bits, m, nsb)
    if got is None:
        raise ValueError("group scales are not integer multiples of one float16 step per 256 columns")
    d, k = got
    c = codes.to(torch.int32).numpy().reshape(m * nsb, SUPERBLOCK)
    nb = c.shape[0]
    if bits == 3:
        hmask = np.zeros((nb, 32), np.uint8)
        for b in range(8):
            hmask |= (((c[:, 32 * b:32 * b + 32] >> 2) & 1) << b).astype(np.uint8)
        qs = np.zeros((nb, 64), np.uint8)
        for h in range(2):
            for s in range(4):
                base = 128 * h + 32 * s
                qs[:, 32 * h:32 * h + 32] |= ((c[:, base:base + 32] & 3) << (2 * s)).astype(np.uint8)
        sc = (k + 32).astype(np.uint8)  # [nb, 16], 6 bits
        packed = np.zeros((nb, 12), np.uint8)
        for j in range(16):
            packed[:, j % 8] |= (sc[:, j] & 0xF) << (4 * (j // 8))
            packed[:, 8 + j % 4] |= (sc[:, j] >> 4) << (2 * (j // 4))
        parts = [hmask, qs, packed, d]
    else:
        ql = np.zeros((nb, 128), np.uint8)
        qh = np.zeros((nb, 64), np.uint8)
        for h in range(2):
            for t in range(2):
                base = 128 * h + 64 * t
                ql[:, 64 * h:64 * h + 64] |= ((c[:, base:base + 64] & 0xF) << (4 * t)).astype(np.uint8)
            for s in range(4):
                base = 128 * h + 32 * s
                qh[:, 32 * h:32 * h + 32] |= (((c[:, base:base + 32] >> 4) & 3) << (2 * s)).astype(np.uint8)
        parts = [ql, qh, k.astype(np.int8).view(np.uint8), d]
    return np.concatenate(parts, axis=-1).reshape(m, -1), KINDS[bits]
