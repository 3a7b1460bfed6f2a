"""Running Hessian H = 2/T * sum_t x_t x_tᵀ of a linear layer's inputs."""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Accumulates H from batches of inputs [..., n] in float32, as a running mean over tokens."""

    def __init__(self, n: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros(n, n, dtype=torch.float32, device=device)
        self.tokens = 0

    @torch.no_grad()
    def add(self, X: torch.Tensor) -> None:
        X = X.reshape(-1, X.shape[-1]).to(self.H.device, torch.float32)  # [T, n]
        T = X.shape[0]
        if not torch.isfinite(X).all():
            raise FloatingPointError("non-finite activations reached a linear layer during calibration")
        total = self.tokens + T
        self.H.mul_(self.tokens / total)
        X = X * (2.0 / total) ** 0.5
        self.H.addmm_(X.t(), X)
        self.tokens = total
