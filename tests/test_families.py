"""Model families beyond Llama (phi3, olmo2, granite, gemma2, gemma3_text): tiny random models built in code
quantize, save and load; the block loop's stream is the model's own forward (per-layer masks and rotary tables
of sliding-window layers, sandwich norms, residual multipliers); what a family cannot do is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import quantize_tiny, save_tiny_models

import flexquant as fq
from flexquant.config import QuantConfig
from flexquant.errors import FlexQuantError
from flexquant.methods.baselines import GPTQ
from flexquant.models.spec import ModelSpec, get_spec
from flexquant.nn import QuantLinear
from flexquant.pipeline import StatsRequest, capture_block_inputs, fp_statistics, quantize_blocks
from flexquant.pipeline.capture import kwargs_for

CPU = torch.device("cpu")
COMMON = dict(vocab_size=258, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=4096, bos_token_id=256, eos_token_id=257, pad_token_id=257)
GEMMA = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8)  # windows of 32 tokens: the mask matters


def _config(family: str):
    import transformers as t

    if family == "phi3":
        return t.Phi3Config(**COMMON, num_hidden_layers=2)
    if family == "olmo2":
        return t.Olmo2Config(**COMMON, num_hidden_layers=2)
    if family == "granite":
        return t.GraniteConfig(**COMMON, num_hidden_layers=2, embedding_multiplier=3.0, residual_multiplier=0.4,
                               attention_multiplier=0.2, logits_scaling=2.5)
    if family == "gemma2":  # sliding, full, sliding; attention and final logits soft-capped
        return t.Gemma2Config(**COMMON, **GEMMA, num_hidden_layers=3, final_logit_softcapping=0.2,
                              attn_logit_softcapping=2.0)
    return t.Gemma3TextConfig(**COMMON, **GEMMA, num_hidden_layers=3,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"])


FAMILIES = ("phi3", "olmo2", "granite", "gemma2", "gemma3_text")
SLIDING = ("gemma2", "gemma3_text")


def tiny_model(family: str):
    """A seeded random tiny model with heavy-tailed weights and non-trivial norm scales (zero-initialised Gemma
    norm weights would hide a wrong x·(1 + w) fold)."""
    from transformers import AutoModelForCausalLM

    cfg = _config(family)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=get_spec(family).attn_implementation)
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.data = torch.randn_like(p) * (0.5 / p.shape[1] ** 0.5)
                p.data[:, : p.shape[1] // 16] *= 4.0
            elif "norm" in name:
                p.data = 1.0 - get_spec(family).norm_offset + 0.3 * torch.rand_like(p)
    model.config.use_cache = False
    return model.float().eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("families"), FAMILIES, tiny_model)


def _check_saved(qm, family, tmp_path, ids):
    spec = get_spec(family)
    packed = [m for m in qm.model.modules() if isinstance(m, QuantLinear)]
    assert len(packed) == qm.model.config.num_hidden_layers * len(spec.linears)
    out = fq.save(qm, tmp_path / "q", plot=False)
    re = fq.load(out)
    with torch.no_grad():
        assert torch.allclose(re.model(ids[:2]).logits, qm.model(ids[:2]).logits, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_quantize_save_load(folders, ids, tmp_path, family, method):
    qm = quantize_tiny(folders[family], method, ids)
    _check_saved(qm, family, tmp_path, ids)


@pytest.mark.parametrize("family,options", [
    ("phi3", {}),  # DOSA (rotation of the fused q/k/v and gate/up readers), SBGBS, LFD
    ("gemma3_text", {"dosa": False}),  # LFD's feedback through the sandwich-norm fast path
    ("gemma3_text", {}),  # DOSA as online rotations of every linear input (no residual rotation is exact)
    ("olmo2", {}),
])
def test_flexible_where_the_family_allows_it(folders, ids, tmp_path, family, options):
    qm = quantize_tiny(folders[family], "flexible", ids, options=dict(bpw=3.0, alloc_nsamples=4, fisher_nsamples=2,
                                                                    **options))
    _check_saved(qm, family, tmp_path, ids)


def test_hiratio_on_sliding_window_layers(folders, ids, tmp_path):
    """Probes rerun blocks with their own arguments; the learned quantizers run single windows of a batch."""
    qm = quantize_tiny(folders["gemma3_text"], "hiratio", ids, options=dict(
        bpw=3.0, stats_nsamples=4, probe_nsamples=2, probe_seqlen=16, learn_nsamples=2, learn_batch=1, learn_steps=2))
    _check_saved(qm, "gemma3_text", tmp_path, ids)


@pytest.mark.parametrize("transform", ["rotation", "affine", "search"])
def test_adaptive_transforms_on_gemma3_leave_the_model_unchanged(ids, transform):
    """Gemma's x·(1 + w) norms fold into the site transforms: with every width at 16 bits the transformed model
    computes the original's logits (to HF's float32 norm arithmetic)."""
    from flexquant.methods import build_method
    from flexquant.pipeline import prepare_model

    model = tiny_model("gemma3_text").double()
    with torch.no_grad():
        ref = model(ids).logits
    cfg = QuantConfig(model="gemma3_text", method="adaptive").replace(group_size=32, options=dict(
        train_nsamples=2, train_steps=2, search_steps=2, w_bits=16, a_bits=16, k_bits=16, v_bits=16,
        transform=transform))
    prepare_model(model, get_spec("gemma3_text"), build_method(cfg), ids, CPU)
    assert any(s.transform is not None for s in model.fq_actquant.sites.values())
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref, atol=1e-5), (model(ids).logits - ref).abs().max()


def test_adaptive_w4a4kv4_on_gemma3_saves_and_loads(folders, ids, tmp_path):
    qm = quantize_tiny(folders["gemma3_text"], "adaptive", ids, options=dict(
        train_nsamples=2, train_steps=2, search_steps=2, transform="rule"))
    _check_saved(qm, "gemma3_text", tmp_path, ids)


@pytest.mark.parametrize("family", [f for f in FAMILIES if get_spec(f).rotatable])
def test_rotated_model_equals_the_original(ids, family):
    """Where the spec claims residual rotations are exact (fused readers, Granite's multipliers), they are."""
    from flexquant.transforms.rotate import rotate_model

    model = tiny_model(family)
    rotated = copy.deepcopy(model)
    rotate_model(rotated, get_spec(family))
    with torch.no_grad():  # float32 (HF's norms compute in float32): a wrong rotation is off by O(1)
        assert torch.allclose(rotated(ids[:2]).logits, model(ids[:2]).logits, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_online_input_rotations_leave_the_model_unchanged(ids, family):
    """DOSA's online mode (families whose residual stream cannot be rotated): every linear reads its input
    through a randomized Hadamard that its weight undoes."""
    from flexquant.transforms.rotate import rotate_inputs_online

    model = tiny_model(family)
    rotated = copy.deepcopy(model)
    sites = rotate_inputs_online(rotated, get_spec(family)).online
    assert len(sites) == model.config.num_hidden_layers * len(get_spec(family).linears)
    with torch.no_grad():
        assert torch.allclose(rotated(ids[:2]).logits, model(ids[:2]).logits, atol=1e-4)


@pytest.mark.parametrize("family,method,options,match", [
    ("olmo2", "flexible", {"dosa_rotation": "residual"}, "--dosa-rotation online or --no-dosa"),
    ("gemma3_text", "flexible", {"dosa_rotation": "residual"}, "--no-dosa"),
    ("granite", "flexible", {"dosa": False, "denoise": "bias"}, "--denoise off"),
    ("gemma2", "adaptive", {}, "--method gptq"),  # eager attention (soft-capped scores): no K/V hook
    ("olmo2", "adaptive", {}, "--method gptq"),
])
def test_what_a_family_cannot_do_is_refused(folders, ids, family, method, options, match):
    with pytest.raises(FlexQuantError, match=match):
        quantize_tiny(folders[family], method, ids, options=options)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_loop_stream_is_the_models_own_forward(ids, family):
    """Each block's quantized-stream output (the cached fast path) equals the fake-quant model's own hidden state:
    the per-layer arguments, the sub-layer output norms and the residual multiplier are applied as HF does."""
    spec, model, outs = get_spec(family), tiny_model(family), []

    class Record(GPTQ):
        def after_block(self, ctx, out_q, out_fp):
            outs.append(torch.cat(out_q))
            return out_q

    cfg = QuantConfig(model=family, method="gptq").replace(bits=3, group_size=32)
    quantize_blocks(model, spec, Record(cfg), ids, CPU, batch_size=2, progress=False)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states
    for i in range(len(outs) - 1):  # HF's last hidden state is after the final norm
        assert torch.allclose(outs[i], ref[i + 1], atol=1e-4), (family, i)


@pytest.mark.parametrize("family", SLIDING)
def test_full_attention_layers_get_their_own_arguments(ids, family):
    """The statistics pass gives every block the model's own hidden states; block 0's (sliding-window) mask and
    rotary tables reused for the full-attention block 1 would give another output."""
    model, spec = tiny_model(family), get_spec(family)
    seen = []
    fp_statistics(model, spec, ids, CPU, 2, StatsRequest(windows=4, hessians=False, on_block=lambda i, blk, inp, out,
                                                         dev: seen.append(torch.cat(inp.hidden))))
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states
    n = model.config.num_hidden_layers
    assert len(seen) == n
    for i in range(n):
        assert torch.allclose(seen[i], ref[i], atol=1e-5), i
    inputs = capture_block_inputs(model, spec, ids, CPU, 4)
    assert len(inputs.kwargs[0].layers.sets) == 2  # one set per layer type, not per layer
    block = model.get_submodule(spec.layers)[1]
    with torch.no_grad():
        right = block(ref[1], **kwargs_for(inputs.kwargs[0], 1))
        wrong = block(ref[1], **kwargs_for(inputs.kwargs[0], 0))
    assert torch.allclose(right, ref[2], atol=1e-5)
    assert (wrong - ref[2]).abs().max() > 1e-2


def test_llama_shaped_blocks_share_one_argument_set(ids):
    from flexquant.models.builtin import tiny_llama

    model = tiny_llama(layers=3)[0]
    inputs = capture_block_inputs(model, get_spec("llama"), ids, CPU, 2)
    assert all(type(kw) is dict for kw in inputs.kwargs)  # no per-layer table: one set per batch


@pytest.mark.parametrize("family", ["granite", "gemma2"])
def test_spec_logits_are_the_models(ids, family):
    """Granite's logits_scaling and Gemma 2's soft-capping, as the statistics and probe passes compute logits."""
    model, spec = tiny_model(family), get_spec(family)
    with torch.no_grad():
        out = model(ids[:1], output_hidden_states=True)
        head_out = model.get_submodule(spec.lm_head)(out.hidden_states[-1])
    assert torch.allclose(spec.logits(model.config, head_out), out.logits, atol=1e-5)
    assert not torch.allclose(head_out, out.logits, atol=1e-2)


def test_gemma_norm_folds_as_one_plus_w(ids):
    """Folding x̂·(1 + w) into q/k/v and gate/up leaves the block's output unchanged."""
    from flexquant.transforms.rotate import fold_norm, rotate_model

    model, spec = tiny_model("gemma3_text"), get_spec("gemma3_text")
    folded = copy.deepcopy(model)
    for block in folded.get_submodule(spec.layers):
        for norm, readers in spec.norm_linear_pairs:
            fold_norm(block.get_submodule(norm), [block.get_submodule(r) for r in readers], spec.norm_offset)
    with torch.no_grad():
        assert torch.allclose(folded(ids).logits, model(ids).logits, atol=1e-4)
    with pytest.raises(FlexQuantError, match="not exact for gemma3_text"):
        rotate_model(model, spec)


def test_a_spec_cannot_claim_rotations_its_structure_forbids():
    with pytest.raises(ValueError, match="rotatable"):
        ModelSpec("x", attn_output_norm="post_attention_layernorm")
    with pytest.raises(ValueError, match="rotatable"):
        ModelSpec("x", norm_linear_pairs=())
    assert not ModelSpec("x", norm_linear_pairs=(), rotatable=False).rotatable



def test_resumed_run_replays_blocks_with_their_own_arguments(folders, ids, tmp_path, monkeypatch):
    """A run stopped after the full-attention block 1 resumes (the finished blocks replayed) to the same tensors."""
    from regression_cases import digest

    from flexquant import runner

    quantize_tiny(folders["gemma3_text"], "gptq", ids, out=tmp_path / "whole", plot=False)
    real = runner.Run._on_block

    def crash_after_block_1(self, i, block, results):
        real(self, i, block, results)
        if i == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner.Run, "_on_block", crash_after_block_1)
    with pytest.raises(KeyboardInterrupt):
        quantize_tiny(folders["gemma3_text"], "gptq", ids, out=tmp_path / "cut", plot=False)
    monkeypatch.setattr(runner.Run, "_on_block", real)
    quantize_tiny(folders["gemma3_text"], "gptq", ids, out=tmp_path / "cut", plot=False, resume=True)
    assert digest(tmp_path / "cut") == digest(tmp_path / "whole")


@pytest.mark.parametrize("family", FAMILIES)
def test_compressed_tensors_export_loads_in_transformers(folders, ids, tmp_path, family):
    """The export of each family loads in transformers (its own architecture class) with the logits of the packed
    model: symmetric RTN, so transformers' compressed path runs (no dequantize-at-load)."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from flexquant.interop import export_checkpoint

    qm = quantize_tiny(folders[family], "rtn", ids, sym=True)
    path = fq.save(qm, tmp_path / "q", plot=False)
    export_checkpoint(path, tmp_path / "ct", "compressed-tensors")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", attn_implementation=get_spec(family)
                                                 .attn_implementation).eval()
    with torch.no_grad():
        ref, got = qm.model(ids[:2]).logits, model(ids[:2]).logits
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
