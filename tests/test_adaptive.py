"""--method adaptive: transforms, activation/KV fake quantization, selection, checkpoints (tiny-llama only)."""

import copy
import json

import pytest
import torch

import flexquant as fq
from flexquant import actquant
from flexquant.actquant.quantizers import fake_quant_asym, fake_quant_sym, fake_quant_weight
from flexquant.actquant.runtime import KVQuantizer
from flexquant.cli import main
from flexquant.config import QuantConfig
from flexquant.errors import FlexQuantError
from flexquant.format.checkpoint import read_tensors
from flexquant.methods import build_method
from flexquant.methods.adaptive import AdaptiveConfig, agreement, kurtosis, robust_z, rule_choice
from flexquant.models import get_spec
from flexquant.models.builtin import tiny_llama
from flexquant.pipeline import prepare_model
from flexquant.pipeline.capture import capture_block_inputs, run_block
from flexquant.transforms.affine import (
    HadamardRotation,
    KroneckerAffine,
    KroneckerRotation,
    build_transform,
    kron_factors,
)

FAST = dict(train_nsamples=2, train_steps=2, search_steps=2)


def _prepare(model, ids, **options):
    m = copy.deepcopy(model)
    config = QuantConfig(model="tiny-llama", method="adaptive").replace(group_size=32, options={**FAST, **options})
    method = build_method(config)
    prepare_model(m, get_spec("llama"), method, ids, torch.device("cpu"))
    return m, method


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(3))


# ----- transforms -----
@pytest.mark.parametrize("n,ab", [(576, (24, 24)), (1536, (32, 48)), (64, (8, 8)), (128, (8, 16))])
def test_kron_factors_balanced_with_hadamard_init(n, ab):
    assert kron_factors(n) == ab


@pytest.mark.parametrize("cls", [KroneckerAffine, KroneckerRotation, HadamardRotation])
def test_transform_apply_fold_unapply_are_consistent(cls):
    T = cls(96, seed=1)
    with torch.no_grad():  # move the learnable ones off their (orthogonal) initialisation
        for p in T.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    x, W = torch.randn(5, 96, dtype=torch.float64), torch.randn(7, 96, dtype=torch.float64)
    M = T.matrix()
    assert torch.allclose(T(x), x @ M, atol=1e-10)
    assert torch.allclose(T(x) @ T.fold(W).T, x @ W.T, atol=1e-9)  # x̃ W̃ᵀ = x Wᵀ
    assert torch.allclose(T.unapply(T(x)), x, atol=1e-9)


def test_affine_starts_as_an_orthogonal_rotation_and_freezes_to_float16():
    T = KroneckerAffine(576, seed=0)
    M = T.matrix()
    assert torch.allclose(M @ M.T, torch.eye(576, dtype=torch.float64), atol=1e-5)
    T.freeze()
    assert T.P1.dtype == torch.float16 and not T.P1.requires_grad
    assert T.stored_bits() == 16 * (576 + 24 * 24 + 24 * 24)


def test_learned_rotation_stays_orthogonal_and_freezes_to_what_it_computed():
    T = KroneckerRotation(96, seed=2)
    assert [n for n, p in T.named_parameters() if p.requires_grad] == ["A1", "A2"]  # signs and start fixed
    assert torch.allclose(T.matrix(), KroneckerAffine(96, seed=2).matrix())  # starts at the same Hadamard
    with torch.no_grad():
        T.A1.add_(0.3 * torch.randn_like(T.A1))
        T.A2.add_(0.3 * torch.randn_like(T.A2))
    M = T.matrix()
    assert torch.allclose(M @ M.T, torch.eye(96, dtype=torch.float64), atol=1e-5)
    assert not torch.allclose(M, KroneckerAffine(96, seed=2).matrix(), atol=1e-2)  # it did move
    F = T.freeze()
    assert isinstance(F, KroneckerAffine) and F.describe()["kind"] == "orthogonal" and F.P1.dtype == torch.float16
    assert torch.allclose(F.matrix(), M, atol=2e-3)  # float16 storage
    x, W = torch.randn(3, 96, dtype=torch.float64), torch.randn(5, 96, dtype=torch.float64)
    assert torch.allclose(F(x) @ F.fold(W).T, x @ W.T, atol=1e-9)  # exact inverse of the stored values
    G = build_transform(F.describe())
    G.load_state_dict(F.state_dict())
    assert G.describe() == F.describe() and torch.equal(G.matrix(), F.matrix())


