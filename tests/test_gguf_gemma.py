"""GGUF export of Gemma 3 (`gemma3_text`): llama.cpp's ``gemma3`` architecture — norms stored as 1 + w, no rotary
row reorder, sliding-window hyperparameters — and a SentencePiece-style vocabulary (pieces, scores from the merge
ranks, byte tokens); llama.cpp's logits and tokens where its binding is installed (bench/llama_env.sh)."""

import importlib.util
import json
import os

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from test_gguf import HF  # GGUF linear name -> the block-relative transformers one

import flexquant as fq
from flexquant.errors import FlexQuantError
from flexquant.interop import export_checkpoint
from flexquant.interop.gguf import hyperparameters

NORMS = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
         "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
         "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
LAYER_TYPES = ["sliding_attention"] * 5 + ["full_attention"]  # llama.cpp's gemma3 pattern: every 6th layer global


def _tokenizer():
    """A Gemma-style tokenizer.json: BPE over ▁-joined pieces with byte fallback, trained on a few letters."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    g = torch.Generator().manual_seed(0)
    letters = "abcdefgh"
    text = [" ".join("".join(letters[i] for i in torch.randint(0, 8, (int(k),), generator=g))
                     for k in torch.randint(1, 5, (30,), generator=g)) for _ in range(100)]
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=330, special_tokens=specials, show_progress=False,
                                                      initial_alphabet=list(letters + "\u2581")))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    tok = _tokenizer()
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
                           sliding_window=8, layer_types=LAYER_TYPES, max_position_embeddings=4096,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma's x·(1 + w): non-trivial w, so a missing + 1 shows
                p.data = 0.3 * torch.rand_like(p) - 0.1
    folder = tmp_path_factory.mktemp("gemma") / "fp"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def quantized(gemma, tmp_path_factory):
    calib = torch.randint(4, 300, (8, 64), generator=torch.Generator().manual_seed(2))
    qm = fq.quantize(str(gemma), method="gptq", bits=4, progress=False, calib_ids=calib, batch_size=4,
                     target="gguf")
    return qm, fq.save(qm, tmp_path_factory.mktemp("gemma-q") / "q", plot=False)


def _fields(path):
    reader = gguf.GGUFReader(path)
    return reader, {f.name: f for f in reader.fields.values()}


def test_gemma3_is_written_as_llama_cpps_gemma3(gemma, quantized, tmp_path):
    qm, path = quantized
    out = export_checkpoint(path, tmp_path / "g.gguf", "gguf", gguf_embedding="f32")
    results = {n: m.to_result() for n, m in qm.model.named_modules() if hasattr(m, "to_result")}
    assert out["block_types"] == {"Q4_0": len(results)}
    reader, f = _fields(tmp_path / "g.gguf")
    assert bytes(f["general.architecture"].parts[-1]).decode() == "gemma3"
    assert int(f["gemma3.attention.sliding_window"].parts[-1][0]) == 8
    assert float(f["gemma3.rope.freq_base_swa"].parts[-1][0]) == 10000.0
    assert int(f["gemma3.attention.key_length"].parts[-1][0]) == 32  # not hidden / heads
    sd = qm.model.state_dict()
    norms = 0
    for t in reader.tensors:
        parts = t.name.split(".")
        blk, kind = (parts[1], parts[2]) if parts[0] == "blk" else (None, parts[0])
        if t.tensor_type.name == "Q4_0" and kind in HF:  # exact codes, rows in transformers' order (NEOX rotary)
            ref = results[f"model.layers.{blk}.{HF[kind]}"].dequantize(torch.float32)
            assert torch.equal(torch.from_numpy(dequantize(t.data, t.tensor_type)).float(), ref), t.name
        elif kind.endswith("norm"):
            key = "model.norm.weight" if blk is None else f"model.layers.{blk}.{NORMS[kind]}.weight"
            assert torch.allclose(torch.from_numpy(np.array(t.data)), sd[key] + 1), t.name
            norms += 1
    assert norms == 6 * 6 + 1


def test_a_sentencepiece_style_vocabulary(gemma, tmp_path):
    from transformers import AutoTokenizer

    export_checkpoint(gemma, tmp_path / "f.gguf", "gguf", dtype="float32", gguf_embedding="f32")
    _, f = _fields(tmp_path / "f.gguf")
    tok = AutoTokenizer.from_pretrained(gemma)
    assert bytes(f["tokenizer.ggml.model"].parts[-1]).decode() == "llama"
    tokens = [bytes(f["tokenizer.ggml.tokens"].parts[i]).decode() for i in f["tokenizer.ggml.tokens"].data]
    types = [int(f["tokenizer.ggml.token_type"].parts[i][0]) for i in f["tokenizer.ggml.token_type"].data]
    scores = [float(f["tokenizer.ggml.scores"].parts[i][0]) for i in f["tokenizer.ggml.scores"].data]
    vocab = tok.get_vocab()
    assert tokens == sorted(vocab, key=vocab.get)
    assert types[vocab["<0x41>"]] == gguf.TokenType.BYTE and types[vocab["<bos>"]] == gguf.TokenType.CONTROL
    merges = [m if isinstance(m, str) else " ".join(m)
              for m in json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]]
    first, last = (a.replace(" ", "") for a in (merges[0], merges[-1]))
    assert scores[vocab[first]] == 0.0 and scores[vocab[last]] == -(len(merges) - 1)  # minus the merge rank
    assert int(f["tokenizer.ggml.bos_token_id"].parts[-1][0]) == tok.bos_token_id


def test_gemma3_layouts_llama_cpp_cannot_run_are_refused():
    cfg = {"model_type": "gemma3_text", "num_attention_heads": 4, "hidden_size": 64, "head_dim": 16,
           "num_hidden_layers": 3, "intermediate_size": 128, "vocab_size": 300, "sliding_window": 8,
           "query_pre_attn_scalar": 16, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}
    with pytest.raises(FlexQuantError, match="every 6th layer"):
        hyperparameters(cfg)
    cfg["layer_types"] = ["sliding_attention"] * 3
    assert hyperparameters(cfg)["sliding_window"] == 8
    with pytest.raises(FlexQuantError, match="query_pre_attn_scalar 32"):
        hyperparameters({**cfg, "query_pre_attn_scalar": 32})
    with pytest.raises(FlexQuantError, match="final_logit_softcapping"):
        hyperparameters({**cfg, "final_logit_softcapping": 30.0})


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or not os.environ.get("LLAMA_CPP_LIB_PATH"),
                    reason="llama.cpp's binding not installed (bash bench/llama_env.sh; run with .venv-llama)")
def test_llama_cpp_runs_the_gemma3_files(gemma, quantized, tmp_path):
    """Same tokens as transformers' tokenizer; the float file gives the float model's logits; the quantized file
    flexquant's quantized model's, up to llama.cpp's 8-bit activations in its Q4_0 dot products."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from flexquant.eval.llama_cpp import llama_logits
    from flexquant.models.loader import load_model

    def rel(a, b):
        return float(np.abs(a - b).max() / (b.max() - b.min()))

    qm, path = quantized
    export_checkpoint(gemma, tmp_path / "f.gguf", "gguf", dtype="float32", gguf_embedding="f32")
    export_checkpoint(path, tmp_path / "m.gguf", "gguf", gguf_embedding="f32")
    text = "abc deff gha  bb cafe\nhead 42 é"
    ids = AutoTokenizer.from_pretrained(gemma)(text)["input_ids"]
    llm = Llama(model_path=str(tmp_path / "f.gguf"), n_ctx=64, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids  # (this tokenizer adds no BOS)
    fp, _ = load_model(str(gemma))
    x = torch.randint(4, 300, (1, 40), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref_q, ref_fp = qm.model(x).logits[0].float().numpy(), fp(x).logits[0].float().numpy()
    assert rel(llama_logits(tmp_path / "f.gguf", x[0].tolist()), ref_fp) < 2e-3
    got = llama_logits(tmp_path / "m.gguf", x[0].tolist())
    assert rel(got, ref_q) < 0.25 * rel(ref_q, ref_fp), (rel(got, ref_q), rel(ref_q, ref_fp))


def test_flexible_for_gguf_on_gemma_runs_without_a_rotation(gemma, tmp_path, caplog):
    """Gemma's residual stream cannot be rotated and GGUF cannot express online rotations: DOSA is off, said so."""
    calib = torch.randint(4, 300, (8, 64), generator=torch.Generator().manual_seed(2))
    qm = fq.quantize(str(gemma), method="flexible", group_size=64, progress=False, calib_ids=calib, batch_size=4,
                     target="gguf", options=dict(bpw=5.0, dosa=True, alloc_nsamples=4))
    assert "DOSA's rotation is off" in caplog.text
    assert all(m.to_result().rotation is None for m in qm.model.modules() if hasattr(m, "to_result"))
    out = export_checkpoint(fq.save(qm, tmp_path / "q", plot=False), tmp_path / "f.gguf", "gguf")
    assert out["bpw"] <= 5.0
