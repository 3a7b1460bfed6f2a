"""Decoder families without a tested ModelSpec (issue "model families", part 3): a spec is discovered when the model
is loaded (block list, embedding, head, final norm, linear groups in forward order), GPTQ and RTN run on it through
the generic per-group path, the checkpoint saves and loads; methods that need more of the structure refuse it,
and a model whose blocks cannot be described is refused."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import quantize_tiny, save_tiny_models
from torch import nn

import flexquant as fq
from flexquant.errors import FlexQuantError
from flexquant.models import discover
from flexquant.models.spec import SPECS, get_spec
from flexquant.nn import QuantLinear

TOKENS = dict(vocab_size=258, bos_token_id=256, eos_token_id=257, pad_token_id=257)
# What discovery must find: (layers, embedding, final norm, linear groups in forward order).
EXPECTED = {
    # parallel residual: the attention and the MLP read two different norms of the same stream
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.embed_in", "gpt_neox.final_layer_norm", (
        ("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",))),
    # one norm feeds the fused q/k/v and the MLP (parallel block): one group, placed where q/k/v runs
    "falcon": ("transformer.h", "transformer.word_embeddings", "transformer.ln_f", (
        ("self_attention.query_key_value", "mlp.dense_h_to_4h"), ("self_attention.dense",),
        ("mlp.dense_4h_to_h",))),
    "starcoder2": ("model.layers", "model.embed_tokens", "model.norm", (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",), ("mlp.c_fc",),
        ("mlp.c_proj",))),
}
FAMILIES = tuple(EXPECTED)


def _config(family: str):
    import transformers as t

    if family == "gpt_neox":
        return t.GPTNeoXConfig(**TOKENS, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                               num_hidden_layers=2)
    if family == "falcon":  # multi-query attention, tied head
        return t.FalconConfig(**TOKENS, hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    return t.Starcoder2Config(**TOKENS, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                              num_key_value_heads=2, num_hidden_layers=2)


def tiny_model(family: str):
    """Seeded random weights, heavy-tailed columns, norms with distinct scales (two norms left at their initial
    ones would read equal values)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(family), attn_implementation="sdpa")
        for name, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in name:
                p.data = torch.randn_like(p) * (0.5 / p.shape[1] ** 0.5)
                p.data[:, : p.shape[1] // 16] *= 4.0
            elif p.dim() == 1:
                p.data = (1.0 + 0.3 * torch.rand_like(p)) if "weight" in name else 0.05 * torch.randn_like(p)
    model.config.use_cache = False
    return model.float().eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("fallback"), FAMILIES, tiny_model)


@pytest.mark.parametrize("family", FAMILIES)
def test_discovered_spec(family):
    assert family not in SPECS
    rng = torch.random.get_rng_state()
    spec = discover.spec_for(_config(family))
    assert torch.equal(torch.random.get_rng_state(), rng)  # discovery draws from its own generator
    assert (spec.layers, spec.embed, spec.final_norm, spec.linear_groups) == EXPECTED[family]
    assert spec.lm_head == "lm_head" and spec.discovered and not spec.prenorm and not spec.rotatable
    assert not spec.norm_linear_pairs and not spec.online_rotations and not spec.residual_writers
    assert get_spec(family) is spec


@pytest.mark.parametrize("family", FAMILIES)
def test_groups_read_one_input_in_the_trained_model(family, ids):
    """Found on a random skeleton; in the model with its own weights each group's linears read one input (so its
    first linear's Hessian is theirs) and each group's inputs differ from the other groups'."""
    model, spec = tiny_model(family), discover.spec_for(_config(family))
    block, seen = model.get_submodule(spec.layers)[0], {}
    hooks = [block.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: seen.setdefault(n, a[0]))
             for n in spec.linears]
    with torch.no_grad():
        model(ids[:1])
    for h in hooks:
        h.remove()
    firsts = [seen[g[0]] for g in spec.linear_groups]
    for group, x in zip(spec.linear_groups, firsts):
        assert all(torch.equal(seen[n], x) for n in group)
        assert sum(y.shape == x.shape and torch.allclose(y, x) for y in firsts) == 1


# Streamed (the default for a folder) and loaded whole. transformers saves GPT-NeoX's head as ``embed_out`` and
# renames it to ``lm_head`` when it loads the folder: with --stream auto such a folder is loaded whole.
@pytest.mark.parametrize("family,method,stream", [
    ("gpt_neox", "gptq", "off"), ("gpt_neox", "rtn", "off"), ("gpt_neox", "rtn", "auto"),
    ("falcon", "gptq", "auto"), ("falcon", "rtn", "off"), ("starcoder2", "gptq", "auto"), ("starcoder2", "rtn", "off"),
])
def test_quantize_save_load(folders, ids, tmp_path, family, method, stream):
    qm = quantize_tiny(folders[family], method, ids, stream=stream)
    spec = get_spec(family)
    packed = [n for n, m in qm.model.named_modules() if isinstance(m, QuantLinear)]
    assert sorted(packed) == sorted(f"{spec.layers}.{i}.{n}" for i in range(2) for n in spec.linears)
    if method == "gptq":  # each linear solved with its group's Hessian: a small error relative to the weights'
        assert all(0 < r["rel_error"] < 0.1 for r in qm.report["layers"]), qm.report["layers"]
    out = fq.save(qm, tmp_path / "q", plot=False)
    re = fq.load(out)
    with torch.no_grad():
        got, want = re.model(ids[:2]).logits, qm.model(ids[:2]).logits
        ref = tiny_model(family)(ids[:2]).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert 0 < (want - ref).abs().max() < ref.abs().max()  # quantized: near the model, not equal to it


def test_warning_once_per_family(caplog):
    discover._warned.pop("gpt_neox", None)
    with caplog.at_level(logging.WARNING, logger="flexquant.models.discover"):
        discover.spec_for(_config("gpt_neox"))
        discover.spec_for(_config("gpt_neox"))
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["model family gpt_neox has no tested ModelSpec; discovered 4 linears in 4 groups per block; "
                    "only gptq/rtn are supported; please report results"]


@pytest.mark.parametrize("method,options,match", [
    ("flexible", {}, "only a discovered one .*pass --no-dosa --no-lfd, or use --method gptq"),
    ("flexible", {"dosa": False}, "only a discovered one"),
    ("adaptive", {}, "needs Llama-style blocks.*use --method gptq"),
])
def test_methods_needing_the_structure_refuse(folders, ids, method, options, match):
    with pytest.raises(FlexQuantError, match=match) as e:
        quantize_tiny(folders["falcon"], method, ids, options=options)
    assert "\n" not in str(e.value)


def test_undescribable_models_are_refused(tmp_path):
    class NoBlocks(nn.Module):  # its layers are no ModuleList
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(model_type="toy", num_hidden_layers=2)
            self.body = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

    with pytest.raises(FlexQuantError, match="'toy' is not supported.*decoder blocks could not be found"):
        discover.discover_spec(NoBlocks())
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "g")
    with pytest.raises(FlexQuantError, match="'gpt2' is not supported.*Conv1D") as e:
        fq.quantize(str(tmp_path / "g"), method="rtn", progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(FlexQuantError, match="not supported"):
        get_spec("gpt2")  # nothing was registered for it
