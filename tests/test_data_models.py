import pytest
import torch

import flexquant as fq
from flexquant.data import calibration_windows, eval_windows, load_text
from flexquant.errors import FlexQuantError
from flexquant.models import get_spec, load_model
from flexquant.models.builtin import tiny_llama


def test_pydoc_split_is_deterministic_and_disjoint():
    calib, held = load_text("pydoc", "calib"), load_text("pydoc", "eval")
    assert len(calib) > 200_000 and len(held) > 50_000
    assert load_text("pydoc", "eval") == held
    assert held[:2000] not in calib


def test_windows(tiny):
    tok = tiny[1]
    a = calibration_windows(tok, "pydoc", 4, 64, seed=3)
    b = calibration_windows(tok, "pydoc", 4, 64, seed=3)
    c = calibration_windows(tok, "pydoc", 4, 64, seed=4)
    assert a.shape == (4, 64) and torch.equal(a, b) and not torch.equal(a, c)
    e = eval_windows(tok, "pydoc", 1024, windows=3)
    assert e.shape == (3, 1024)
    e.zero_()  # the tokens are kept per (tokenizer, text): what a caller gets is its own copy
    again = eval_windows(tok, "pydoc", 1024, windows=3)
    assert again.any() and torch.equal(again[:, :64], eval_windows(tiny_llama()[1], "pydoc", 1024, 3)[:, :64])
    calib_text = load_text("pydoc", "calib")  # a cached tokenization is the tokenizer's own
    direct = tok(calib_text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    assert torch.equal(calibration_windows(tok, "pydoc", 1, direct.numel() - 1)[0], direct[:-1])  # one start: 0


def test_local_text_sources(tmp_path, tiny):
    tok = tiny[1]
    (tmp_path / "a.txt").write_text("hello world " * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("more text " * 100)
    assert "more text" in load_text(str(tmp_path), "calib")
    assert calibration_windows(tok, str(tmp_path / "a.txt"), 2, 32).shape == (2, 32)
    (tmp_path / "empty.txt").write_text("   ")
    with pytest.raises(FlexQuantError, match="empty"):
        load_text(str(tmp_path / "empty.txt"), "calib")
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(FlexQuantError, match="tokens"):
        calibration_windows(tok, str(tmp_path / "short.txt"), 2, 512)
    with pytest.raises(FlexQuantError, match="fewer than one window"):
        eval_windows(tok, str(tmp_path / "short.txt"), 512)
    with pytest.raises(FlexQuantError, match="neither"):
        load_text(str(tmp_path / "missing.txt"), "calib")


def test_hub_datasets_fail_clearly_offline():
    with pytest.raises(FlexQuantError, match="datasets|pydoc"):
        load_text("wikitext2", "eval")


def test_spec_registry_and_unknown_family(tmp_path):
    for fam in ("llama", "mistral", "qwen2", "qwen3"):
        assert get_spec(fam).linears[0] == "self_attn.q_proj"
    with pytest.raises(FlexQuantError, match="granite, llama, mistral, mixtral, olmo2, phi3, qwen2, qwen2_moe"):
        get_spec("gpt2")
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "g")
    with pytest.raises(FlexQuantError, match="not supported"):
        load_model(str(tmp_path / "g"))


def test_unknown_model_fails_fast_offline():
    with pytest.raises(FlexQuantError, match="not a built-in name"):
        load_model("no-such-org/no-such-model")
    with pytest.raises(FlexQuantError, match="without config.json"):
        load_model("tests")


def test_nan_weights_are_refused(tmp_path):
    model, tok = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    tok.save_pretrained(tmp_path / "nan")
    with pytest.raises(FlexQuantError, match="NaN"):
        fq.quantize(str(tmp_path / "nan"), method="rtn", group_size=32)
