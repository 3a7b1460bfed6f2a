"""`--target vllm|gptqmodel`: methods search inside what the serving format carries, the budget is counted as
the exported files store it, and the export reloads with the quantized model's logits."""

import importlib.util
import json

import pytest
import torch

import flexquant as fq
from flexquant.cli import main
from flexquant.errors import FlexQuantError
from flexquant.interop import export_checkpoint
from flexquant.quant.targets import TARGETS


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 256, (8, 128), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(5))


def _flexible(calib, target, bpw, **options):
    return fq.quantize("tiny-llama", method="flexible", group_size=32, progress=False, calib_ids=calib,
                       batch_size=4, target=target, options=dict(bpw=bpw, alloc_nsamples=4, **options))


def _layers(qm):
    return {n: m.to_result() for n, m in qm.model.named_modules() if hasattr(m, "to_result")}


@pytest.mark.parametrize("target,bpw,dosa", [("gptqmodel", 3.2, True), ("vllm", 5.0, False)])
def test_target_widths_budget_and_export(calib, ids, tmp_path, target, bpw, dosa):
    t = TARGETS[target]
    qm = _flexible(calib, target, bpw, dosa=dosa)
    widths = {}
    rotated = {n for n, m in qm.model.named_modules() if getattr(m, "online_rotation", None) is not None}
    assert not rotated  # nothing the format cannot express
    for name, lin in _layers(qm).items():
        bits = set(lin.group_bits.tolist())
        assert len(bits) == 1, f"{name} mixes widths {bits}"  # one width per linear
        widths[name] = bits.pop()
        assert widths[name] in t.bits
        assert lin.scale_base is None  # float16 scales
        if not t.permutation:
            assert lin.perm is None
    assert len(set(widths.values())) > 1  # the search did use more than one width
    if not t.permutation:  # act-order kept where it folds: down_proj's permutation went into gate/up's rows
        assert [b["act_order_folded"] for b in qm.report["blocks"]] == [[f"model.layers.{i}.mlp.down_proj"]
                                                                        for i in range(2)]
    alloc = qm.report["method"]["flexible"]["allocation"]
    assert alloc["target"] == target and alloc["planned_bpw"] <= bpw
    path = fq.save(qm, tmp_path / "q", plot=False)
    kw = {"gptq_format": "gptq_v2"} if t.format == "gptq" else {}
    out = export_checkpoint(path, tmp_path / "x", t.format, dtype="float16", **kw)
    assert out["bpw"] == pytest.approx(alloc["planned_bpw"], abs=1e-6)  # the budget is what the files store
    with torch.no_grad():
        ref = qm.model(ids).logits.float()
        got = fq.load(tmp_path / "x").model(ids).logits.float()
    assert (got - ref).abs().max() <= 2.0**-8 * ref.abs().max()  # float16 export of the same grid
    cfg = json.loads((tmp_path / "x/config.json").read_text())["quantization_config"]
    if target == "gptqmodel":  # widths other than the model-wide one travel as GPTQModel `dynamic` overrides
        others = [n for n, b in widths.items() if b != cfg["bits"]]
        assert sorted(k[3:-1].replace("\\", "") for k in cfg["dynamic"]) == sorted(others)
    else:
        assert {g["weights"]["num_bits"] for g in cfg["config_groups"].values()} == set(widths.values())


def test_per_layer_search_prefers_the_sensitive_layers(calib):
    """At the same budget, the per-layer search gives more bits where the error tables say they pay: here the
    planned widths differ between linears and the budget is nearly spent."""
    qm = _flexible(calib, "gptqmodel", 3.0)
    alloc = qm.report["method"]["flexible"]["allocation"]
    assert 2.8 < alloc["planned_bpw"] <= 3.0
    assert len(set(alloc["per_matrix_bits"].values())) > 1


def test_what_a_target_cannot_carry_is_refused(calib):
    with pytest.raises(FlexQuantError, match=r"--bpw 3.5 is below what --target vllm stores.*4 bits"):
        _flexible(calib, "vllm", 3.5)
    with pytest.raises(FlexQuantError, match="--target vllm runs 4/8-bit weights only.*--candidates 4 8"):
        _flexible(calib, "vllm", 5.0, candidates=(2, 3))
    with pytest.raises(FlexQuantError, match="--target vllm runs 4/8-bit.*--bits 3"):
        fq.quantize("tiny-llama", method="rtn", bits=3, target="vllm", progress=False)
    with pytest.raises(FlexQuantError, match="float16 scale.*--scale-bits 8"):
        fq.quantize("tiny-llama", method="rtn", bits=4, scale_bits=8, target="gptqmodel", progress=False)
    with pytest.raises(FlexQuantError, match="--method hiratio cannot search inside --target vllm"):
        fq.quantize("tiny-llama", method="hiratio", target="vllm", progress=False)
    with pytest.raises(FlexQuantError, match="target='tgi' must be"):
        fq.quantize("tiny-llama", method="rtn", target="tgi", progress=False)


def test_gptq_for_vllm_drops_act_order_and_exports(calib, tmp_path):
    qm = fq.quantize("tiny-llama", method="gptq", bits=4, group_size=32, calib_ids=calib, target="vllm",
                     progress=False)
    assert all(lin.perm is None for lin in _layers(qm).values())
    out = export_checkpoint(fq.save(qm, tmp_path / "q", plot=False), tmp_path / "x", "compressed-tensors")
    assert out["config_groups"] == 1


