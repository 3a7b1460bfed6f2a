"""Shared fixtures of the vision tests: one torch thread (CI machines are shared) and a tiny trained-ish model."""

from __future__ import annotations

import pytest
import torch

from flexquant.vision import build_model


@pytest.fixture(autouse=True)
def _one_thread():
    # Two threads on a shared 2-core machine spin against each other and run ~30x slower.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _make_model(name: str = "tiny_resnet", dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """A small classifier whose BatchNorms hold non-trivial statistics, so folding is really exercised."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=5, in_channels=3).to(dtype)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 12, 12, dtype=dtype) * 2 + 0.5)
    return model.eval()


@pytest.fixture
def make_model():
    """Factory of small classifiers with non-trivial BatchNorm statistics: make_model(name, dtype, seed)."""
    return _make_model


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(48, 3, 12, 12, generator=torch.Generator().manual_seed(1))
