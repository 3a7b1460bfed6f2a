"""Export to compressed-tensors and GPTQ, checked by real clients (transformers through compressed-tensors,
and through GPTQModel where it is installed) and by an independent reader of the GPTQ layout; import of
checkpoints written by other tools; clear errors for what the formats cannot hold."""

import importlib.util
import json

import pytest
import torch
from safetensors import safe_open

import flexquant as fq
from flexquant.cli import main
from flexquant.errors import FlexQuantError
from flexquant.interop import export_checkpoint

HAS_CT = importlib.util.find_spec("compressed_tensors") is not None
HAS_GPTQMODEL = (importlib.util.find_spec("gptqmodel") is not None
                 and importlib.util.find_spec("optimum") is not None)
needs_ct = pytest.mark.skipif(not HAS_CT,
                              reason="compressed-tensors is not installed (pip install 'flexquant[interop]')")
# fp16 rounding: a client that dequantizes into float16 moves the logits by about this much of their range;
# float32 clients match to 1e-5.
FP16_TOL = 2.0**-9


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 256, (8, 128), generator=torch.Generator().manual_seed(2))


def _save(tmp_path_factory, name, **settings):
    qm = fq.quantize("tiny-llama", group_size=32, progress=False, **settings)
    return qm, fq.save(qm, tmp_path_factory.mktemp(name) / "q", plot=False)


@pytest.fixture(scope="module")
def rtn(tmp_path_factory):
    return _save(tmp_path_factory, "rtn", method="rtn", bits=4)


@pytest.fixture(scope="module")
def rtn_sym(tmp_path_factory):
    return _save(tmp_path_factory, "rtn_sym", method="rtn", bits=4, sym=True)


@pytest.fixture(scope="module")
def gptq(tmp_path_factory, calib):  # act-order: columns permuted, groups expressed by g_idx
    return _save(tmp_path_factory, "gptq", method="gptq", bits=4, calib_ids=calib)


@pytest.fixture(scope="module")
def gptq_plain(tmp_path_factory, calib):
    return _save(tmp_path_factory, "gptq_plain", method="gptq", bits=3, act_order=False, calib_ids=calib)


FLEX_UNIFORM = dict(bpw=5.0, dosa=True, sbgbs=False, candidates=(4,))


@pytest.fixture(scope="module")
def flexible(tmp_path_factory, calib):
    """Rotated (DOSA) FlexibleLLM at uniform 4 bits, salience column order (g_idx), fp16 scales."""
    return _save(tmp_path_factory, "flex", method="flexible", calib_ids=calib, batch_size=4, scale_bits=16,
                 zero_bits=8, options=dict(FLEX_UNIFORM, alloc_nsamples=4))


