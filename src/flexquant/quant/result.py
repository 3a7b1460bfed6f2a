"""`QuantResult`: the one canonical quantized form every stage consumes (packing, kernels, exporters)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# A group whose bit-width is FP16_BITS is stored unquantized in float16 ("kept" columns).
FP16_BITS = 16


@dataclass
class QuantResult:
    """A quantized weight matrix W (out m x in n).

    Columns are quantized in the order ``perm`` (column j of the quantized order is input column
    ``perm[j]``; None = identity), in groups of ``group_size`` consecutive columns of that order.
    Group k has ``group_bits[k]`` bits; quantized groups (bits < 16) own one scale (and, asymmetric,
    one integer zero) per row, in group order; 16-bit groups keep their values in ``fp16_cols``.
    """

    codes: torch.Tensor  # [m, n] uint8, quantized order; unused (0) inside 16-bit groups
    scales: torch.Tensor  # [m, nq] float32 holding float16-exact values, nq = #groups with bits < 16
    zeros: torch.Tensor | None  # [m, nq] uint8 integer zero points; None when symmetric
    group_bits: torch.Tensor  # [ng] uint8
    group_size: int
    sym: bool
    perm: torch.Tensor | None = None  # [n] int64
    fp16_cols: torch.Tensor | None = None  # [m, n16 * group_size] float16, 16-bit groups in order
    # Compact metadata (GridConfig.scale_bits / zero_bits): when ``scale_base`` [m] (float32, fp16-exact) is
    # set, every scale is log_scale(base, code) and is stored as its 8-bit code; zeros stored in 4 or 8 bits.
    scale_base: torch.Tensor | None = None
    zero_bits: int = 8
    # An online input rotation (a `transforms.rotate.Rotation`) the layer applies before its matmul: the packed
    # layer stores it and re-applies it (FlexibleLLM's down_proj). None = no transform.
    rotation: object | None = None
    stats: dict = field(default_factory=dict)  # solver diagnostics (losses, damping used, ...)

    def __post_init__(self) -> None:
        m, n = self.codes.shape
        if n % self.group_size:
            raise ValueError(f"{n} columns are not a whole number of groups of {self.group_size}")
        if self.group_bits.numel() != n // self.group_size:
            raise ValueError("group_bits must have one entry per group")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def quantized_groups(self) -> torch.Tensor:
        return self.group_bits < FP16_BITS

    def zero_points(self) -> torch.Tensor:
        """Zero points [m, nq] as float: stored integers (asymmetric) or 2^(b-1) per group (symmetric)."""
        if self.zeros is not None:
            return self.zeros.float()
        bits = self.group_bits[self.quantized_groups].long().to(self.scales.device)
        return (2 ** (bits - 1)).float().expand_as(self.scales)

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: int = 256) -> torch.Tensor:
        """Dense weight [m, n] in the original column order, computed in float32 ``rows`` rows at a time (only a
        slab's temporaries beside the result) and returned in ``dtype``."""
        return self.rows(0, self.shape[0], dtype, rows)

    def rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32, slab: int = 256) -> torch.Tensor:
        """Rows ``start:stop`` of the dense weight in ``dtype``, computed ``slab`` rows at a time into the result."""
        stop = min(stop, self.shape[0])
        out = torch.empty(stop - start, self.shape[1], dtype=dtype, device=self.codes.device)
        for s, Wq in self.row_slabs(dtype, slab, start, stop):
            out[s.start - start:s.stop - start] = Wq
        return out

    def row_slabs(self, dtype: torch.dtype = torch.float32, rows: int = 256, start: int = 0,
                  stop: int | None = None):
        """The dense weight ``rows`` rows at a time (from row ``start`` to ``stop``): (row slice, [rows, n] in
        the original column order, in ``dtype``), computed in float32."""
        m, n = self.codes.shape
        g = self.group_size
        qmask = self.quantized_groups
        some, rest = bool(qmask.any()), bool((~qmask).any())
        zeros = self.zero_points() if some else None
        stop = m if stop is None else min(stop, m)
        for r in range(start, stop, rows):
            s = slice(r, min(r + rows, stop))
            C = self.codes[s].view(-1, n // g, g).to(torch.float32)  # [rows, ng, g]
            Wq = torch.empty_like(C)
            if some:
                Wq[:, qmask] = (C[:, qmask] - zeros[s, :, None]) * self.scales[s, :, None]
            if rest:
                Wq[:, ~qmask] = self.fp16_cols[s].view(C.shape[0], -1, g).float()
            Wq = Wq.view(-1, n).to(dtype)
            if self.perm is not None:
                Wq = torch.empty_like(Wq).index_copy_(1, self.perm, Wq)
            yield s, Wq

    def mean_bits(self) -> float:
        """Nominal code bits per weight (no metadata): the average of the group bit-widths."""
        return float(self.group_bits.float().mean())
