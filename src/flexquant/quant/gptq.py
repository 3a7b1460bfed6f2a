"""GPTQ (Frantar et al., 2022): column-wise rounding with OBS error compensation.

Extensions the later methods rely on: a per-group bit map (``group_bits``), "kept" columns that
are quantized at a higher precision (or kept in fp16) and ordered last so they absorb the
compensation of all other columns, and act-order with the permutation stored in the result.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable

import torch

from ..config import GPTQConfig, GridConfig
from ..errors import FlexQuantError
from .grid import choose_qparams, dequantize, log_scale_base, quantize, superblock_steps
from .result import FP16_BITS, QuantResult

log = logging.getLogger(__name__)
_MAX_DAMP_RETRIES = 6


FLOAT64_MAX_COLUMNS = 4096  # factor_dtype "auto": float64 up to this many input columns
# A float32 factorization of a Hessian this large (bytes) is done in the caller's H itself, H parked on disk
# meanwhile and read back into the same buffer after the solve (`_Parked`): one n×n buffer instead of two.
PARK_MIN_BYTES = 64 * 2**20
# Row slabs of the weight's widening and the Hessian's column permutation: the temporaries beside a solve.
SLAB_BYTES = 8 * 2**20


def factor_dtype(name: str, n: int) -> torch.dtype:
    if name == "auto":
        return torch.float64 if n <= FLOAT64_MAX_COLUMNS else torch.float32
    return {"float64": torch.float64, "float32": torch.float32}[name]


def inverse_cholesky_upper(H: torch.Tensor, damp: float, own: bool = False, dtype: torch.dtype = torch.float64,
                           rebuild: Callable[[], torch.Tensor] | None = None) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so H⁻¹ = UᵀU), λ = damp·mean(diag H), raised ×10 on failure.

    Computed in ``dtype`` in one n × n buffer (damping added to its diagonal, then factor, inverse and factor
    again in place: the same arithmetic as separate tensors, a third of the memory). With ``own`` the caller
    hands H over and U is written into it; in float32 H itself is factored in place, and ``rebuild()`` gives a
    fresh H for a retry with more damping (without it a float32 retry works on a copy)."""
    mean_diag = float(torch.diag(H).double().mean()) or 1.0
    info = torch.empty((), dtype=torch.int32, device=H.device)
    in_place = own and dtype == H.dtype and rebuild is not None
    for attempt in range(_MAX_DAMP_RETRIES):
        lam = damp * 10**attempt
        if in_place:
            A = H if attempt == 0 else rebuild()
        else:
            A = H.to(dtype, copy=True)
        A.diagonal().add_(lam * mean_diag)
        # LAPACK works on column-major matrices: on a row-major A torch factors a column-major copy (another n×n
        # buffer) and copies it back. The factorization reads only A's lower triangle: mirrored onto the upper one,
        # A is symmetric and its transposed view, column-major with the same values, is factored in A's own
        # memory — the same arithmetic on the same numbers.
        _mirror_lower(A)
        F = A.mT
        torch.linalg.cholesky_ex(F, out=(F, info))
        if info == 0:
            torch.cholesky_inverse(F, out=F)
            torch.linalg.cholesky_ex(F, upper=True, out=(F, info))
            _transpose_in_place(A)  # A's memory held Uᵀ row-major: now U
            if info == 0:
                if attempt:
                    log.warning("Hessian needed damping %.3g (asked %.3g) to be positive definite", lam, damp)
                if own and A is not H and H.dtype != A.dtype:
                    return H.copy_(A), lam
                return A.to(H.dtype), lam
        del A, F
    raise FlexQuantError(
        f"the Hessian is not positive definite even with damping {lam:g}; "
        "use more or longer calibration samples (--nsamples/--seqlen)"
    )


def _mirror_lower(A: torch.Tensor, tile: int = 512) -> None:
    """A's strict lower triangle copied onto its upper one (A made exactly symmetric), a tile at a time."""
    n = A.shape[0]
    for i in range(0, n, tile):
        d = A[i:i + tile, i:i + tile]
        d.copy_(torch.tril(d) + torch.tril(d, -1).mT)
        for j in range(i + tile, n, tile):
            A[i:i + tile, j:j + tile] = A[j:j + tile, i:i + tile].mT