@pytest.fixture(scope="module")
def flexible_ct(tmp_path_factory, calib):
    """The same without column reordering, which compressed-tensors cannot express."""
    return _save(tmp_path_factory, "flex_ct", method="flexible", calib_ids=calib, batch_size=4, scale_bits=16,
                 zero_bits=8, act_order=False, options=dict(FLEX_UNIFORM, alloc_nsamples=4, protect="none"))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _transformers_ct(path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    sym = all(g["weights"]["symmetric"] for g in cfg["config_groups"].values())
    # transformers 5's compressed path cannot take asymmetric packed zero points (llm-compressor issue 1618);
    # its dequantize-at-load path runs compressed-tensors' own decompressor on the same tensors.
    extra = {} if sym else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    return AutoModelForCausalLM.from_pretrained(path, **extra).eval()


@needs_ct
@pytest.mark.parametrize("which", ["rtn", "rtn_sym", "gptq_plain"])
def test_compressed_tensors_export_loads_in_transformers(which, request, tmp_path, ids):
    qm, path = request.getfixturevalue(which)
    out = export_checkpoint(path, tmp_path / "ct", "compressed-tensors")
    assert out["quantized_layers"] == 14
    from compressed_tensors.quantization import QuantizationConfig

    cfg = json.loads((tmp_path / "ct/config.json").read_text())
    QuantizationConfig.model_validate(cfg["quantization_config"])  # the package's own schema
    assert cfg["quantization_config"]["format"] == "pack-quantized" and cfg["use_cache"] is True
    model = _transformers_ct(tmp_path / "ct")
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    ref = _logits(qm.model, ids)
    assert (_logits(model, ids) - ref).abs().max() <= 1e-5 * ref.abs().max()


def _reference_gptq_dequant(qweight, qzeros, scales, g_idx, bits, rows=16):
    """AutoGPTQ's v1 layout decoded bit by bit from the documented format (independent of flexquant's packer):
    the input column i's code starts at bit i·bits of the qweight column's bit stream; zeros are stored − 1."""
    def stream(words):  # int32 [k] -> python int of k·32 bits, word 0 lowest
        return sum((int(w) & 0xFFFFFFFF) << (32 * j) for j, w in enumerate(words))

    n, m = qweight.shape[0] * 32 // bits, min(rows, qweight.shape[1])
    mask = (1 << bits) - 1
    W = torch.empty(m, n, dtype=torch.float64)
    zstreams = [stream(qzeros[k].tolist()) for k in range(qzeros.shape[0])]
    for o in range(m):
        s = stream(qweight[:, o].tolist())
        for i in range(n):
            k = int(g_idx[i])
            z = ((zstreams[k] >> (o * bits)) & mask) + 1
            W[o, i] = float(scales[k, o]) * (((s >> (i * bits)) & mask) - z)
    return W


@pytest.mark.parametrize("which", ["gptq", "gptq_plain", "flexible"])
def test_gptq_export_layout_matches_independent_reader(which, request, tmp_path):
    qm, path = request.getfixturevalue(which)
    extra = {"online_rotation": "dense"} if which == "flexible" else {}
    export_checkpoint(path, tmp_path / "gq", "gptq", **extra)
    qc = json.loads((tmp_path / "gq/quantize_config.json").read_text())
    assert qc["checkpoint_format"] == "gptq" and qc["desc_act"] == (which != "gptq_plain")
    name = "model.layers.1.self_attn.o_proj"
    with safe_open(tmp_path / "gq/model.safetensors", framework="pt") as f:
        t = {k: f.get_tensor(f"{name}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
    assert t["qweight"].dtype == torch.int32 and t["scales"].dtype == torch.float16
    W = _reference_gptq_dequant(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], qc["bits"])
    assert torch.equal(W.float(), qm.model.get_submodule(name).dequantized_weight()[:16])


@pytest.mark.parametrize("which", ["gptq", "flexible"])
def test_gptq_export_reimports_with_the_same_logits(which, request, tmp_path, ids):
    qm, path = request.getfixturevalue(which)
    export_checkpoint(path, tmp_path / "gq", "gptq", online_rotation="dense")
    loaded = fq.load(tmp_path / "gq")
    ref = _logits(qm.model, ids)
    assert (_logits(loaded.model, ids) - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.skipif(not HAS_GPTQMODEL, reason="GPTQModel + optimum are not installed (GPTQModel needs torch>=2.14.1)")
@pytest.mark.parametrize("which", ["gptq", "flexible"])
def test_gptq_export_loads_in_transformers_via_gptqmodel(which, request, tmp_path, ids):
    from transformers import AutoModelForCausalLM

    qm, path = request.getfixturevalue(which)
    export_checkpoint(path, tmp_path / "gq", "gptq", online_rotation="dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gq").eval()
    got, ref = _logits(model, ids), _logits(qm.model, ids)
    assert (got - ref).abs().max() <= FP16_TOL * ref.abs().max()
    # GPTQModel dequantizes into float16: against flexquant's weights rounded to float16 the logits are the same
    half = _logits(_fp16_weights(fq.load(path).model), ids)
    assert (got - half).abs().max() <= 1e-6 * ref.abs().max()


def _fp16_weights(model):
    from flexquant.nn.quant_linear import QuantLinear

    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear) and mod._rotation is None:  # rotated layers are exported dense, float32
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=False)
            lin.weight.data = mod.dequantized_weight().half().float()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
    return model


@needs_ct
def test_rotated_flexible_exports_with_the_rotation_folded(flexible_ct, tmp_path, ids):
    qm, path = flexible_ct
    with pytest.raises(FlexQuantError, match="online input rotation.*--online-rotation dense"):
        export_checkpoint(path, tmp_path / "x", "compressed-tensors")
    assert not (tmp_path / "x").exists()
    out = export_checkpoint(path, tmp_path / "ct", "compressed-tensors", online_rotation="dense")
    assert out["dense_layers"] == 2 and out["quantized_layers"] == 12
    cfg = json.loads((tmp_path / "ct/config.json").read_text())
    assert "model.layers.0.mlp.down_proj" in cfg["quantization_config"]["ignore"]
    assert cfg["tie_word_embeddings"] is False  # the rotation untied lm_head from the embedding
    ref = _logits(qm.model, ids)
    assert (_logits(_transformers_ct(tmp_path / "ct"), ids) - ref).abs().max() <= 1e-5 * ref.abs().max()


@needs_ct
def test_per_layer_bits_become_config_groups(rtn_sym, tmp_path, ids):
    """Uniform bits within each layer, different between layers: one compressed-tensors config group per
    setting, GPTQModel `dynamic` overrides in a GPTQ export. Symmetric here: transformers
    5's dequantize-at-load path (needed for asymmetric zero points) applies one scheme to every layer."""
    qm, _ = rtn_sym
    qm3 = fq.quantize("tiny-llama", method="rtn", bits=3, group_size=32, sym=True, progress=False)
    for i in (0, 1):
        qm3.model.model.layers[i].self_attn = qm.model.model.layers[i].self_attn  # attention at 4 bits, MLP at 3
    path = fq.save(qm3, tmp_path / "q", plot=False)
    out = export_checkpoint(path, tmp_path / "ct", "compressed-tensors")
    groups = json.loads((tmp_path / "ct/config.json").read_text())["quantization_config"]["config_groups"]
    assert out["config_groups"] == 2
    assert sorted(len(g["targets"]) for g in groups.values()) == [6, 8]
    assert {g["weights"]["num_bits"] for g in groups.values()} == {3, 4}
    ref = _logits(qm3.model, ids)
    assert (_logits(_transformers_ct(tmp_path / "ct"), ids) - ref).abs().max() <= 1e-5 * ref.abs().max()
    # GPTQ: the model-wide setting is the most common one, the others GPTQModel `dynamic` overrides
    export_checkpoint(path, tmp_path / "gq", "gptq")
    qc = json.loads((tmp_path / "gq/config.json").read_text())["quantization_config"]
    assert qc["bits"] == 4 and len(qc["dynamic"]) == 6  # 8 attention linears at 4 bits, 6 MLP ones at 3
    assert all(v == {"bits": 3, "group_size": 32, "sym": True} for v in qc["dynamic"].values())
    assert (_logits(fq.load(tmp_path / "gq").model, ids) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_layouts_the_formats_cannot_hold_fail_with_the_fix(gptq, tmp_path):
    _, path = gptq
    with pytest.raises(FlexQuantError, match="act-order.*g_idx.*--format gptq.*--no-act-order"):
        export_checkpoint(path, tmp_path / "a", "compressed-tensors")
    from flexquant import GridConfig, rtn_quantize
    from flexquant.nn.quant_linear import QuantLinear

    qm = fq.quantize("tiny-llama", method="rtn", bits=4, group_size=32, progress=False)
    layers = qm.model.model.layers
    bad = {  # what SBGBS, kept columns and compact metadata store
        layers[0].self_attn.q_proj: (GridConfig(group_size=32), [2, 3, 4, 4]),
        layers[0].self_attn.k_proj: (GridConfig(group_size=32), [4, 4, 4, 16]),
        layers[1].mlp.up_proj: (GridConfig(group_size=32, scale_bits=8, zero_bits=4), None),
    }
    for lin, (grid, bits) in bad.items():
        W = lin.dequantized_weight()
        r = rtn_quantize(W, grid, None if bits is None else torch.tensor(bits))
        new = QuantLinear.from_result(r)
        parent, _, child = next(n for n, m in qm.model.named_modules() if m is lin).rpartition(".")
        setattr(qm.model.get_submodule(parent), child, new)
    mixed = fq.save(qm, tmp_path / "q", plot=False)
    with pytest.raises(FlexQuantError) as e:
        export_checkpoint(mixed, tmp_path / "b", "gptq")
    msg = str(e.value)
    assert "mixed bit-widths within a layer (2/3/4 bits)" in msg and "--no-sbgbs" in msg
    assert "fp16 kept columns" in msg and "log-coded scales" in msg and "--scale-bits 16" in msg
    for name in ("layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.1.mlp.up_proj"):
        assert name in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # nothing written, no temp folders


def test_bias_the_architecture_has_no_place_for_is_refused(rtn, tmp_path):
    qm, _ = rtn
    down = qm.model.model.layers[0].mlp.down_proj
    down.bias = torch.nn.Parameter(torch.zeros(down.out_features), requires_grad=False)  # as LFD's denoising adds
    try:
        path = fq.save(qm, tmp_path / "q", plot=False)
    finally:
        down.bias = None
    with pytest.raises(FlexQuantError, match="bias.*--denoise off"):
        export_checkpoint(path, tmp_path / "x", "gptq")


def test_v1_zero_points_of_zero_are_lifted_or_refused(gptq, tmp_path):
    from flexquant.interop import gptq as gq
    from flexquant.interop.common import read_source

    layer = next(iter(read_source(gptq[1], "gptq").grids.values()))
    layer.zeros[0, 0] = 0  # a group whose minimum is 0: z = 0, all codes >= 0
    first = layer.group_index() == 0
    layer.codes[0, first] = (torch.arange(int(first.sum())) % 15).to(torch.uint8)
    t = gq.layer_tensors(layer, "gptq", torch.float32)  # lifted: codes + 1, zero 1 (same weights)
    W = _reference_gptq_dequant(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, rows=2)
    assert torch.equal(W.float(), layer.dequantize()[:2])
    layer.codes[0, layer.group_index() == 0] = 15  # the top code in use: no room to lift
    with pytest.raises(FlexQuantError, match="--gptq-format gptq_v2"):
        gq.layer_tensors(layer, "gptq", torch.float32)
    t = gq.layer_tensors(layer, "gptq_v2", torch.float32)
    assert int(t["qzeros"][0, 0]) & 0xF == 0


def test_writes_are_atomic_and_refuse_to_clobber(rtn, tmp_path, monkeypatch):
    _, path = rtn
    out = tmp_path / "gq"
    export_checkpoint(path, out, "gptq")
    assert {"config.json", "quantize_config.json", "model.safetensors", "tokenizer.json",
            "flexquant_export.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "quant_config.json").exists() and not (out / "report.json").exists()
    with pytest.raises(FlexQuantError, match="already exists"):
        export_checkpoint(path, out, "gptq")
    with pytest.raises(FlexQuantError, match="must differ"):
        export_checkpoint(path, path, "gptq", overwrite=True)
    import flexquant.interop.common as common

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(common, "save_file", boom)
    with pytest.raises(OSError):
        export_checkpoint(path, tmp_path / "other", "gptq")
    with pytest.raises(OSError):
        export_checkpoint(path, out, "gptq", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gq"]  # no temp folders, the old export intact
    assert (out / "model.safetensors").is_file()


def test_shards_with_an_index_past_the_size_limit(rtn, tmp_path, ids):
    from flexquant.interop.common import read_source, write_folder

    qm, path = rtn
    src = read_source(path, "gptq")
    export_checkpoint(path, tmp_path / "one", "gptq")
    with safe_open(tmp_path / "one/model.safetensors", framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads((tmp_path / "one/config.json").read_text())
    write_folder(tmp_path / "sharded", src, tensors, {"config.json": cfg, "flexquant_export.json": {}},
                 shard_bytes=50_000)
    index = json.loads((tmp_path / "sharded/model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ref = _logits(qm.model, ids)
    assert (_logits(fq.load(tmp_path / "sharded").model, ids) - ref).abs().max() <= 1e-5 * ref.abs().max()


@needs_ct
def test_imports_a_checkpoint_written_by_compressed_tensors_itself(tmp_path, ids):
    """A pack-quantized folder made by the compressed-tensors package (llm-compressor's writer), not by us."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    from flexquant.models.builtin import tiny_llama

    model, tok = tiny_llama()
    wargs = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=wargs)}, ignore=["lm_head"]))
    for m in model.modules():
        if hasattr(m, "weight_scale"):
            Wg = m.weight.data.view(m.weight.shape[0], -1, 32)
            s, z = calculate_qparams(Wg.amin(-1), Wg.amax(-1), wargs)
            m.weight_scale.data.copy_(s)
            m.weight_zero_point.data.copy_(z)
    ref = _logits(model, ids)  # compressed-tensors' own fake-quantized forward
    comp = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    comp.compress_model(model)
    model.save_pretrained(tmp_path / "ct")
    tok.save_pretrained(tmp_path / "ct")
    comp.update_config(tmp_path / "ct")
    loaded = fq.load(tmp_path / "ct")
    assert (_logits(loaded.model, ids) - ref).abs().max() <= 1e-5 * ref.abs().max()
    info = loaded.report["foreign"]
    assert info["format"] == "compressed-tensors" and 4.0 < info["bpw"] < 5.3  # float32 scales: 4 + 36/32 + ...


def test_eval_and_info_accept_exported_and_foreign_folders(gptq, tmp_path, capsys):
    qm, path = gptq
    export_checkpoint(path, tmp_path / "gq", "gptq")
    args = ["--seqlen", "64", "--windows", "2", "--json", "-q"]
    assert main(["eval", str(path), *args]) == 0
    own = json.loads(capsys.readouterr().out)
    assert main(["eval", str(tmp_path / "gq"), *args]) == 0
    imported = json.loads(capsys.readouterr().out)
    assert imported["perplexity"] == pytest.approx(own["perplexity"], rel=1e-5)
    assert main(["info", str(tmp_path / "gq"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    bits = weights = 0
    with safe_open(tmp_path / "gq/model.safetensors", framework="pt") as f:
        for name, mod in info["modules"].items():
            for k in ("qweight", "qzeros", "scales", "g_idx"):
                t = f.get_tensor(f"{name}.{k}")
                bits += t.numel() * t.element_size() * 8
            weights += mod["in_features"] * mod["out_features"]
    assert info["format"] == "gptq" and info["bpw"] == pytest.approx(bits / weights)
    assert imported["bpw"] == pytest.approx(info["bpw"])
    assert main(["info", str(tmp_path / "gq")]) == 0
    assert "gptq (foreign)" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "gq"), "--out", str(tmp_path / "r.md"), "-q"]) == 0
    page = (tmp_path / "r.md").read_text()
    assert "gptq (imported)" in page and page.split("## Layers")[1].count("| model.layers.") == 14


def test_foreign_folders_without_safetensors_are_refused(rtn, tmp_path, capsys):
    _, path = rtn
    export_checkpoint(path, tmp_path / "gq", "gptq")
    (tmp_path / "gq/model.safetensors").rename(tmp_path / "gq/pytorch_model.bin")  # a pickle is never loaded
    assert main(["eval", str(tmp_path / "gq"), "--seqlen", "64", "--windows", "1", "-q"]) == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin are pickles" in err and "Traceback" not in err


def test_cli_export_and_bad_inputs(rtn, tmp_path, capsys):
    _, path = rtn
    assert main(["export", str(path), "--format", "gptq", "--out", str(tmp_path / "g"), "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "gptq"
    cases = [
        ([str(tmp_path / "missing"), "--format", "gptq", "--out", str(tmp_path / "o")], "not a folder"),
        ([str(tmp_path / "g"), "--format", "gptq", "--out", str(tmp_path / "o")], "quant_config.json is missing"),
        ([str(path), "--format", "gptq", "--out", str(tmp_path / "g")], "already exists"),
        ([str(path), "--format", "compressed-tensors", "--gptq-format", "gptq_v2", "--out", str(tmp_path / "o")],
         "applies to --format gptq only"),
    ]
    for argv, msg in cases:
        assert main(["export", *argv, "-q"]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["export", str(path), "--format", "awq", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
