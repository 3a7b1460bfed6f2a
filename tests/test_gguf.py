"""`--target gguf` and `flexquant export --format gguf`: methods quantize into GGML block types, and the GGUF file
holds exactly the quantized weights (checked with the gguf package's own dequantizers), the budget counted as the
file stores it; llama.cpp's logits where its binding is installed (bench/llama_env.sh)."""

import importlib.util
import json
import os

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize

import flexquant as fq
from flexquant.cli import main
from flexquant.errors import FlexQuantError
from flexquant.interop import export_checkpoint
from flexquant.interop.gguf import rope_pairs

HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
      "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
      "ffn_down": "mlp.down_proj"}


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 256, (8, 128), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny-llama as a folder with a real byte-level BPE tokenizer of its 256 ids (merges included: llama.cpp
    loads no BPE vocabulary without them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from flexquant.models.loader import load_model

    folder = tmp_path_factory.mktemp("tiny") / "fp"
    model, _ = load_model("tiny-llama")
    model.save_pretrained(folder)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    g = torch.Generator().manual_seed(0)
    letters = "abcdefghijklmnop"
    text = [" ".join("".join(letters[i] for i in torch.randint(0, 16, (int(k),), generator=g))
                     for k in torch.randint(1, 6, (40,), generator=g)) for _ in range(200)]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=model.config.vocab_size, show_progress=False))
    assert tok.get_vocab_size() == model.config.vocab_size
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def flexible(tiny, calib, tmp_path_factory):
    qm = fq.quantize(str(tiny), method="flexible", group_size=64, progress=False, calib_ids=calib, batch_size=4,
                     target="gguf", options=dict(bpw=5.5, alloc_nsamples=4))
    return qm, fq.save(qm, tmp_path_factory.mktemp("gguf") / "q", plot=False)


def _results(qm):
    return {n: m.to_result() for n, m in qm.model.named_modules() if hasattr(m, "to_result")}


def _assert_file_holds(qm, file, results):
    """Every GGML-typed linear of ``file`` dequantizes (gguf's own decoders) to exactly the packed weight."""
    cfg = qm.model.config
    reader = gguf.GGUFReader(file)
    seen = 0
    for t in reader.tensors:
        if t.tensor_type.name not in ("Q4_0", "Q5_0", "Q8_0", "Q3_K", "Q6_K") or not t.name.startswith("blk."):
            continue  # (the embedding is Q8_0 by default)
        _, blk, kind, _ = t.name.split(".")
        ref = results[f"model.layers.{blk}.{HF[kind]}"].dequantize(torch.float32)
        if kind in ("attn_q", "attn_k"):
            ref = ref[rope_pairs(ref.shape[0], cfg.num_attention_heads if kind == "attn_q"
                                 else cfg.num_key_value_heads)]
        assert torch.equal(torch.from_numpy(dequantize(t.data, t.tensor_type)).float(), ref), t.name  # bit-exact
        seen += 1
    assert seen == len(results)
    return reader


def test_flexible_quantizes_into_ggml_types_and_the_file_holds_its_weights(flexible, tmp_path):
    qm, path = flexible
    results = _results(qm)
    widths = set()
    for name, r in results.items():
        bits = set(r.group_bits.tolist())
        assert len(bits) == 1 and bits <= {4, 5, 8}, name  # one GGML type per linear
        widths |= bits
        assert r.group_size == 32 and r.zeros is None and r.scale_base is None and r.perm is None
    assert len(widths) > 1  # the search mixed types
    alloc = qm.report["method"]["flexible"]["allocation"]
    assert alloc["target"] == "gguf" and alloc["planned_bpw"] <= 5.5
    out = export_checkpoint(path, tmp_path / "m.gguf", "gguf", gguf_embedding="f32")
    assert out["bpw"] == pytest.approx(alloc["planned_bpw"], abs=1e-6)  # the budget is what the file stores
    assert out["file_bytes"] == (tmp_path / "m.gguf").stat().st_size
    reader = _assert_file_holds(qm, tmp_path / "m.gguf", results)
    cfg = qm.model.config
    fields = {f.name: f for f in reader.fields.values()}
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert int(fields["llama.block_count"].parts[-1][0]) == cfg.num_hidden_layers
    assert int(fields["llama.attention.head_count_kv"].parts[-1][0]) == cfg.num_key_value_heads
    assert len(fields["tokenizer.ggml.tokens"].data) == cfg.vocab_size