def _transpose_in_place(A: torch.Tensor, tile: int = 512) -> None:
    """A square matrix replaced by its transpose in its own memory, a pair of tiles at a time."""
    n = A.shape[0]
    for i in range(0, n, tile):
        A[i:i + tile, i:i + tile] = A[i:i + tile, i:i + tile].mT.clone()
        for j in range(i + tile, n, tile):
            upper = A[i:i + tile, j:j + tile].clone()
            A[i:i + tile, j:j + tile] = A[j:j + tile, i:i + tile].mT
            A[j:j + tile, i:i + tile] = upper.mT


def column_order(diag_h: torch.Tensor, act_order: bool, kept: torch.Tensor | None) -> torch.Tensor | None:
    """Quantization order of the input columns: act-order (descending diag H) and kept columns last."""
    n = diag_h.numel()
    order = torch.argsort(diag_h, descending=True, stable=True) if act_order else torch.arange(n)
    if kept is None or kept.numel() == 0:
        return order if act_order else None
    is_kept = torch.zeros(n, dtype=torch.bool)
    is_kept[kept.cpu()] = True
    is_kept = is_kept.to(order.device)
    return torch.cat([order[~is_kept[order]], order[is_kept[order]]])


def hessian_error(W: torch.Tensor, Wq: torch.Tensor | None, H: torch.Tensor, rows: int = 256) -> float:
    """Layer-output error proxy tr(ΔW H ΔWᵀ) (= mean squared output error × 2 for H = 2XXᵀ/T); ``Wq`` None:
    tr(W H Wᵀ). Summed over slabs of ``rows`` rows (float64 total), so only a slab's temporaries are held."""
    H = H.float()
    total = 0.0
    for r in range(0, W.shape[0], rows):
        total += _quadratic(W[r:r + rows].float() if Wq is None else W[r:r + rows].float() - Wq[r:r + rows].float(), H)
    return total


