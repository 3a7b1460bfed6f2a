"""Column impact: what rounding each input column costs the layer output (OBS, Frantar & Alistarh 2022).

s_ij = f_i (w_ij − Q(w_ij))² / [H⁻¹]_jj is the OBS cost of rounding weight ij (rows weighted by their loss
Fisher f); a column's impact sums its weights' costs. FlexibleLLM uses it to find attribute outliers (DOSA),
the high-impact ratio method to choose which columns keep the higher bit-width. Also the latent columns a
GPTQ-quantized prefix leaves for the columns quantized after it.
"""

from __future__ import annotations

import torch

from .gptq import factor_dtype, inverse_cholesky_upper
from .grid import choose_qparams, dequantize, quantize

OBS_QUANTILE = 0.99  # impact "obs": a column scores the per-weight OBS costs it holds above this quantile
IMPACTS = ("salience", "obs")


def hinv_diagonal(H: torch.Tensor, damp: float, factor: str = "auto") -> torch.Tensor:
    """diag((H + λI)⁻¹) = diag(UᵀU) (factored in the GPTQ solve's dtype, ``--factor-dtype``: auto is float32
    past 4096 columns)."""
    U, _ = inverse_cholesky_upper(H, damp, dtype=factor_dtype(factor, H.shape[0]))
    return U.square_().sum(0)  # (U is this call's own copy)


def rounding_error(W: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """w − Q(w) for W [m, n] under min-max RTN at ``bits`` per group of ``group_size`` columns."""
    m, n = W.shape
    Wg = W.reshape(m, n // group_size, group_size)
    s, z = choose_qparams(Wg, bits)
    return (Wg - dequantize(quantize(Wg, s, z, 2**bits - 1), s, z)).reshape(m, n)


def salience(W: torch.Tensor, hinv_diag: torch.Tensor, bits: int, group_size: int,
             rows: torch.Tensor) -> torch.Tensor:
    """σ_j = Σ_i r_i (w_ij − Q(w_ij))² / [H⁻¹]_jj (the row sum first, then one division per column)."""
    err = rounding_error(W, bits, group_size)
    return (rows[:, None] * err**2).sum(0) / hinv_diag


def column_impact(W: torch.Tensor, H: torch.Tensor, rows: torch.Tensor, bits: int, group_size: int, damp: float,
                  mode: str = "salience", factor: str = "auto") -> torch.Tensor:
    """Impact of each input column of W [m, n] from the per-weight OBS costs: their sum ("salience"), or only
    the costs above the layer's OBS_QUANTILE ("obs": columns that hold the most damaging single weights)."""
    err = rounding_error(W.float(), bits, group_size)
    cost = rows.float()[:, None] * err**2 / hinv_diagonal(H.float(), damp, factor)
    if mode == "salience":
        return cost.sum(0)
    flat = cost.flatten()
    tau = flat.kthvalue(max(1, int(OBS_QUANTILE * flat.numel()))).values
    return (cost * (cost >= tau)).sum(0) + 1e-6 * cost.sum(0)  # the full sum breaks ties


def latent_high_columns(W: torch.Tensor, H: torch.Tensor, Q_lo: torch.Tensor, perm: torch.Tensor, k_cols: int,
                        damp: float) -> torch.Tensor:
    """The last ``k_cols`` columns (in order ``perm``) after GPTQ has compensated the quantized others:
    V = W_hi + (W_lo − Q_lo) H_lo,hi H_hi,hi⁻¹ (damped H, dead columns as in GPTQ) — the continuous weights
    that minimise the layer-output error given Q_lo, which a higher-precision quantizer then rounds."""
    n = W.shape[1]
    W64, H64 = W.double().clone(), H.double().clone()
    dead = torch.diag(H64) == 0
    H64[dead, dead] = 1
    W64[:, dead] = 0
    W64, H64 = W64[:, perm], H64[perm][:, perm]
    H64 += damp * float(torch.diag(H64).mean()) * torch.eye(n, dtype=torch.float64, device=H.device)
    lo, hi = slice(0, n - k_cols), slice(n - k_cols, n)
    dW = W64[:, lo] - Q_lo.double()
    return (W64[:, hi] + torch.linalg.solve(H64[hi, hi], H64[lo, hi].T @ dW.T).T).float()
