"""Shared fixtures: tiny random models built in code, no downloads."""

from __future__ import annotations

import os

# The tests never reach a model or dataset hub: offline mode makes the hub paths fail at once instead of
# after the network timeouts and retries (set before transformers / datasets read it at import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from flexquant.models.builtin import tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the seeded random tiny Llama; tests must not modify the model."""
    return tiny_llama()


@pytest.fixture(scope="session")
def calib_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (16, 128), generator=g)


@pytest.fixture
def correlated_layer():
    """A weight and a Hessian from correlated, unevenly scaled inputs (as in real models)."""
    g = torch.Generator().manual_seed(0)
    n, m, T = 256, 96, 2048
    mix = torch.randn(n, n, generator=g) / n**0.5 + torch.eye(n)
    X = (torch.randn(T, n, generator=g) @ mix) * (0.2 + 3 * torch.rand(n, generator=g))
    W = torch.randn(m, n, generator=g) * 0.05
    H = 2 * X.T @ X / T
    return W, H
