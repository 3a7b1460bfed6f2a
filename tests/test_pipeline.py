import copy

import pytest
import torch

import flexquant as fq
from flexquant.api import pack_model
from flexquant.config import QuantConfig
from flexquant.methods import build_method
from flexquant.models import get_spec
from flexquant.models.builtin import tiny_llama
from flexquant.pipeline import capture_block_inputs, quantize_blocks, run_block


def _kl(ref_logits, logits):
    p = torch.log_softmax(ref_logits, -1)
    q = torch.log_softmax(logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_capture_then_blocks_reproduces_the_model(tiny, calib_ids):
    model, _ = tiny
    spec = get_spec("llama")
    inputs = capture_block_inputs(model, spec, calib_ids[:4], torch.device("cpu"), batch_size=2)
    assert len(inputs.hidden) == 2 and inputs.hidden[0].shape == (2, 128, 128)
    h = inputs
    for block in model.model.layers:
        h = h.with_hidden(run_block(block, h, torch.device("cpu")))
    hidden = torch.cat(h.hidden)
    with torch.no_grad():
        ref = model.model(input_ids=calib_ids[:4]).last_hidden_state
    assert torch.allclose(model.model.norm(hidden), ref, atol=1e-5)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_packed_logits_equal_fake_quant_logits(tiny, calib_ids, method):
    model = copy.deepcopy(tiny[0])
    cfg = QuantConfig(model="tiny-llama", method=method).replace(bits=3, group_size=32)
    results, records, _ = quantize_blocks(model, get_spec("llama"), build_method(cfg), calib_ids,
                                          torch.device("cpu"), progress=False)
    assert len(results) == 2 * 7 and len(records) == 14
    ids = calib_ids[:2, :64]
    with torch.no_grad():
        fake = model(ids).logits
        packed_model = pack_model(copy.deepcopy(model), results)
        for kernel in ("reference", "dense-cache"):
            for m in packed_model.modules():
                if isinstance(m, fq.nn.QuantLinear):
                    m.set_kernel(kernel)
            assert torch.allclose(packed_model(ids).logits, fake, atol=1e-4)


def test_gptq_beats_rtn_on_the_model(tiny, calib_ids):
    ref_model = tiny[0]
    ids = torch.randint(0, 256, (4, 128), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = ref_model(ids).logits
    kl = {}
    for method in ("rtn", "gptq"):
        qm = fq.quantize("tiny-llama", method=method, bits=3, group_size=32, calib_ids=calib_ids,
                         progress=False)
        with torch.no_grad():
            kl[method] = _kl(ref, qm.model(ids).logits)
    assert kl["gptq"] < 0.85 * kl["rtn"]


def test_fp_stream_is_offered_to_methods(tiny, calib_ids):
    """A method asking the statistics pass to keep full-precision inputs gets them in the block loop, and with
    feedback groups the block's FP outputs in after_block: exactly the untouched model's hidden states."""
    from flexquant.methods.baselines import GPTQ
    from flexquant.pipeline import StatsRequest, quantize_model

    seen, fp_in, fp_out = [], [], []

    class Probe(GPTQ):
        feedback_groups = ("self_attn.q_proj",)

        def prepare(self, model, spec):
            return StatsRequest(windows=4, hessians=False, keep_windows=4)

        def after_block(self, ctx, out_q, out_fp):
            out_fp = list(out_fp)  # (a sequence of batches, each read when it is used)
            seen.append(float((torch.cat(out_q) - torch.cat(out_fp)).norm() / torch.cat(out_fp).norm()))
            fp_in.append(torch.cat(list(ctx.fp_inputs.hidden)))
            fp_out.append(torch.cat(out_fp))
            return out_q

    model = copy.deepcopy(tiny[0])
    cfg = QuantConfig(model="tiny-llama").replace(bits=2, group_size=32)
    quantize_model(model, get_spec("llama"), Probe(cfg), calib_ids[:4], torch.device("cpu"), batch_size=2,
                   progress=False)
    assert len(seen) == 2 and all(s > 0.01 for s in seen)
    with torch.no_grad():  # the FP stream is exactly the untouched model's hidden states
        ref = tiny[0](calib_ids[:4], output_hidden_states=True).hidden_states
    assert torch.allclose(fp_in[0], ref[0], atol=1e-5) and torch.allclose(fp_in[1], ref[1], atol=1e-5)
    assert torch.allclose(fp_out[0], ref[1], atol=1e-5)


def test_other_llama_family_members_quantize(tmp_path, calib_ids):
    """Qwen2 (q/k/v with bias) and Mistral load from a folder and quantize end to end."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = tiny_llama()[1]
    kw = dict(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2)
    for cls, cfg in ((Qwen2ForCausalLM, Qwen2Config(**kw)), (MistralForCausalLM, MistralConfig(**kw))):
        torch.manual_seed(0)
        folder = tmp_path / cfg.model_type
        cls(cfg).save_pretrained(folder)
        tok.save_pretrained(folder)
        qm = fq.quantize(str(folder), method="gptq", bits=4, group_size=32, calib_ids=calib_ids[:2],
                         progress=False)
        out = fq.save(qm, tmp_path / f"q-{cfg.model_type}", plot=False)
        re = fq.load(out)
        with torch.no_grad():
            assert torch.allclose(re.model(calib_ids[:1]).logits, qm.model(calib_ids[:1]).logits, atol=1e-5)
        if cfg.model_type == "qwen2":
            assert re.model.model.layers[0].self_attn.q_proj.bias is not None


@pytest.mark.parametrize("rotated", [False, True])
def test_prenorm_fast_path_equals_generic_path(tiny, calib_ids, rotated):
    """Same weights and logits either way, also with an online rotation hooked on down_proj."""
    from flexquant.transforms.rotate import rotate_model

    cfg = QuantConfig(model="tiny-llama", method="gptq").replace(bits=3, group_size=32)
    outs = {}
    for fast in (False, True):
        model = copy.deepcopy(tiny[0])
        if rotated:
            rotate_model(model, get_spec("llama"))
        results, _, _ = quantize_blocks(model, get_spec("llama"), build_method(cfg), calib_ids[:6],
                                        torch.device("cpu"), batch_size=4, progress=False, fast=fast)
        outs[fast] = (model, results)
    for name, r in outs[False][1].items():
        assert torch.allclose(r.dequantize(), outs[True][1][name].dequantize(), atol=1e-6), name
    with torch.no_grad():
        ids = calib_ids[:2]
        assert torch.allclose(outs[False][0](ids).logits, outs[True][0](ids).logits, atol=1e-5)


def test_run_capturing_can_stop_after_the_last_named_input(tiny, calib_ids):
    from flexquant.pipeline.hooks import run_capturing

    model, _ = tiny
    spec = get_spec(model.config.model_type)
    inputs = capture_block_inputs(model, spec, calib_ids, torch.device("cpu"), 4)
    block = model.get_submodule(spec.layers)[0]
    names = ("self_attn.q_proj", "mlp.gate_proj")
    outs, full = run_capturing(block, inputs, torch.device("cpu"), names)
    none, partial = run_capturing(block, inputs, torch.device("cpu"), names, outputs=False)
    assert none is None and len(outs) == len(inputs.hidden)
    for n in names:
        assert len(partial[n]) == len(inputs.hidden)
        assert all(torch.equal(a, b) for a, b in zip(full[n], partial[n]))
    assert run_capturing(block, inputs, torch.device("cpu"), (), outputs=False) == (None, {})


def test_statistics_pass_gives_fp_hessians_kept_inputs_and_block_calls(tiny, calib_ids):
    """One pass: H of every linear equals collect_hessian on the untouched model, every linear of a group
    shares its H tensor, only the start block's inputs are kept (exact: the FP stream's beginning), on_block sees
    each block's FP inputs and outputs, and the Fisher covers whole batches from the start."""
    from flexquant.pipeline import StatsRequest, collect_hessian, fp_statistics

    model, spec, dev = tiny[0], get_spec("llama"), torch.device("cpu")
    calls = []
    request = StatsRequest(windows=6, fisher_windows=3, keep_windows=5,
                           on_block=lambda i, block, inp, out, device: calls.append((i, inp, out)))
    stats = fp_statistics(model, spec, calib_ids, dev, 2, request)
    assert stats.windows == 6 and set(stats.fisher) == set(stats.hessians) and len(stats.hessians) == 14
    inputs = capture_block_inputs(model, spec, calib_ids[:6], dev, 2)
    for i, block in enumerate(model.model.layers):
        for group in spec.linear_groups:
            H = collect_hessian(block, group[0], inputs, dev)
            got = [stats.hessians[f"model.layers.{i}.{n}"] for n in group]
            assert all(g is got[0] for g in got) and torch.allclose(got[0], H, rtol=1e-4, atol=1e-6)
        kept = stats.inputs.get(i)
        if i == 0:
            assert [h.shape[0] for h in kept.hidden] == [2, 2, 1]  # the first 5 windows
            assert torch.equal(torch.cat(kept.hidden), torch.cat(inputs.hidden)[:5])
        else:
            assert kept is None
        assert calls[i][0] == i and torch.equal(torch.cat(calls[i][1].hidden), torch.cat(inputs.hidden))
        inputs = inputs.with_hidden(run_block(block, inputs, dev))
        assert torch.allclose(torch.cat(calls[i][2]), torch.cat(inputs.hidden), atol=1e-6)
    # fisher_windows=3 -> the first two batches (4 windows): the same as a pass over those 4 windows alone
    alone = fp_statistics(model, spec, calib_ids, dev, 2, StatsRequest(windows=4, fisher_windows=4))
    assert all(torch.allclose(stats.fisher[n], alone.fisher[n], rtol=1e-5) for n in alone.fisher)


def test_statistics_pass_hands_hessians_to_on_hessians_with_the_fisher_known(tiny, calib_ids):
    """With on_hessians the Fisher comes first (its own pass): each block's call has the whole Fisher and the
    block's Hessians, which equal the kept ones bit for bit and are not kept; the Fisher and the kept inputs are
    the same as in the one-pass order."""
    from flexquant.pipeline import StatsRequest, fp_statistics

    model, spec, dev = tiny[0], get_spec("llama"), torch.device("cpu")
    kept = fp_statistics(model, spec, calib_ids, dev, 2, StatsRequest(windows=6, fisher_windows=3, keep_windows=6))
    calls = []

    def on_hessians(i, block, hessians, fisher):
        assert block is model.model.layers[i] and set(fisher) == set(kept.fisher)
        calls.append((i, dict(hessians)))

    handed = fp_statistics(model, spec, calib_ids, dev, 2, StatsRequest(windows=6, fisher_windows=3, keep_windows=6,
                                                                        on_hessians=on_hessians))
    assert len(handed.hessians) == 0 and [c[0] for c in calls] == list(range(len(model.model.layers)))
    for i, hessians in calls:
        assert set(hessians) == {n for n in kept.hessians if n.startswith(f"model.layers.{i}.")}
        assert all(torch.equal(H, kept.hessians[n]) for n, H in hessians.items())
    assert all(torch.equal(handed.fisher[n], kept.fisher[n]) for n in kept.fisher)
    assert torch.equal(torch.cat(handed.inputs.get(0).hidden), torch.cat(kept.inputs.get(0).hidden))
    # a resumed run's stream starts at its first unfinished block
    resumed = fp_statistics(model, spec, calib_ids, dev, 2, StatsRequest(windows=6, keep_windows=6), start=1)
    assert resumed.inputs.get(0) is None
    inputs = capture_block_inputs(model, spec, calib_ids[:6], dev, 2)
    first = run_block(model.model.layers[0], inputs, dev)
    assert torch.equal(torch.cat(resumed.inputs.get(1).hidden), torch.cat(first))
