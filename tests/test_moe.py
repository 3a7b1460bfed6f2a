"""Mixture-of-experts families (mixtral, qwen3_moe, qwen2_moe): tiny random models built in code. The fused 3-D
experts of transformers 5 become one linear per expert with the same outputs; each expert is quantized from the
tokens routed to it (weighted by routing weight) or, with ``moe_calibration="all"``, from every token; a checkpoint
stores one packed linear per expert and loads to the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import quantize_tiny, save_tiny_models

import flexquant as fq
from flexquant.errors import FlexQuantError
from flexquant.models.experts import LinearExperts, sparse_damped, unfuse_experts
from flexquant.models.spec import get_spec
from flexquant.nn import QuantLinear

COMMON = dict(vocab_size=258, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=4096, bos_token_id=256, eos_token_id=257, pad_token_id=257,
              num_hidden_layers=2, num_experts_per_tok=2)
FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe")
EXPERTS = 4


def _config(family: str, **extra):
    import transformers as t

    if family == "mixtral":
        return t.MixtralConfig(**COMMON, num_local_experts=EXPERTS, **extra)
    if family == "qwen3_moe":
        return t.Qwen3MoeConfig(**COMMON, num_experts=EXPERTS, moe_intermediate_size=64, head_dim=16, **extra)
    return t.Qwen2MoeConfig(**COMMON, num_experts=EXPERTS, moe_intermediate_size=64,
                            shared_expert_intermediate_size=96, **extra)


def tiny_moe(family: str):
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(family))
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.data = torch.randn_like(p) * (0.5 / p.shape[-1] ** 0.5)
    model.config.use_cache = False
    return model.float().eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("moe"), FAMILIES, tiny_moe)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_unfused_experts_compute_what_the_fused_ones_do(family, ids):
    fused = tiny_moe(family)
    model = tiny_moe(family)
    assert unfuse_experts(model) == COMMON["num_hidden_layers"]
    assert isinstance(model.model.layers[0].mlp.experts, LinearExperts)
    assert isinstance(model.model.layers[0].mlp.experts.get_submodule("3.down_proj"), torch.nn.Linear)
    ref = _logits(fused, ids)
    assert torch.allclose(_logits(model, ids), ref, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("family,method", [(f, "gptq") for f in FAMILIES] + [("mixtral", "rtn")])
def test_quantize_save_load(folders, ids, tmp_path, family, method):
    qm = quantize_tiny(folders[family], method, ids)
    spec = get_spec(family, qm.model.config)
    packed = [n for n, m in qm.model.named_modules() if isinstance(m, QuantLinear)]
    assert len(packed) == sum(len(spec.linears_in(b)) for b in qm.model.model.layers)
    assert sum(".experts." in n for n in packed) == COMMON["num_hidden_layers"] * EXPERTS * 3
    assert not any(n.endswith(("mlp.gate", "shared_expert_gate")) for n in packed)  # routers stay full precision
    re = fq.load(fq.save(qm, tmp_path / "q", plot=False))
    assert torch.equal(_logits(re.model, ids[:2]), _logits(qm.model, ids[:2]))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_flexible_spans_the_experts(folders, ids, tmp_path, family):
    qm = quantize_tiny(folders[family], "flexible", ids, options=dict(bpw=3.0, dosa=False, lfd=False,
                                                                      alloc_nsamples=4, fisher_nsamples=2))
    assert 2.9 <= qm.bpw <= 3.0
    rows = qm.report["experts"]["linears"]
    assert len(rows) == COMMON["num_hidden_layers"] * EXPERTS * 3
    assert all(2 <= r["bits"] <= 8 for r in rows)  # (the search may give every expert the same width)
    re = fq.load(fq.save(qm, tmp_path / "q", plot=False))
    assert torch.allclose(_logits(re.model, ids[:2]), _logits(qm.model, ids[:2]), atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_flexible_moe_exports_to_compressed_tensors_that_transformers_loads(folders, ids, tmp_path, family):
    """FlexibleLLM's search inside what vLLM serves (4/8-bit widths, one per linear, one for all experts), exported to
    compressed-tensors under the hub's tensor names (Mixtral: block_sparse_moe.experts.E.w1/w3/w2), which
    transformers loads into its fused experts with the same logits; flexquant imports it back too."""
    pytest.importorskip("compressed_tensors")
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from flexquant.interop import export_checkpoint

    options = dict(bpw=5.0, dosa=False, lfd=False, alloc_nsamples=4, fisher_nsamples=2)
    qm = fq.quantize(str(folders[family]), method="flexible", bits=4, group_size=32, calib_ids=ids, batch_size=2,
                     progress=False, sym=True, target="vllm", options=options)
    rows = qm.report["experts"]["linears"]
    assert len({r["bits"] for r in rows}) == 1  # one width for every expert: one config group for transformers
    export_checkpoint(fq.save(qm, tmp_path / "q", plot=False), tmp_path / "e", "compressed-tensors")
    with safe_open(str(tmp_path / "e" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    hub = "block_sparse_moe.experts.3.w2" if family == "mixtral" else "mlp.experts.3.down_proj"
    assert f"model.layers.1.{hub}.weight_packed" in names
    groups = json.loads((tmp_path / "e" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(groups) == 2  # 4 and 8 bits: the experts' group found by its regex target, the others by name
    assert sum(t.startswith("re:") for g in groups.values() for t in g["targets"]) == 1
    ref = _logits(qm.model, ids[:2])
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "e"), dtype=torch.float32)
    assert type(hf.model.layers[1].mlp.experts).__name__.endswith("Experts")  # transformers' own fused module
    assert (_logits(hf, ids[:2]) - ref).abs().max() <= 2.0**-8 * ref.abs().max()  # float16 scales of the same grid
    assert (_logits(fq.load(tmp_path / "e").model, ids[:2]) - ref).abs().max() <= 2.0**-8 * ref.abs().max()


def test_mixtral_hub_names_stream(folders):
    """A Mixtral folder in the hub layout (what save_pretrained writes) streams block by block: its expert names
    map onto the model's own."""
    from flexquant.models.loader import load_streamed
    from flexquant.models.stream import ATTRIBUTE

    model, _ = load_streamed(str(folders["mixtral"]), strict=True)  # strict: differing names would be refused
    assert getattr(model, ATTRIBUTE) is not None and all(p.is_meta for p in model.model.layers.parameters())