# ----- quantizers -----
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_per_token_and_per_head_quantizers_stay_on_their_grid(bits):
    x = torch.randn(6, 64) * torch.linspace(0.1, 5, 64)
    qs = fake_quant_sym(x, bits)
    scale = x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    assert ((qs - x).abs() <= scale / 2 + 1e-6).all()
    assert torch.allclose(qs / scale, torch.round(qs / scale), atol=1e-4)
    qa = fake_quant_asym(x, bits)
    for row in qa:
        assert row.unique().numel() <= 2**bits
    assert torch.equal(fake_quant_sym(x, 16), x)


def test_straight_through_gradients_reach_the_clipping_ratio():
    x = torch.randn(8, 32)
    clip = torch.tensor(0.9, requires_grad=True)
    fake_quant_sym(x, 3, clip).pow(2).sum().backward()
    assert clip.grad is not None and clip.grad != 0
    W = torch.randn(4, 64, requires_grad=True)
    fake_quant_weight(W, 2, 32).sum().backward()  # STE: 1 everywhere but at the ranges' ends (via the scale)
    assert torch.isfinite(W.grad).all() and (W.grad == 1).float().mean() > 0.9


@pytest.mark.parametrize("kind", [None, "rotation", "affine"])
@pytest.mark.parametrize("bits", [2, 4])
def test_kv_quantization_round_trips_within_its_grid(kind, bits):
    k = torch.randn(2, 3, 10, 32) * torch.linspace(0.2, 4, 32)
    T = {None: None, "rotation": HadamardRotation(32, 0), "affine": KroneckerAffine(32, 0).freeze()}[kind]
    q = KVQuantizer(32, bits, bits, T, T)
    y = q.key(k)
    kt, yt = (k, y) if T is None else (T(k), T(y))  # compare in the space the cache is quantized in
    lo, hi = kt.amin(-1, keepdim=True).clamp(max=0), kt.amax(-1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / (2**bits - 1)
    assert ((yt - kt).abs() <= scale / 2 + 1e-4).all()
    codes = yt / scale  # grid points are integer multiples of the scale (integer zero point)
    assert torch.allclose(codes, torch.round(codes), atol=1e-3)  # on the grid of each head and token
    assert ((codes.amax(-1) - codes.amin(-1)).round() <= 2**bits - 1).all()
    assert torch.allclose(q.key(y), y, atol=1e-4)  # a quantized cache re-quantizes to itself
    assert torch.equal(KVQuantizer(32, 16, 16, T, T).value(k), k)


# ----- the whole method -----
@pytest.mark.parametrize("mode,rotation,fold", [
    ("none", "hadamard", "on"), ("rotation", "hadamard", "off"), ("rotation", "hadamard", "on"),
    ("rotation", "learned", "off"), ("affine", "hadamard", "off"), ("affine", "hadamard", "on"),
    ("search", "learned", "off"), ("rule", "hadamard", "on")])
def test_all_bits_16_transformed_model_equals_the_original(tiny, ids, mode, rotation, fold):
    model = copy.deepcopy(tiny[0]).double()
    g = torch.Generator().manual_seed(1)
    for layer in model.model.layers:  # gains that are not all 1, so folding is visible
        for n in (layer.input_layernorm, layer.post_attention_layernorm):
            n.weight.data = torch.rand(n.weight.shape, generator=g, dtype=n.weight.dtype) + 0.5
    ref = model(input_ids=ids).logits
    norm = model.model.layers[1].post_attention_layernorm.weight.detach().clone()
    m, method = _prepare(model, ids, w_bits=16, a_bits=16, k_bits=16, v_bits=16, transform=mode, rotation=rotation,
                         fold_norms=fold)
    assert getattr(m, actquant.runtime.ATTRIBUTE) is not None
    out = m(input_ids=ids).logits
    assert torch.allclose(out, ref, atol=1e-9, rtol=0), (out - ref).abs().max()
    if mode not in ("none",):  # the transforms really are there
        assert any(s.transform is not None for s in m.fq_actquant.sites.values())
    # the norms' gains move into the readers only when asked (never with transform none)
    folded = fold == "on" and mode != "none"
    got = m.model.layers[1].post_attention_layernorm.weight
    assert torch.equal(got, torch.ones_like(got)) if folded else torch.equal(got, norm)


def test_runtime_computes_what_calibration_trained(tiny, ids):
    """Block 0 of the prepared model (online transforms, act/KV quantizers) reproduces the calibration loss."""
    m, method = _prepare(tiny[0], ids, w_bits=16, transform="affine", train_steps=3)
    spec = get_spec("llama")
    inputs = capture_block_inputs(m, spec, ids[:2], torch.device("cpu"), 1)
    fp = capture_block_inputs(tiny[0], spec, ids[:2], torch.device("cpu"), 1)
    target = run_block(tiny[0].model.layers[0], fp, torch.device("cpu"))
    out = run_block(m.model.layers[0], inputs, torch.device("cpu"))
    mse = sum(float(torch.nn.functional.mse_loss(o, t)) for o, t in zip(out, target)) / len(out)
    assert mse == pytest.approx(method.facts["blocks"][0]["loss_last"], rel=0.1)


def test_affine_calibration_lowers_the_block_error(tiny, ids):
    _, method = _prepare(tiny[0], ids, w_bits=16, a_bits=3, k_bits=3, v_bits=3, transform="affine",
                         train_steps=12, train_nsamples=4)
    blocks = method.facts["blocks"]  # never worse (a worse result is reverted), and better where trained
    assert all(b["loss_last"] <= b["loss_first"] for b in blocks)
    assert all(b["loss_last"] < b["loss_first"] for b in blocks if not b["reverted"]) and not all(
        b["reverted"] for b in blocks)


def test_rule_flags_outlier_sites_in_either_orientation():
    kappa = [{"qkv": 3.0 + 0.1 * i, "o": 3.0} for i in range(10)]
    kappa[4]["qkv"] = 40.0
    for default, other in (("rotation", "affine"), ("affine", "rotation")):
        choice, z = rule_choice(kappa, default, 3.5)
        assert choice[4]["qkv"] == other and z[4]["qkv"] > 3.5
        assert sum(c[s] == other for c in choice for s in c) == 1
    assert robust_z([1.0, 1.0, 1.0]) == [0.0, 0.0, 0.0]
    assert kurtosis(torch.randn(200_000)) == pytest.approx(3.0, abs=0.1)
    assert agreement([{"a": "x", "b": "y"}], [{"a": "x", "b": "x"}]) == 0.5


@pytest.mark.parametrize("weights", ["raw", "folded"])
def test_rule_scores_raw_or_folded_weights(ids, weights):
    """An outlier norm scale makes the folded q/k/v weights heavy-tailed, not the raw ones (6 layers, so the
    robust z-score has a spread to measure against)."""
    model, _ = tiny_llama(layers=6, hidden=64, intermediate=128)
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[3] = 60.0
    _, method = _prepare(model, ids[:1, :16], w_bits=16, transform="rule", rule_weights=weights, train_steps=1,
                         train_nsamples=1)
    f = method.facts
    raw, used = f["kurtosis_raw"][1]["qkv"], f["kurtosis"][1]["qkv"]
    assert (used == raw) == (weights == "raw")
    assert f["rule"][f"{weights}/affine"] == f["choice"]
    folded_choice = f["rule"]["folded/affine"][1]["qkv"]
    assert folded_choice == "rotation" and f["choice"][1]["qkv"] == ("rotation" if weights == "folded" else "affine")


def test_search_reports_choice_and_agreement(tiny, ids):
    _, method = _prepare(tiny[0], ids, transform="search")
    f = method.facts
    assert set(f["agreement"]) == {f"{w}/{d}" for w in ("raw", "folded") for d in ("rotation", "affine")}
    assert all(0 <= v <= 1 for v in f["agreement"].values())
    assert all(t in ("affine", "rotation") for c in f["choice"] for t in c.values())
    assert f["selection_seconds"] == f["search_seconds"] > 0 and f["rule_seconds"] < f["search_seconds"]


@pytest.mark.parametrize("transform,rotation", [("rule", "hadamard"), ("rotation", "learned")])
def test_save_load_round_trip_reapplies_activation_and_kv_quantization(tiny, tmp_path, transform, rotation):
    calib = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(5))
    qm = fq.quantize("tiny-llama", method="adaptive", bits=4, group_size=32, calib_ids=calib, nsamples=4,
                     seqlen=48, progress=False, options={**FAST, "transform": transform, "rotation": rotation,
                                                         "k_bits": 2, "v_bits": 3})
    ids = calib[:1]
    with torch.no_grad():
        before = qm.model(input_ids=ids).logits
    path = fq.save(qm, tmp_path / "ck", plot=False)
    qc = json.loads((path / "quant_config.json").read_text())
    assert qc["actquant"]["settings"] == {"w_bits": 4, "a_bits": 4, "k_bits": 2, "v_bits": 3,
                                          "transform": transform, "group_size": 32}
    loaded = fq.load(path)
    with torch.no_grad():
        after = loaded.model(input_ids=ids).logits
    assert torch.equal(before, after)
    # bits claimed for the runtime == bits of its tensors in the file; counted in the model's bpw
    tensors = read_tensors(path, qc)
    file_bits = sum(t.numel() * t.element_size() * 8 for k, t in tensors.items() if k.startswith("fq_actquant."))
    assert file_bits == qc["actquant"]["stored_bits"] == loaded.model.fq_actquant.stored_bits() > 0
    assert loaded.bpw == pytest.approx(qm.bpw) and qm.report["summary"]["bpw"] == pytest.approx(qm.bpw)
    assert isinstance(fq.generate(loaded, "ab", max_new_tokens=4), str)
    actquant.remove(loaded.model)  # without the quantizers the (same) weights compute something else
    with torch.no_grad():
        assert not torch.allclose(loaded.model(input_ids=ids).logits, after, atol=1e-3)


