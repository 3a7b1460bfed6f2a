"""Error proxies that rank the candidate bit-widths of each group of a linear (SBGBS, METHODS.md §1)."""

from __future__ import annotations

import torch

from ..quant.gptq import factor_dtype, inverse_cholesky_upper
from ..quant.grid import choose_qparams, dequantize, quantize

PROXIES = ("block", "gptq")


def error_table(W: torch.Tensor, H: torch.Tensor, order: torch.Tensor, g: int, candidates,
                rows: torch.Tensor, proxy: str = "block", damp: float = 0.01, factor: str = "auto") -> torch.Tensor:
    """E[k, c]: the error of group k (in ``order``) quantized by RTN at candidate c, output rows weighted by
    their sensitivity r. proxy "block": Σ_i r_i ΔW_ik H_kk ΔW_ikᵀ (the group's own Hessian block, no
    compensation); "gptq": Σ_i Σ_(j∈k) r_i ΔW_ij² / U_jj², what GPTQ pays for each column after compensating
    the earlier ones (U: upper Cholesky factor of H⁻¹ in quantization order, factored in the dtype ``factor``
    names, as GPTQ's ``--factor-dtype``)."""
    m, n = W.shape
    Wp, Hp = W[:, order], H[order][:, order]
    ng = n // g
    Wg = Wp.reshape(m, ng, g)
    if proxy == "gptq":  # (factored in Hp's own memory, in the GPTQ solve's dtype: auto is float32 past 4096 columns)
        U, _ = inverse_cholesky_upper(Hp.float(), damp, own=True, dtype=factor_dtype(factor, n),
                                      rebuild=lambda: H[order][:, order].float())
        inv_d = (1 / torch.diag(U).float() ** 2).view(ng, g)  # GPTQ's cost per unit squared error
        del U, Hp
    else:
        Hkk = torch.stack([Hp[k * g:(k + 1) * g, k * g:(k + 1) * g] for k in range(ng)])  # [ng, g, g]
    out = torch.empty(ng, len(candidates))
    for c, b in enumerate(candidates):
        s, z = choose_qparams(Wg, b, clip="mse")
        dW = Wg - dequantize(quantize(Wg, s, z, 2**b - 1), s, z)  # [m, ng, g]
        if proxy == "gptq":
            out[:, c] = torch.einsum("m,mkg,kg->k", rows, dW**2, inv_d).cpu()
        else:
            out[:, c] = torch.einsum("m,mkg,kgh,mkh->k", rows, dW, Hkk, dW).cpu()
    return out