def slab_errors(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> tuple[float, float]:
    """(tr(ΔW H ΔWᵀ), tr(W H Wᵀ)) of one slab of rows: summed over a result's `QuantResult.row_slabs`, the
    same totals as `hessian_error` without the whole dequantized weight."""
    H, w = H.float(), W.float()
    return _quadratic(w - Wq.float(), H), _quadratic(w, H)


def _quadratic(D: torch.Tensor, H: torch.Tensor) -> float:
    return float(((D @ H) * D).sum(dtype=torch.float64))


@torch.no_grad()
def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    grid: GridConfig,
    cfg: GPTQConfig | None = None,
    group_bits: torch.Tensor | None = None,
    kept: torch.Tensor | None = None,
    kept_bits: int = FP16_BITS,
    order: torch.Tensor | None = None,
) -> QuantResult:
    """Quantize W [m, n] given its input Hessian H [n, n].

    ``group_bits`` [ng] sets bits per group (in quantization order); ``kept`` lists input columns that
    go last, at ``kept_bits`` (their count must be a multiple of the group size). ``order`` fixes the
    quantization order of all columns (kept ones last), overriding act-order.
    """
    cfg = cfg or GPTQConfig()
    m, n = W.shape
    g = grid.group_size
    if n % g:
        raise FlexQuantError(f"group_size={g} does not divide the {n} input columns; pick a divisor of {n}")
    ng = n // g
    H = H.detach().float()
    diag = torch.diag(H).clone()
    dead = diag == 0
    diag[dead] = 1

    if group_bits is None:
        group_bits = torch.full((ng,), grid.bits, dtype=torch.uint8)
    group_bits = group_bits.to(torch.uint8).cpu().clone()
    if kept is not None and kept.numel():
        if kept.numel() % g:
            raise FlexQuantError(f"{kept.numel()} kept columns are not a multiple of group_size={g}")
        group_bits[ng - kept.numel() // g:] = kept_bits
    perm = order.to(W.device) if order is not None else column_order(diag, cfg.act_order, kept)
    W = _widened(W, perm)  # our own float32 copy in quantization order, dead columns zeroed
    W[:, dead if perm is None else dead[perm]] = 0
    fdtype = factor_dtype(cfg.factor_dtype, n)
    parked = _Parked.maybe(H, fdtype)

    def prepared() -> torch.Tensor:  # in quantization order, dead columns' diagonal set to 1
        if parked is not None:  # the caller's buffer, permuted in place
            Hp = _permute_in_place(parked.restore(), perm)
        else:  # our own copy
            Hp = _permuted_copy(H, perm)
        Hp.diagonal()[dead if perm is None else dead[perm]] = 1
        return Hp

    try:
        U, lam = inverse_cholesky_upper(prepared(), cfg.damp, own=True, dtype=fdtype, rebuild=prepared)
        base = log_scale_base(W.view(m, ng, g), group_bits, grid.sym) if grid.scale_bits == 8 else None
        codes, scales, zeros, Q, loss = _solve(W, U, group_bits, grid, base, cfg.block_size)
        del U
    finally:
        if parked is not None:
            parked.restore().close()

    qmask = (group_bits < FP16_BITS).to(W.device)
    Qg = Q.view(m, ng, g)
    return QuantResult(
        codes=codes,
        scales=scales[:, qmask].contiguous(),
        zeros=None if grid.sym else zeros[:, qmask].to(torch.uint8).contiguous(),
        group_bits=group_bits,
        group_size=g,
        sym=grid.sym,
        perm=perm,
        fp16_cols=Qg[:, ~qmask].reshape(m, -1).half() if not bool(qmask.all()) else None,
        stats={"gptq_loss": loss, "damp": lam},
        scale_base=base,
        zero_bits=grid.zero_bits or 8,
    )


class _Parked:
    """H's bytes in an anonymous temporary file (gone when closed or when the process dies), to be read back
    into H's own buffer: lets a large float32 factorization happen in that buffer."""

    def __init__(self, H: torch.Tensor):
        self.H, self.file = H, tempfile.TemporaryFile(prefix="flexquant-hessian-")
        self.file.write(memoryview(H.numpy()).cast("B"))
        self.file.flush()

    @classmethod
    def maybe(cls, H: torch.Tensor, fdtype: torch.dtype) -> _Parked | None:
        big = H.numel() * H.element_size() >= PARK_MIN_BYTES
        ok = H.dtype == fdtype == torch.float32 and H.device.type == "cpu" and H.is_contiguous()
        return cls(H) if big and ok and not H.requires_grad else None

    def restore(self) -> _Parked:
        """H read back into its own buffer (``self.H``); returns self. After ``close`` the file is gone."""
        self.file.seek(0)
        view = memoryview(self.H.numpy()).cast("B")
        got = 0
        while got < len(view):
            k = self.file.readinto(view[got:])
            if not k:
                raise FlexQuantError("could not read back the parked Hessian from its temporary file")
            got += k
        return self

    def close(self) -> None:
        self.file.close()


def _widened(W: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """W[:, perm] as a float32 copy of our own, built SLAB_BYTES of rows at a time: no whole permuted copy in
    W's own dtype beside it (a float16 8192-wide weight: 32 MiB less at its solve)."""
    m, n = W.shape
    out = torch.empty(m, n, dtype=torch.float32, device=W.device)
    rows = max(1, SLAB_BYTES // (4 * n))
    for r in range(0, m, rows):
        part = W[r:r + rows].detach()
        out[r:r + rows] = part.index_select(1, perm) if perm is not None else part
    return out


def _permute_in_place(P: _Parked, perm: torch.Tensor | None) -> torch.Tensor:
    """The parked H permuted to H[perm][:, perm] in its own buffer: rows moved along the cycles of perm (one
    row of scratch), then each slab of rows has its columns permuted."""
    H = P.H
    if perm is None:
        return H
    idx = perm.tolist()
    seen = bytearray(len(idx))
    for start in range(len(idx)):
        if seen[start] or idx[start] == start:
            seen[start] = 1
            continue
        tmp = H[start].clone()  # row i of the result is row idx[i] of H
        i = start
        while True:
            seen[i] = 1
            j = idx[i]
            if j == start:
                H[i] = tmp
                break
            H[i] = H[j]
            i = j
    return _permute_columns(H, perm)


def _permuted_copy(H: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """H[perm][:, perm] (a plain copy without ``perm``) with one n × n allocation: rows are gathered first,
    then each slab of rows has its columns permuted in place."""
    if perm is None:
        return H.clone()
    return _permute_columns(H.index_select(0, perm), perm)


def _permute_columns(A: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """A[:, perm] in A's own memory, SLAB_BYTES of rows at a time; returns A."""
    rows = max(1, SLAB_BYTES // (A.shape[1] * A.element_size()))
    for r in range(0, A.shape[0], rows):
        A[r:r + rows] = A[r:r + rows].index_select(1, perm)
    return A


_UPDATE_COLUMNS = 2048


def _ahead(W1: torch.Tensor, W: torch.Tensor, i: int, i2: int, k: int) -> torch.Tensor:
    """The next ``k`` columns from column ``i`` of the lazy block ``W1`` on, then W's from ``i2`` (a copy of just
    those columns, not of the whole rest of W)."""
    have = W1.shape[1] - i
    return W1[:, i:i + k].clone() if have >= k else torch.cat([W1[:, i:], W[:, i2:i2 + k - have]], dim=1)


def _solve(W: torch.Tensor, U: torch.Tensor, group_bits: torch.Tensor, grid: GridConfig, base, B: int):
    """The GPTQ column loop over W [m, n] (quantization order) with U the upper Cholesky factor of H⁻¹:
    each column rounded, its error spread onto the later columns, in lazy blocks of B columns; group
    parameters from the group's compensated weights when its first column comes. W is updated in place.
    Returns (codes, scales, zeros, dequantized Q, OBS loss); Q is W's own buffer (each finished column of W
    holds its dequantized value)."""
    m, n = W.shape
    g, ng = grid.group_size, n // grid.group_size
    codes = torch.zeros(m, n, dtype=torch.uint8, device=W.device)
    scales = torch.zeros(m, ng, device=W.device)
    zeros = torch.zeros(m, ng, device=W.device)
    losses = torch.zeros(m, device=W.device)
    # GPTQ's cost of a unit squared error in each column (weights of the "lsq" scale search)
    cost = 1 / torch.diagonal(U).float() ** 2 if grid.clip == "lsq" else None
    for i1 in range(0, n, B):
        i2 = min(i1 + B, n)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        Q1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            gi, b = col // g, int(group_bits[col // g])
            if grid.superblock and col % grid.superblock == 0 and b < FP16_BITS:
                # the super-block's float16 step from its current (compensated) weights
                step = superblock_steps(_ahead(W1, W, i, i2, grid.superblock), b, g, grid.signed)
            if col % g == 0 and b < FP16_BITS:
                # Group parameters from the current (already compensated) weights of the group.
                Wgrp = _ahead(W1, W, i, i2, g)
                s, z = choose_qparams(Wgrp, b, grid.sym, grid.clip, None if base is None else base[:, None],
                                      grid.signed, (step, b) if grid.superblock else None,
                                      None if cost is None else cost[col:col + g])
                scales[:, gi], zeros[:, gi] = s[:, 0], z[:, 0]
            w, d = W1[:, i], U1[i, i]
            if b < FP16_BITS:
                s, z = scales[:, gi], zeros[:, gi]
                c = quantize(w, s, z, 2**b - 1)
                codes[:, col] = c.to(torch.uint8)
                q = dequantize(c, s, z)
            else:
                q = w.half().float()
            Q1[:, i] = q
            err = (w - q) / d
            losses += (w - q) ** 2 / d**2 / 2
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        for c in range(i2, n, _UPDATE_COLUMNS):  # (column slabs: no m × n temporary)
            W[:, c:c + _UPDATE_COLUMNS] -= Err1 @ U[i1:i2, c:c + _UPDATE_COLUMNS]
        W[:, i1:i2] = Q1  # columns i1:i2 are done: they now hold their dequantized values
    return codes, scales, zeros, W, float(losses.sum())