def test_bad_settings_fail_clearly():
    with pytest.raises(FlexQuantError, match="a_bits"):
        AdaptiveConfig(a_bits=1)
    with pytest.raises(FlexQuantError, match="transform"):
        AdaptiveConfig(transform="hadamard")
    with pytest.raises(FlexQuantError, match="rule_default"):
        AdaptiveConfig(rule_default="none")
    with pytest.raises(FlexQuantError, match="w_bits"):
        AdaptiveConfig(w_bits=5)
    with pytest.raises(FlexQuantError, match="rotation"):
        AdaptiveConfig(rotation="spin")
    with pytest.raises(FlexQuantError, match="rule_weights"):
        AdaptiveConfig(rule_weights="norm")
    with pytest.raises(FlexQuantError, match="fold_norms"):
        AdaptiveConfig(fold_norms="auto")


def test_cli_quantize_eval_generate(tmp_path, capsys):
    out = tmp_path / "ad"
    assert main(["quantize", "tiny-llama", "--method", "adaptive", "--w-bits", "3", "--a-bits", "4", "--k-bits",
                 "2", "--v-bits", "2", "--transform", "affine", "--train-steps", "1", "--train-nsamples", "1",
                 "--group-size", "32", "--nsamples", "2", "--seqlen", "32", "--out", str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--seqlen", "32", "--windows", "1", "--json", "-q"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["perplexity"] > 1
    assert main(["generate", str(out), "--prompt", "hi", "--max-new-tokens", "3", "-q"]) == 0
    qc = json.loads((out / "quant_config.json").read_text())
    assert qc["actquant"]["settings"]["w_bits"] == 3 and qc["quant_config"]["grid"]["bits"] == 3
    assert main(["quantize", "tiny-llama", "--method", "gptq", "--a-bits", "4", "--out", str(tmp_path / "x")]) == 2
    assert "--method adaptive" in capsys.readouterr().err