def test_routed_and_all_calibration(folders, ids):
    routed = quantize_tiny(folders["mixtral"], "gptq", ids)
    every = quantize_tiny(folders["mixtral"], "gptq", ids, moe_calibration="all")
    tokens = ids.numel()
    r, a = routed.report["experts"], every.report["experts"]
    assert r["calibration"] == "routed" and a["calibration"] == "all"
    gate = [x for x in r["linears"] if x["name"].startswith("model.layers.0.") and x["name"].endswith("gate_proj")]
    assert sum(x["tokens"] for x in gate) == tokens * COMMON["num_experts_per_tok"]  # each token reaches top-k
    assert all(x["tokens"] == tokens for x in a["linears"]) and a["under_sampled"] == []
    assert {x["name"] for x in r["under_sampled"]} == {x["name"] for x in r["linears"] if x["tokens"] < x["inputs"]}
    assert not torch.equal(_logits(routed.model, ids[:1]), _logits(every.model, ids[:1]))


def test_sparse_hessian_is_damped_toward_its_diagonal():
    lin = torch.nn.Linear(4, 2)
    X = torch.randn(2, 4)
    H = 2 * X.T @ X / 2
    assert torch.equal(sparse_damped(torch.zeros(4, 4), 0, lin), torch.eye(4)) and lin.calib_tokens == 0
    damped = sparse_damped(H, 2, lin)
    assert torch.linalg.matrix_rank(H) == 2 and torch.linalg.matrix_rank(damped) == 4
    assert torch.allclose(damped, 0.5 * H + 0.5 * H.diagonal().mean() * torch.eye(4))
    assert sparse_damped(H, 4, lin) is H


def test_routing_weights_reach_the_hessian(ids):
    """An expert's Hessian in routed mode is 2/T·Σ w·x·xᵀ over its routed tokens (w: the routing weight)."""
    from flexquant.models.experts import ROW_WEIGHTS, calibration
    from flexquant.pipeline.capture import BlockInputs
    from flexquant.pipeline.hooks import collect_hessian

    model = tiny_moe("mixtral")
    unfuse_experts(model)
    block, seen = model.model.layers[0], {}
    lin = block.mlp.experts.get_submodule("1.gate_proj")
    lin.register_forward_pre_hook(lambda m, a: seen.update(x=a[0].clone(), w=getattr(m, ROW_WEIGHTS).clone()))
    h = model.model.embed_tokens(ids[:1])
    pos = torch.arange(ids.shape[1])[None]
    kw = {"position_embeddings": model.model.rotary_emb(h, pos), "position_ids": pos, "attention_mask": None}
    with calibration(model, "routed"):
        H = collect_hessian(block, "mlp.experts.1.gate_proj", BlockInputs([h], [kw]), torch.device("cpu"))
    x, w = seen["x"], seen["w"]
    assert 0 < w.min() and w.max() < 1
    want = 2 * (x * w[:, None]).T @ x / x.shape[0]
    if x.shape[0] < x.shape[1]:
        want = sparse_damped(want, x.shape[0], torch.nn.Linear(1, 1))
    assert torch.allclose(H, want, atol=1e-5)


def _deepseek(q_lora_rank):
    import transformers as t

    cfg = t.DeepseekV3Config(vocab_size=258, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                             num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=EXPERTS,
                             num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
                             num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank, kv_lora_rank=32,
                             qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                             max_position_embeddings=4096, bos_token_id=256, eos_token_id=257, pad_token_id=257)
    return cfg


