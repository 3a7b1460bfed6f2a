"""The packed CPU kernel (`packed-cpu`): the compiled extension builds, and every layout it meets — 1/2/3-bit
groups in 3-bit codes, 2/3/4-bit groups in nibbles, 8-bit groups in bytes, mixed widths, act-order permutations,
kept float16 columns, an online rotation — gives the reference kernel's output for decode-sized and prefill-sized
batches; a lean load holds one layout per linear and float16 ends."""

import pytest
import torch

import flexquant as fq
from flexquant.kernels.cpu_packed import extension, prepare
from flexquant.nn.quant_linear import QuantLinear
from flexquant.quant.result import FP16_BITS, QuantResult


def test_the_extension_builds():
    assert extension() is not None  # a compiler and Python headers are part of the install (README)


def _layer(bits: list[int], g: int, sym: bool, perm: bool, m: int = 48, seed: int = 0) -> QuantLinear:
    gen = torch.Generator().manual_seed(seed)
    ng = len(bits)
    n = ng * g
    group_bits = torch.tensor(bits, dtype=torch.uint8)
    q = group_bits < FP16_BITS
    codes = torch.zeros(m, n, dtype=torch.uint8)
    for j, b in enumerate(bits):
        if b < FP16_BITS:
            codes[:, j * g:(j + 1) * g] = torch.randint(0, 2**b, (m, g), generator=gen, dtype=torch.uint8)
    nq = int(q.sum())
    zeros = None if sym else torch.stack([torch.randint(0, 2**b, (m,), generator=gen) for b in bits
                                          if b < FP16_BITS], 1).to(torch.uint8)
    kept = (torch.randn(m, (ng - nq) * g, generator=gen).half() if nq < ng else None)
    r = QuantResult(codes=codes, scales=(torch.rand(m, nq, generator=gen) + 0.1).half().float(), zeros=zeros,
                    group_bits=group_bits, group_size=g, sym=sym,
                    perm=torch.randperm(n, generator=gen) if perm else None, fp16_cols=kept)
    return QuantLinear.from_result(r, bias=torch.randn(m, generator=gen))


@pytest.mark.parametrize("bits,g,sym,perm", [
    ([4, 4, 4, 4], 32, False, False), ([2, 3, 4, 3], 64, False, True), ([3, 16, 2, 4], 32, True, True),
    ([8, 4, 8, 2], 32, False, False), ([8, 8, 16, 8], 128, True, True),
    ([3, 3, 3, 3], 64, False, True), ([3, 2, 16, 1], 32, True, False), ([1, 3], 96, True, True),  # 3-bit layout
    ([2, 3], 24, False, False)])  # a group size 3-bit codes cannot take: nibbles
@pytest.mark.parametrize("batch", [1, 3, 37])
def test_packed_cpu_equals_the_reference_kernel(bits, g, sym, perm, batch):
    layer = _layer(bits, g, sym, perm)
    x = torch.randn(batch, 5, layer.in_features)
    layer.set_kernel("reference")
    ref = layer(x)
    layer.set_kernel("packed-cpu")
    got = layer(x)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    top = max(b for b in bits if b < FP16_BITS)
    st = prepare(layer)
    assert st.bits == (4 if top <= 4 else 8)
    st = prepare(layer, compact=True)  # a lean load's layout
    assert st.bits == (3 if top <= 3 and g % 32 == 0 else 4 if top <= 4 else 8)
    layer._kernel_cache = st
    got = layer(x)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert st.codes.numel() == layer.out_features * layer.in_features * st.bits // 8  # 3 bits, nibbles or bytes


def test_a_whole_model_with_rotation_and_kept_columns(tmp_path):
    calib = torch.randint(0, 256, (8, 128), generator=torch.Generator().manual_seed(2))
    qm = fq.quantize("tiny-llama", method="flexible", progress=False, calib_ids=calib, batch_size=4,
                     options=dict(bpw=3.0, alloc_nsamples=4))  # DOSA's online rotation, kept fp16 columns
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    out = {}
    for k in ("reference", "packed-cpu"):
        for mod in qm.model.modules():
            if isinstance(mod, QuantLinear):
                mod.set_kernel(k)
        with torch.no_grad():
            out[k] = qm.model(ids).logits
    assert torch.allclose(out["packed-cpu"], out["reference"], atol=1e-4)


def test_a_lean_load_holds_one_layout_and_half_ends(tmp_path, monkeypatch):
    """lean=True: each linear keeps only packed-cpu's layout, the embedding and untied head are read as float16
    (computed in float32); the logits stay those of a normal load up to the ends' float16 rounding."""
    from flexquant.format import checkpoint
    from flexquant.nn.lean import HalfStoredLinear

    calib = torch.randint(0, 256, (8, 128), generator=torch.Generator().manual_seed(2))
    qm = fq.quantize("tiny-llama", method="flexible", progress=False, calib_ids=calib, batch_size=4,
                     options=dict(bpw=3.0, alloc_nsamples=4))  # DOSA: an untied (rotated) head, online rotation
    fq.save(qm, tmp_path / "ck", plot=False)
    monkeypatch.setattr(checkpoint, "END_NUMEL", 1024)  # tiny-llama's ends are small: count them as ends
    full = fq.load(tmp_path / "ck", kernel="packed-cpu")
    lean = fq.load(tmp_path / "ck", lean=True)
    m = lean.model
    assert m.get_input_embeddings().weight.dtype == torch.float16 and isinstance(m.lm_head, HalfStoredLinear)
    assert m.lm_head.weight.dtype == torch.float16 and m.model.norm.weight.dtype == torch.float32
    layers = [mod for mod in m.modules() if isinstance(mod, QuantLinear)]
    assert layers and all(not any(n.startswith("qweight") for n, _ in mod.named_buffers()) for mod in layers)
    assert lean.bpw == pytest.approx(full.bpw)  # the stored bits are remembered
    m.to("cpu")  # a move that stays on the CPU keeps the layouts
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, got = full.model(ids).logits, m(ids).logits
    assert got.dtype == torch.float32
    assert (got - ref).abs().max() <= 2e-3 * ref.abs().max()
    with pytest.raises(fq.FlexQuantError, match="lean=True"):
        fq.save(lean, tmp_path / "again", plot=False)
    with pytest.raises(fq.FlexQuantError, match="lean=True"):
        fq.load(tmp_path / "ck", lean=True, kernel="dense-cache")
    from flexquant.cli import main

    assert main(["eval", str(tmp_path / "ck"), "--lean", "--seqlen", "64", "--windows", "1", "-q"]) == 0
    assert main(["generate", str(tmp_path / "ck"), "--lean", "--prompt", "def", "--max-new-tokens", "3", "-q"]) == 0


@pytest.mark.parametrize("b,n", [(1, 576), (3, 72), (4, 13)])
def test_half_matmul_converts_float16_rows_as_it_reads_them(b, n):
    gen = torch.Generator().manual_seed(4)
    w, x = torch.randn(300, n, generator=gen).half(), torch.randn(b, n, generator=gen)
    ref = x @ w.float().T
    assert torch.allclose(extension().half_matmul(x, w), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