def test_cli_target_flag(tmp_path, capsys):
    assert main(["quantize", "tiny-llama", "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--target", "gptqmodel", "--out", str(tmp_path / "q"), "--quiet"]) == 0
    assert main(["quantize", "tiny-llama", "--method", "rtn", "--bits", "3", "--target", "vllm",
                 "--out", str(tmp_path / "r"), "--quiet"]) != 0
    assert "--target vllm runs 4/8-bit" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_folding_a_down_proj_permutation_is_exact():
    """down_proj quantized in act-order, its permutation folded into gate/up rows: the MLP computes the same."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from flexquant import GPTQConfig, GridConfig, gptq_quantize, rtn_quantize
    from flexquant.models.spec import get_spec
    from flexquant.transforms.permute import fold_permutations

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    block, spec, grid = LlamaDecoderLayer(cfg, 0).eval(), get_spec("llama"), GridConfig(bits=3, group_size=32)
    X = torch.randn(256, 128) * torch.linspace(0.1, 3, 128)  # uneven columns: act-order reorders them
    results = {f"b.mlp.{n}": rtn_quantize(block.get_submodule(f"mlp.{n}").weight.data, grid)
               for n in ("gate_proj", "up_proj")}
    results["b.mlp.down_proj"] = gptq_quantize(block.mlp.down_proj.weight.data, X.T @ X, grid, GPTQConfig())
    assert results["b.mlp.down_proj"].perm is not None

    def mlp_out():
        for n in ("gate_proj", "up_proj", "down_proj"):
            block.get_submodule(f"mlp.{n}").weight.data = results[f"b.mlp.{n}"].dequantize(torch.float32)
        with torch.no_grad():
            return block.mlp(torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)))

    before = mlp_out()
    assert fold_permutations(block, spec, results, "b") == ["b.mlp.down_proj"]
    assert results["b.mlp.down_proj"].perm is None
    assert torch.allclose(mlp_out(), before, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None or importlib.util.find_spec("optimum") is None,
                    reason="GPTQModel + optimum are not installed (bash bench/gptq_env.sh; run with .venv-gptq)")
def test_gptqmodel_target_loads_through_gptqmodel_with_dynamic_overrides(calib, ids, tmp_path):
    """GPTQModel's own loader reads the per-module widths (transformers' GPTQ integration through optimum does not:
    it sizes every layer by the model-wide width)."""
    from gptqmodel import BACKEND, GPTQModel

    qm = _flexible(calib, "gptqmodel", 3.2)
    path = fq.save(qm, tmp_path / "q", plot=False)
    export_checkpoint(path, tmp_path / "x", "gptq", dtype="float16", gptq_format="gptq_v2")
    qc = json.loads((tmp_path / "x/config.json").read_text())["quantization_config"]
    model = GPTQModel.load(str(tmp_path / "x"), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model
    widths = {n: m.bits for n, m in model.named_modules() if hasattr(m, "bits") and hasattr(m, "qweight")}
    assert sorted(set(widths.values())) == sorted({qc["bits"], *(v["bits"] for v in qc["dynamic"].values())})
    with torch.no_grad():
        got, ref = model(ids).logits.float(), qm.model(ids).logits.float()
    assert (got - ref).abs().max() <= 2.0**-8 * ref.abs().max()  # float16 rounding


def test_group_size_chosen_per_linear_reaches_lower_budgets(calib, ids, tmp_path):
    """With --group-sizes the per-layer search picks (width, group size) per linear: 2.65 bpw cannot be stored by
    2-bit groups of 32 in the GPTQ layout, but can with groups of 64 where they pay."""
    with pytest.raises(FlexQuantError, match="below what --target gptqmodel stores"):
        _flexible(calib, "gptqmodel", 2.65)
    qm = _flexible(calib, "gptqmodel", 2.65, group_sizes=(64,))
    alloc = qm.report["method"]["flexible"]["allocation"]
    assert alloc["planned_bpw"] <= 2.65 and set(alloc["per_matrix_group_size"].values()) <= {32, 64}
    assert 64 in alloc["per_matrix_group_size"].values()
    for name, r in _layers(qm).items():
        assert r.group_size == alloc["per_matrix_group_size"][name]
    out = export_checkpoint(fq.save(qm, tmp_path / "q", plot=False), tmp_path / "x", "gptq", dtype="float16",
                            gptq_format="gptq_v2")
    assert out["bpw"] == pytest.approx(alloc["planned_bpw"], abs=1e-6)
    with torch.no_grad():
        ref, got = qm.model(ids).logits.float(), fq.load(tmp_path / "x").model(ids).logits.float()
    assert (got - ref).abs().max() <= 2.0**-8 * ref.abs().max()
    with pytest.raises(FlexQuantError, match="--group-sizes.*--target"):
        _flexible(calib, "flexquant", 3.0, group_sizes=(64,))


def test_the_config_names_every_target():
    from flexquant.config import TARGET_NAMES

    assert tuple(TARGETS) == TARGET_NAMES  # config (below quant) keeps its own copy of the names
