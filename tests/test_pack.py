import pytest
import torch

from flexquant.config import GridConfig
from flexquant.format.pack import pack_bits, result_to_tensors, stored_bits, tensors_to_result, unpack_bits
from flexquant.nn import QuantLinear
from flexquant.quant import gptq_quantize, rtn_quantize


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("N", [1, 31, 32, 33, 64, 200])
def test_pack_unpack_round_trip(bits, N):
    codes = torch.randint(0, 2**bits, (7, N))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (7, -(-N // 32) * bits)  # exactly b words per 32 codes: no wasted bits
    assert torch.equal(unpack_bits(packed, bits, N), codes)


def _results(correlated_layer):
    W, H = correlated_layer
    yield rtn_quantize(W, GridConfig(bits=3, group_size=64))
    yield rtn_quantize(W, GridConfig(bits=4, group_size=32, sym=True))
    yield gptq_quantize(W, H, GridConfig(bits=2, group_size=64), group_bits=torch.tensor([2, 8, 3, 4]))
    yield gptq_quantize(W, H, GridConfig(bits=3, group_size=64), kept=torch.arange(64))
    yield gptq_quantize(W, H, GridConfig(bits=8, group_size=64, sym=True))


def test_result_tensor_round_trip_every_layout(correlated_layer):
    for r in _results(correlated_layer):
        t = result_to_tensors(r)
        m, n = r.shape
        back = tensors_to_result(t, m, n, r.group_size, r.sym)
        assert torch.equal(back.dequantize(), r.dequantize())


def test_quant_linear_matches_result_and_counts_its_bits(correlated_layer):
    for r in _results(correlated_layer):
        bias = torch.randn(r.shape[0])
        q = QuantLinear.from_result(r, bias)
        x = torch.randn(3, r.shape[1])
        ref = x @ r.dequantize().T + bias
        for kernel in ("reference", "dense-cache"):
            q.set_kernel(kernel)
            assert torch.allclose(q(x), ref, atol=1e-5)
        # bits claimed by the layer == bits of the tensors it stores (bias excluded)
        assert q.stored_bits() == stored_bits(result_to_tensors(r))
        m, n = r.shape
        ng = n // r.group_size
        nq = int(r.quantized_groups.sum())
        codes_bits = sum(r.group_size * m * int(b) for b in r.group_bits.tolist())
        meta = m * nq * 16 + (0 if r.sym else m * nq * 8) + ng * 8 + (0 if r.perm is None else 16 * n)
        assert q.stored_bits() == codes_bits + meta
