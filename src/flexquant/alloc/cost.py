"""The one cost model: the bits a quantized linear stores (`quant.pack.result_to_tensors`' layout).

Used by the bit allocators (SBGBS's budget, the ratio QP's step costs) to plan, and by the packer to check
that what it stored is what was planned. Per linear of m rows, n input columns, groups of g columns with
per-group widths b_k (16 = kept in fp16):
* codes: for each width b, its groups' m·(count_b·g) codes packed into int32 words per row: m·⌈count_b·g/32⌉·32·b;
* fp16 columns: 16·m·g per fp16 group;
* scales per row and quantized group: 16 (fp16), or 8-bit codes plus a 16-bit row base (scale_bits 8);
* zeros (asymmetric): 8 per row and quantized group, or nibbles packed in one int32 row: ⌈m·nq/32⌉·128;
* the bit map: 8 per group; the permutation: 16 (n ≤ 2^15) or 32 bits per column, when stored;
* an online input rotation: its signs at 1 bit (int32 words) and its small factor in float32 when it is not a
  rebuildable ±1 Hadamard matrix.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

FP16_BITS = 16


@dataclass(frozen=True)
class Layout:
    """What fixes a linear's stored bits apart from the widths of its groups."""

    m: int
    n: int
    group_size: int
    sym: bool = False
    scale_bits: int = 16
    zero_bits: int = 8
    permuted: bool = False
    rotation: bool = False  # an online input rotation is stored with the layer
    rotation_factor: int = 0  # order of a small factor stored in float32 (0: a rebuildable Hadamard matrix)

    @property
    def groups(self) -> int:
        return self.n // self.group_size


def words(values: int, bits: int) -> int:
    """Bits of ``values`` codes of ``bits`` bits packed into whole int32 words (one row)."""
    return -(-values // 32) * 32 * bits


def fixed_bits(layout: Layout, fp16_groups: int = 0) -> int:
    """Bits that do not depend on the widths of the quantized groups: scales, zeros, bit map, permutation,
    rotation (and nothing for the codes)."""
    L, nq = layout, layout.groups - fp16_groups
    bits = L.groups * 8
    if nq:
        bits += L.m * nq * L.scale_bits + (16 * L.m if L.scale_bits == 8 else 0)
        if not L.sym:
            bits += L.m * nq * 8 if L.zero_bits == 8 else words(L.m * nq, 4)
    if L.permuted:
        bits += L.n * (16 if L.n <= 2**15 else 32)
    if L.rotation:
        bits += words(L.n, 1) + 32 * L.rotation_factor**2
    return bits


def code_bits(m: int, group_size: int, group_bits: Iterable[int]) -> int:
    """Bits of the codes (and fp16 columns) for groups of these widths."""
    total = 0
    for b, count in Counter(int(b) for b in group_bits).items():
        total += m * count * group_size * FP16_BITS if b == FP16_BITS else m * words(count * group_size, b)
    return total


def linear_bits(layout: Layout, group_bits: Iterable[int]) -> int:
    """Every bit a linear stores with these group widths."""
    group_bits = [int(b) for b in group_bits]
    return fixed_bits(layout, sum(b == FP16_BITS for b in group_bits)) + code_bits(layout.m, layout.group_size,
                                                                                  group_bits)


def result_layout(result, rotation=None) -> Layout:
    """The `Layout` of a `QuantResult` (and the online `Rotation` stored beside it, if any)."""
    m, n = result.shape
    factor = 0
    if rotation is not None and not bool((rotation.factor.abs() == 1).all()):
        factor = rotation.factor.shape[0]
    return Layout(m, n, result.group_size, result.sym,
                  16 if result.scale_base is None else 8, result.zero_bits, result.perm is not None,
                  rotation is not None, factor)


def result_bits(result, rotation=None) -> int:
    """The bits the packer will store for ``result``."""
    return linear_bits(result_layout(result, rotation), result.group_bits.tolist())