def test_rope_pairs_turn_half_split_rotary_into_adjacent_pairs():
    d, heads, pos = 8, 3, 5
    q = torch.randn(heads * d)
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    cos, sin = torch.cos(pos * inv), torch.sin(pos * inv)
    h = q.view(heads, d)  # transformers: pairs (i, i + d/2)
    x, y = h[:, : d // 2], h[:, d // 2:]
    hf = torch.cat([x * cos - y * sin, y * cos + x * sin], -1).reshape(-1)
    p = q[rope_pairs(heads * d, heads)].view(heads, d // 2, 2)  # llama.cpp: pairs (2i, 2i + 1)
    a, b = p[..., 0], p[..., 1]
    ggml = torch.stack([a * cos - b * sin, b * cos + a * sin], -1).reshape(-1)
    assert torch.allclose(ggml, hf[rope_pairs(heads * d, heads)], atol=1e-6)


def test_gptq_at_4_bits_is_q4_0_and_the_cli_writes_it(tiny, calib, tmp_path, capsys):
    qm = fq.quantize(str(tiny), method="gptq", bits=4, progress=False, calib_ids=calib, batch_size=4,
                     target="gguf")
    assert qm.config.grid.sym_grid == "signed" and qm.config.grid.clip == "lsq"  # the target's defaults
    path = fq.save(qm, tmp_path / "q", plot=False)
    assert main(["export", str(path), "--format", "gguf", "--out", str(tmp_path / "g.gguf")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["block_types"] == {"Q4_0": len(_results(qm))} and res["bpw"] == pytest.approx(4.5)
    types = {t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "g.gguf").tensors}
    assert types == {"Q4_0", "Q8_0", "F32"}  # linears, embedding (Q8_0 by default), norms


def test_a_coarser_embedding_is_ggmls_own_rounding(tiny, calib, tmp_path):
    """--gguf-embedding q5_0 / q4_0: the tied embedding rounded at export with GGML's rule (gguf's reference)."""
    from gguf.quants import quantize

    from flexquant.models.loader import load_model

    qm = fq.quantize(str(tiny), method="rtn", bits=4, progress=False, calib_ids=calib, target="gguf")
    path = fq.save(qm, tmp_path / "q", plot=False)
    E = load_model(str(tiny))[0].get_input_embeddings().weight.detach().float().numpy()
    sizes = {}
    for kind in ("q8_0", "q5_0", "q4_0"):
        out = export_checkpoint(path, tmp_path / f"{kind}.gguf", "gguf", gguf_pre="gpt-2", gguf_embedding=kind)
        t = {t.name: t for t in gguf.GGUFReader(tmp_path / f"{kind}.gguf").tensors}["token_embd.weight"]
        qtype = gguf.GGMLQuantizationType[kind.upper()]
        assert t.tensor_type == qtype and np.array_equal(np.asarray(t.data).reshape(-1),
                                                         quantize(E, qtype).reshape(-1))
        sizes[kind] = out["file_bytes"]
    assert sizes["q4_0"] < sizes["q5_0"] < sizes["q8_0"]


def test_k_quants_reach_below_q4_0_and_export_exactly(tiny, calib, tmp_path):
    """Below Q4_0 everywhere (4.5 bpw) the search takes Q3_K where rows hold 256-weight super-blocks (tiny-llama's
    down_proj: 256 columns); its group scales are multiples of one float16 step, so the file is bit-exact."""
    qm = fq.quantize(str(tiny), method="flexible", group_size=64, progress=False, calib_ids=calib, batch_size=4,
                     target="gguf", sym_grid="signed", options=dict(bpw=4.3, alloc_nsamples=4))
    results = _results(qm)
    kq = {n: r for n, r in results.items() if r.group_size == 16}
    assert kq and all(n.endswith("down_proj") and set(r.group_bits.tolist()) <= {3, 6} for n, r in kq.items())
    alloc = qm.report["method"]["flexible"]["allocation"]
    assert alloc["planned_bpw"] <= 4.3
    path = fq.save(qm, tmp_path / "q", plot=False)
    out = export_checkpoint(path, tmp_path / "k.gguf", "gguf")
    assert "Q3_K" in out["block_types"] and out["bpw"] == pytest.approx(alloc["planned_bpw"], abs=1e-6)
    _assert_file_holds(qm, tmp_path / "k.gguf", results)


def test_k_quant_blocks_decode_with_ggml(tmp_path):
    """Q3_K / Q6_K bytes against the gguf package's decoders, subnormal float16 steps included."""
    from flexquant.interop.gguf_kquants import block_bytes

    g = torch.Generator().manual_seed(0)
    for bits, kind in ((3, "Q3_K"), (6, "Q6_K")):
        lo = -32 if bits == 3 else -128
        codes = torch.randint(0, 2**bits, (3, 512), generator=g, dtype=torch.uint8)
        k = torch.randint(lo, -lo, (3, 2, 16), generator=g).float()
        k[k == 0] = 1
        step = torch.tensor([5 * 2.0**-10, 3 * 2.0**-20]).view(1, 2, 1)
        scales = (step * k).reshape(3, 32)
        data, name = block_bytes(codes, scales, bits)
        ref = ((codes.float() - 2 ** (bits - 1)).view(3, 32, 16) * scales[..., None]).view(3, 512)
        assert name == kind and torch.equal(torch.from_numpy(dequantize(data, gguf.GGMLQuantizationType[kind])), ref)


def test_signed_scales_are_ggml_scales(tiny, calib, tmp_path):
    """--sym-grid signed (the Q4_0 rule: the extreme on code 0, a negative scale where the extreme is positive)
    exports bit-exactly: GGML's d is a signed float16."""
    qm = fq.quantize(str(tiny), method="gptq", bits=4, progress=False, calib_ids=calib, batch_size=4,
                     target="gguf", sym_grid="signed")
    results = _results(qm)
    assert any(bool((r.scales < 0).any()) for r in results.values())
    path = fq.save(qm, tmp_path / "q", plot=False)
    export_checkpoint(path, tmp_path / "s.gguf", "gguf")
    _assert_file_holds(qm, tmp_path / "s.gguf", results)


def test_refusals_name_the_fix_and_leave_nothing_behind(calib, flexible, tmp_path):
    qm = fq.quantize("tiny-llama", method="gptq", bits=4, progress=False, calib_ids=calib, batch_size=4)
    path = fq.save(qm, tmp_path / "asym", plot=False)  # asymmetric, group 64: not a GGML grid
    with pytest.raises(FlexQuantError, match="--target gguf"):
        export_checkpoint(path, tmp_path / "a.gguf", "gguf", gguf_pre="gpt-2")
    assert not (tmp_path / "a.gguf").exists() and not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    _, good = flexible
    plain = fq.save(fq.quantize("tiny-llama", method="gptq", bits=4, progress=False, calib_ids=calib, batch_size=4,
                                target="gguf"), tmp_path / "plain", plot=False)
    with pytest.raises(FlexQuantError, match="pre-tokenizer"):  # tiny-llama's own splitter: none llama.cpp names
        export_checkpoint(plain, tmp_path / "b.gguf", "gguf")
    with pytest.raises(FlexQuantError, match="without merges"):  # ... and its vocabulary has no merges
        export_checkpoint(plain, tmp_path / "b.gguf", "gguf", gguf_pre="gpt-2")
    with pytest.raises(FlexQuantError, match=".gguf file"):
        export_checkpoint(good, tmp_path / "b", "gguf", gguf_pre="gpt-2")
    (tmp_path / "c.gguf").write_text("not a gguf")
    with pytest.raises(FlexQuantError, match="not a GGUF file"):
        export_checkpoint(good, tmp_path / "c.gguf", "gguf", gguf_pre="gpt-2", overwrite=True)
    with pytest.raises(FlexQuantError, match="apply to --format gguf only"):
        export_checkpoint(good, tmp_path / "d", "gptq", gguf_pre="gpt-2")
    with pytest.raises(FlexQuantError, match="groups of 32 only"):
        fq.quantize("tiny-llama", method="flexible", progress=False, calib_ids=calib, target="gguf",
                    options=dict(bpw=5.0, group_sizes=(32, 64)))


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or not os.environ.get("LLAMA_CPP_LIB_PATH"),
                    reason="llama.cpp's binding not installed (bash bench/llama_env.sh; run with .venv-llama)")
def test_llama_cpp_computes_the_exported_models(tiny, flexible, tmp_path):
    """The float file gives the float model's logits (float16 KV cache level); the quantized file gives flexquant's
    quantized model's, up to llama.cpp's CPU dot products, which round activations to 8 bits per 32 (Q8_0) for
    Q4_0/Q5_0/Q8_0 weights: far closer to it than the quantized model is to the float one."""
    from flexquant.eval.llama_cpp import llama_logits
    from flexquant.models.loader import load_model

    def rel(a, b):
        return float(np.abs(a - b).max() / (b.max() - b.min()))

    qm, path = flexible
    fp, _ = load_model(str(tiny))
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref_q, ref_fp = qm.model(ids).logits[0].float().numpy(), fp(ids).logits[0].float().numpy()
    export_checkpoint(tiny, tmp_path / "f.gguf", "gguf", dtype="float32", gguf_embedding="f32")
    assert rel(llama_logits(tmp_path / "f.gguf", ids[0].tolist()), ref_fp) < 2e-3
    export_checkpoint(path, tmp_path / "m.gguf", "gguf", gguf_embedding="f32")
    got = llama_logits(tmp_path / "m.gguf", ids[0].tolist())
    assert rel(got, ref_q) < 0.25 * rel(ref_q, ref_fp) and rel(got, ref_q) < 3e-2, (rel(got, ref_q),
                                                                                     rel(ref_q, ref_fp))


def test_a_float_folder_is_written_in_float_with_rope_rows(tiny, tmp_path):
    from flexquant.models.loader import load_model

    model, _ = load_model(str(tiny))
    out = export_checkpoint(tiny, tmp_path / "f.gguf", "gguf", dtype="float32", gguf_embedding="f32")
    assert out["block_types"] == {} and out["quantized_weights"] == 0
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "f.gguf").tensors}
    assert {t.tensor_type.name for t in tensors.values()} == {"F32"}
    cfg, sd = model.config, model.state_dict()
    q = sd["model.layers.1.self_attn.q_proj.weight"]
    got = torch.from_numpy(np.array(tensors["blk.1.attn_q.weight"].data)).reshape(q.shape)
    assert torch.equal(got, q[rope_pairs(q.shape[0], cfg.num_attention_heads)])
    v = torch.from_numpy(np.array(tensors["blk.0.attn_v.weight"].data))
    assert torch.equal(v.reshape(-1), sd["model.layers.0.self_attn.v_proj.weight"].reshape(-1))