@pytest.mark.parametrize("family,extra", [("qwen3_moe", {"mlp_only_layers": [0]}), ("deepseek_v3", {"q": 32}),
                                          ("deepseek_v3", {"q": None})],
                         ids=["qwen3_moe-dense-first", "deepseek_v3-q_lora", "deepseek_v3-q_proj"])
def test_models_mixing_dense_and_expert_blocks(family, extra, ids, tmp_path):
    """Blocks differ (dense first layers; DeepSeek's latent attention with or without the low-rank q): each block
    quantizes the linears it has; the rest (routers, the score-correction bias) stays in full precision."""
    from transformers import AutoModelForCausalLM

    from flexquant.models.builtin import tiny_tokenizer

    cfg = _deepseek(extra["q"]) if family == "deepseek_v3" else _config(family, **extra)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).float().eval()
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    ref = _logits(model, ids)
    unfuse_experts(model)
    assert torch.allclose(_logits(model, ids), ref, atol=1e-5 * float(ref.abs().max()))
    qm = quantize_tiny(tmp_path / "m", "gptq", ids)
    spec = get_spec(family, qm.model.config)
    layers = qm.model.model.layers
    assert "mlp.down_proj" in spec.linears_in(layers[0]) and "mlp.experts.0.down_proj" not in spec.linears_in(layers[0])
    assert "mlp.experts.3.down_proj" in spec.linears_in(layers[-1])
    packed = {n for n, m in qm.model.named_modules() if isinstance(m, QuantLinear)}
    want = {f"model.layers.{i}.{n}" for i, b in enumerate(layers) for n in spec.linears_in(b)}
    assert packed == want
    assert all(isinstance(m, torch.nn.Linear) and not isinstance(m, QuantLinear)
               for n, m in qm.model.named_modules() if n.endswith("lm_head"))
    re = fq.load(fq.save(qm, tmp_path / "q", plot=False))
    assert torch.equal(_logits(re.model, ids[:2]), _logits(qm.model, ids[:2]))


def test_what_moe_blocks_cannot_do_is_refused(folders, ids):
    with pytest.raises(FlexQuantError, match="--no-dosa"):
        quantize_tiny(folders["mixtral"], "flexible", ids, options=dict(bpw=3.0, lfd=False))
    with pytest.raises(FlexQuantError, match="--no-lfd"):
        quantize_tiny(folders["mixtral"], "flexible", ids, options=dict(bpw=3.0, dosa=False))


def test_a_moe_family_without_a_spec_is_discovered_expert_by_expert(ids, tmp_path):
    """GLM-4.5's MoE (no tested spec): the discovery runs every expert, each becomes its own groups; GPTQ
    quantizes every expert from its routed tokens."""
    import transformers as t

    from flexquant.models.builtin import tiny_tokenizer

    cfg = t.Glm4MoeConfig(vocab_size=258, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                          num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, n_routed_experts=EXPERTS,
                          num_experts_per_tok=2, first_k_dense_replace=0, head_dim=16, bos_token_id=256,
                          eos_token_id=257, pad_token_id=257)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        t.AutoModelForCausalLM.from_config(cfg).float().save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    qm = quantize_tiny(tmp_path / "m", "gptq", ids)
    spec = get_spec("glm4_moe")
    assert spec.discovered and ("mlp.experts.3.gate_proj", "mlp.experts.3.up_proj") in spec.linear_groups
    assert len(qm.report["experts"]["linears"]) == 2 * EXPERTS * 3
    packed = [n for n, m in qm.model.named_modules() if isinstance(m, QuantLinear) and ".experts." in n]
    assert len(packed) == 2 * EXPERTS * 3
    re = fq.load(fq.save(qm, tmp_path / "q", plot=False))
    assert torch.equal(_logits(re.model, ids[:2]), _logits(qm.model, ids[:2]))


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_exports_hold_one_linear_per_expert_and_reimport(folders, ids, tmp_path, fmt):
    """The export writes each expert's packed linear under its own name (the per-expert layout of llm-compressor's
    MoE checkpoints) and flexquant imports it back with the same logits."""
    pytest.importorskip("compressed_tensors")
    from safetensors import safe_open

    from flexquant.interop import export_checkpoint

    qm = quantize_tiny(folders["qwen3_moe"], "rtn", ids, sym=True)
    export_checkpoint(fq.save(qm, tmp_path / "q", plot=False), tmp_path / "e", fmt)
    with safe_open(str(tmp_path / "e" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    packed = "weight_packed" if fmt == "compressed-tensors" else "qweight"
    assert f"model.layers.1.mlp.experts.3.down_proj.{packed}" in names
    assert "model.layers.1.mlp.gate.weight" in names  # the router, in full precision
    re = fq.load(tmp_path / "e")
    assert torch.allclose(_logits(re.model, ids[:2]), _logits(qm.model, ids[:2]), atol=1e-4)
