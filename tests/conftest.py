"""Shared fixtures: tiny random models built in code, no downloads."""

from __future__ import annotations

import os

# The tests never reach a model or dataset hub: offline mode makes the hub paths fail at once instead of
# after the network timeouts and retries (set before transformers / datasets read it at import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# ATen's vectorized CPU kernels round differently at AVX2 and AVX512 width, so a checkpoint's bits depend on the
# CPU (tests/test_regression.py compares sha256 digests): the tests use the AVX2 kernels every x86-64 CI machine
# has (read when torch first dispatches; an explicit setting wins).
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")

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


@pytest.fixture(scope="session")
def fp_folder(tmp_path_factory):
    """tiny-llama saved as a Hugging Face folder (tied embeddings, one safetensors file)."""
    model, tok = tiny_llama()
    folder = tmp_path_factory.mktemp("fp") / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_tiny_models(root, families, build) -> dict:
    """{family: folder} of ``build(family)`` saved with the byte-level tiny tokenizer (tiny random configs)."""
    from flexquant.models.builtin import tiny_tokenizer

    tok, out = tiny_tokenizer(), {}
    for family in families:
        out[family] = root / family
        build(family).save_pretrained(out[family])
        tok.save_pretrained(out[family])
    return out


@pytest.fixture(scope="session")
def ids():
    """The tiny-config families' windows (4 × 32 byte tokens): calibration and logits checks. A test file with
    other needs defines its own ``ids``."""
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


def quantize_tiny(folder, method, ids, **kw):
    """The tiny-config families' common quantize call (4 bits, groups of 32, batches of 2)."""
    import flexquant as fq

    return fq.quantize(str(folder), method=method, bits=4, group_size=32, calib_ids=ids, batch_size=2,
                       progress=False, **kw)
