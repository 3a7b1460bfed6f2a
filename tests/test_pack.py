import pytest
import torch

from flexquant.config import GridConfig
from flexquant.nn import QuantLinear
from flexquant.quant import gptq_quantize, rtn_quantize
from flexquant.quant.pack import pack_bits, result_to_tensors, stored_bits, tensors_to_result, unpack_bits


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("N", [1, 31, 32, 33, 64, 200])
def test_pack_unpack_round_trip(bits, N):
    codes = torch.randint(0, 2**bits, (7, N))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (7, -(-N // 32) * bits)  # exactly b words per 32 codes: no wasted bits
    assert torch.equal(unpack_bits(packed, bits, N), codes)



@pytest.mark.parametrize("bits", [3, 4, 8])
def test_pack_in_row_slabs_equals_one_pass(bits, monkeypatch):
    """Packing is done in row slabs (bounded int64 temporaries); the slabs join to the one-pass packing."""
    from flexquant.quant import pack

    codes = torch.randint(0, 2**bits, (37, 200), dtype=torch.uint8)
    whole = pack_bits(codes, bits)
    monkeypatch.setattr(pack, "PACK_SLAB_CODES", 3 * 200 + 5)  # 3 rows per slab, the last slab 1 row
    assert torch.equal(pack_bits(codes, bits), whole)
    assert torch.equal(unpack_bits(whole, bits, 200), codes.long())

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


def _compact_results(correlated_layer):
    W, H = correlated_layer
    yield rtn_quantize(W, GridConfig(bits=3, group_size=64, scale_bits=8, zero_bits=4))
    yield rtn_quantize(W, GridConfig(bits=4, group_size=32, sym=True, scale_bits=8))
    yield gptq_quantize(W, H, GridConfig(bits=2, group_size=64, scale_bits=8, zero_bits=4),
                        group_bits=torch.tensor([2, 4, 3, 1]))
    yield gptq_quantize(W, H, GridConfig(bits=3, group_size=64, scale_bits=8), kept=torch.arange(64))


def test_compact_metadata_round_trips_and_costs_what_it_stores(correlated_layer):
    from flexquant.alloc import Layout, fixed_bits

    for r in _compact_results(correlated_layer):
        t = result_to_tensors(r)
        assert "scales" not in t and t["scale_codes"].dtype == torch.uint8 and t["scale_base"].dtype == torch.float16
        assert ("zeros_b4" in t) == (not r.sym and r.zero_bits == 4)
        m, n = r.shape
        back = tensors_to_result(t, m, n, r.group_size, r.sym)
        assert torch.equal(back.dequantize(), r.dequantize())  # the fake-quant weight is what loads
        q = QuantLinear.from_result(r)
        x = torch.randn(3, n)
        assert torch.allclose(q(x), x @ r.dequantize().T, atol=1e-5)
        ng = n // r.group_size
        n16 = int((~r.quantized_groups).sum())
        codes_bits = sum(r.group_size * m * int(b) for b in r.group_bits.tolist() if b < 16)
        fixed = fixed_bits(Layout(m, n, r.group_size, r.sym, 8, r.zero_bits, r.perm is not None), n16)
        assert q.stored_bits() == codes_bits + fixed + m * r.group_size * n16 * 16
        nq = ng - n16
        saved = m * nq * 8 - 16 * m  # 8-bit codes instead of fp16 scales, plus one fp16 base per row
        if not r.sym and r.zero_bits == 4:
            saved += m * nq * 8 - t["zeros_b4"].numel() * 32
        classic = fixed_bits(Layout(m, n, r.group_size, r.sym, 16, 8, r.perm is not None), n16)
        assert classic - fixed == saved > 0


def test_log_scales_cost_little_accuracy(correlated_layer):
    W, _ = correlated_layer
    for bits in (2, 3, 4):
        fp16 = rtn_quantize(W, GridConfig(bits=bits, group_size=64))
        log8 = rtn_quantize(W, GridConfig(bits=bits, group_size=64, scale_bits=8, zero_bits=4))
        e16 = (W - fp16.dequantize()).pow(2).sum()
        e8 = (W - log8.dequantize()).pow(2).sum()
        assert e8 <= 1.03 * e16  # 2.2%-spaced scales, searched by the same MSE clip
        ratio = log8.scales / log8.scale_base[:, None]
        steps = -32 * torch.log2(ratio)
        assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.min() >= 0 and steps.max() <= 255


def test_zero_bits_4_rejects_wide_groups():
    with pytest.raises(Exception, match="zero_bits=4"):
        GridConfig(bits=8, zero_bits=4)
