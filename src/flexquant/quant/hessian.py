"""Running Hessian H = 2/T·Σ_t x_t x_tᵀ of a linear layer's inputs, and optionally the feedback cross
term D = 2/T'·Σ_t (x_fp,t − x_t) x_tᵀ between full-precision-stream and quantized-stream inputs, over
the T' tokens that came with full-precision inputs (all of them, or a subset)."""

from __future__ import annotations

import torch

from ..errors import FlexQuantError


class HessianAccumulator:
    """Accumulates H (and D when given X_fp) from batches of inputs [..., n] in float32, as running means."""

    def __init__(self, n: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros(n, n, dtype=torch.float32, device=device)
        self.D: torch.Tensor | None = None
        self.tokens = 0
        self.cross_tokens = 0

    def begin_batch(self) -> None:
        """Several `add`s until `end_batch` are the row chunks of one calibration batch (a distributed run keeps
        them together so that the global batch order stays that of one process); nothing to do here."""

    def end_batch(self) -> None:
        pass

    @torch.no_grad()
    def add(self, X: torch.Tensor, X_fp: torch.Tensor | None = None) -> None:
        X = X.reshape(-1, X.shape[-1]).to(self.H.device, torch.float32)  # [T, n]
        T = X.shape[0]
        total = self.tokens + T
        self.H.addmm_(X.t(), X, beta=self.tokens / total, alpha=2.0 / total)
        self.tokens = total
        # diag H = running mean of x²: non-finite iff some input was (or overflowed), checked in O(n)
        if not torch.isfinite(self.H.diagonal()).all():
            raise FlexQuantError("activations reaching a linear layer during calibration overflowed to inf/NaN: the "
                                 "model's weights or activations exceed float32 (check the model's weights)")
        if X_fp is not None:
            dX = X_fp.reshape(-1, X.shape[-1]).to(self.H.device, torch.float32) - X
            if self.D is None:
                self.D = torch.zeros_like(self.H)
            total = self.cross_tokens + T
            self.D.addmm_(dX.t(), X, beta=self.cross_tokens / total, alpha=2.0 / total)
            self.cross_tokens = total
