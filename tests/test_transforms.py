import copy
import math

import pytest
import torch

from flexquant.models import get_spec
from flexquant.models.builtin import tiny_llama
from flexquant.transforms.hadamard import factorize, hadamard_matrix, kron_apply, small_hadamard
from flexquant.transforms.rotate import Rotation, incoherence, rotate_model


@pytest.mark.parametrize("a", [1, 2, 4, 12, 20, 28, 36, 44, 60])
def test_small_hadamard_constructions(a):
    H = small_hadamard(a)
    assert H is not None and set(H.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(H @ H.T, a * torch.eye(a, dtype=torch.float64))


@pytest.mark.parametrize("n,a,exact", [(576, 36, True), (1536, 12, True), (4096, 1, True), (14336, 28, True),
                                       (11008, 43, False), (320, 20, True)])
def test_factorisation_of_real_model_sizes(n, a, exact):
    s = factorize(n)
    assert (s.a, s.exact) == (a, exact) and n % s.a == 0


@pytest.mark.parametrize("n", [64, 576, 1536, 5 * 43])
def test_rotation_matrices_are_orthogonal_and_flat(n):
    M = hadamard_matrix(n)
    assert torch.allclose(M @ M.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    if factorize(n).exact:
        assert torch.allclose(M.abs(), torch.full_like(M, 1 / math.sqrt(n)))


def test_kron_chain_matches_sylvester():
    x = torch.randn(3, 256, dtype=torch.float64)
    assert torch.allclose(kron_apply(x, [small_hadamard(4), small_hadamard(64)]), x @ small_hadamard(256), atol=1e-10)


@pytest.fixture
def float64_norms(monkeypatch):
    """HF's RMSNorm upcasts to float32; keep it in the input dtype so float64 comparisons are exact."""
    from transformers.models.llama import modeling_llama

    def forward(self, h):
        var = h.pow(2).mean(-1, keepdim=True)
        return self.weight * (h * torch.rsqrt(var + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


def test_rotated_model_equals_original_in_float64(float64_norms):
    model = tiny_llama(hidden=128, intermediate=320)[0].double()  # 320 = 20·16: Paley factor online
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        ref = model(ids).logits
        rotated = copy.deepcopy(model)
        facts = rotate_model(rotated, get_spec("llama"), seed=3).facts
        out = rotated(ids).logits
    assert torch.allclose(out, ref, atol=1e-10, rtol=0)
    assert facts["online"]["small_factor"] == 20 and len(facts["online"]["sites"]) == 2
    assert rotated.lm_head.weight.data_ptr() != rotated.model.embed_tokens.weight.data_ptr()


def test_rotation_reduces_incoherence():
    model = tiny_llama()[0]
    before = [incoherence(b.mlp.up_proj.weight) for b in model.model.layers]
    rotated = copy.deepcopy(model)
    rotate_model(rotated, get_spec("llama"))
    after = [incoherence(b.mlp.up_proj.weight) for b in rotated.model.layers]
    assert max(after) < min(before)


@pytest.mark.parametrize("n", [64, 576, 1536, 4096 + 4096])
def test_rotation_stays_on_its_inputs_device(n):
    """The Hadamard factors are built on the inputs' device: a rotation held on a GPU (an online rotation moved
    with its layer) must not mix in CPU tensors. The meta device stands in for CUDA here (found on an H200:
    flexible on --device cuda failed in torch.kron with cuda:0 and cpu)."""
    from flexquant.transforms.hadamard import _kron_factors

    factor = Rotation.random(n, 0).factor.float().to("meta")
    mats = _kron_factors(factor, n // factor.shape[0])
    assert all(m.device.type == "meta" for m in mats)
    assert kron_apply(torch.zeros(2, n, device="meta"), mats).shape == (2, n)


def test_rows_are_transformed_by_chunks_into_one_result(monkeypatch):
    """`_by_rows` writes each float64 chunk's result into one tensor (no list of chunks and their concatenation):
    the same values as the whole matrix at once, for a last chunk that is short, and for a transposed view."""
    from flexquant.transforms import rotate

    R = Rotation.random(48, seed=3)
    X = torch.randn(37, 48)
    whole = R.apply(X.double()).float()
    monkeypatch.setattr(rotate, "ROWS", 8)
    assert torch.equal(rotate._by_rows(R.apply, X, torch.float32), whole)
    W = torch.randn(48, 37)
    assert torch.equal(rotate._by_rows(R.apply, W.T, torch.float16), R.apply(W.T.double()).half())
    assert rotate._by_rows(R.apply, X[:0], torch.float32).shape == (0, 48)
