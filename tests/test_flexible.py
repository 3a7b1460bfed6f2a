import pytest
import torch

import flexquant as fq
from flexquant.alloc import error_table as _error_table
from flexquant.cli import main
from flexquant.errors import FlexQuantError
from flexquant.methods.flexible_config import FlexibleConfig
from flexquant.models.builtin import tiny_llama
from flexquant.nn import QuantLinear


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A tiny Llama wide enough (256/512) for group-64 fractional budgets."""
    model, tok = tiny_llama(hidden=256, intermediate=512, layers=2)
    path = tmp_path_factory.mktemp("wide") / "m"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), model


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 256, (8, 128), generator=torch.Generator().manual_seed(1))


def _kl(ref, model, ids):
    with torch.no_grad():
        p = torch.log_softmax(ref(ids).logits, -1)
        q = torch.log_softmax(model(ids).logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("bpw", [3.0, 3.3])  # 2.5 and 3.5 (gptq proxy): tests/test_regression.py
def test_fractional_budget_is_hit_from_stored_bits(wide, calib, bpw):
    path, _ = wide
    qm = fq.quantize(path, method="flexible", group_size=64, calib_ids=calib, progress=False,
                     options=dict(bpw=bpw, lfd=False, proxy="gptq" if bpw == 3.3 else "block"))
    assert bpw - 0.02 <= qm.bpw <= bpw  # measured from the packed tensors, metadata included
    planned = qm.report["method"]["flexible"]["allocation"]["planned_bpw"]
    assert qm.bpw == pytest.approx(planned, abs=1e-9)  # the allocator's cost model is exact


def test_gptq_proxy_is_the_compensated_cost():
    torch.manual_seed(0)
    W, rows, order = torch.randn(8, 128), torch.rand(8) + 0.5, torch.randperm(128)
    d = torch.rand(128) + 0.5
    # uncorrelated inputs: nothing to compensate, both proxies agree (up to the damping)
    block = _error_table(W, torch.diag(d), order, 64, (2, 3), rows, "block")
    gptq = _error_table(W, torch.diag(d), order, 64, (2, 3), rows, "gptq", damp=1e-9)
    assert torch.allclose(block, gptq, rtol=1e-4)
    # correlated inputs: the last column of the order pays 1/[H⁻¹]_nn, which is below its H_nn
    X = torch.randn(128, 512)
    X[1:] += 0.9 * X[:1]
    H = X @ X.T / 512
    gptq = _error_table(W, H, order, 64, (2, 3), rows, "gptq", damp=1e-6)
    block = _error_table(W, H, order, 64, (2, 3), rows, "block")
    assert (gptq < block).all() and (gptq[:, 0] > gptq[:, 1]).all()


def test_wide_error_tables_factor_in_float32_and_leave_the_hessian(monkeypatch):
    """Past FLOAT64_MAX_COLUMNS the proxy's factor (and H⁻¹'s diagonal) are float32, as in the GPTQ solve: the same
    table and diagonal to float32 precision, and the caller's H untouched (the factor works in its own copy)."""
    from flexquant.quant import gptq
    from flexquant.quant.impact import hinv_diagonal

    torch.manual_seed(0)
    W, rows, order = torch.randn(8, 128), torch.rand(8) + 0.5, torch.randperm(128)
    X = torch.randn(128, 512)
    X[1:] += 0.5 * X[:1]
    H = X @ X.T / 512
    before = H.clone()
    f64 = _error_table(W, H, order, 64, (2, 3), rows, "gptq", damp=0.01), hinv_diagonal(H, 0.01)
    monkeypatch.setattr(gptq, "FLOAT64_MAX_COLUMNS", 64)
    f32 = _error_table(W, H, order, 64, (2, 3), rows, "gptq", damp=0.01), hinv_diagonal(H, 0.01)
    assert torch.equal(H, before)
    assert torch.allclose(f64[0], f32[0], rtol=1e-3) and torch.allclose(f64[1], f32[1], rtol=1e-3)
    assert not torch.equal(f64[0], f32[0])  # (the float32 path did run)
    # the user's --factor-dtype decides past or below the threshold, as in the GPTQ solve
    named = (_error_table(W, H, order, 64, (2, 3), rows, "gptq", damp=0.01, factor="float64"),
             hinv_diagonal(H, 0.01, "float64"))
    assert torch.equal(named[0], f64[0]) and torch.equal(named[1], f64[1])


def test_flexible_tables_follow_the_factor_dtype(wide, calib, monkeypatch):
    from flexquant.alloc import sensitivity
    from flexquant.quant import impact

    seen = []

    def spy(name, n, real=sensitivity.factor_dtype):
        seen.append(name)
        return real(name, n)

    monkeypatch.setattr(sensitivity, "factor_dtype", spy)
    monkeypatch.setattr(impact, "factor_dtype", spy)
    fq.quantize(wide[0], method="flexible", group_size=64, calib_ids=calib, progress=False, factor_dtype="float32",
                options=dict(bpw=3.5, lfd=False, proxy="gptq"))
    assert seen and set(seen) == {"float32"}


def test_flexible_checkpoint_reloads_with_online_rotation(wide, calib, tmp_path):
    path, ref = wide
    qm = fq.quantize(path, method="flexible", group_size=64, calib_ids=calib, progress=False,
                     options=dict(bpw=3.0, dosa=True))
    downs = [m for n, m in qm.model.named_modules() if isinstance(m, QuantLinear) and n.endswith("down_proj")]
    assert downs and all(m.rotation_order == 1 for m in downs)  # 512 = 2^9: pure Sylvester
    assert qm.model.config.tie_word_embeddings is False
    out = fq.save(qm, tmp_path / "flex")
    assert (out / "report_flexible.png").stat().st_size > 10_000
    loaded = fq.load(out)
    ids = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, qm.model(ids).logits, atol=1e-5)
    assert loaded.bpw == pytest.approx(qm.bpw)
    assert _kl(ref, loaded.model, ids) < 0.1


def test_flexible_beats_gptq_at_fewer_bits(wide, calib):
    path, ref = wide
    ids = torch.randint(0, 256, (4, 128), generator=torch.Generator().manual_seed(9))
    # A random model has no salient groups for option (b) to find; option (a) keeps a salient group.
    flex = fq.quantize(path, method="flexible", group_size=64, calib_ids=calib, progress=False,
                       options=dict(bpw=3.0, protect="columns"))
    gptq = fq.quantize(path, method="gptq", bits=3, group_size=64, calib_ids=calib, progress=False)
    assert flex.bpw < gptq.bpw
    assert _kl(ref, flex.model, ids) < _kl(ref, gptq.model, ids)


def test_report_has_allocation_protection_noise_and_incoherence(wide, calib):
    path, _ = wide
    qm = fq.quantize(path, method="flexible", group_size=64, calib_ids=calib, progress=False,
                     options=dict(bpw=3.0, dosa=True, protect="columns", denoise="bias", denoise_threshold=0.0))
    facts = qm.report["method"]["flexible"]
    assert sum(facts["allocation"]["histogram"].values()) == sum(
        m.in_features // 64 for m in qm.model.modules() if isinstance(m, QuantLinear))
    assert all(v["columns"] == 64 and v["bits"] == 4 for v in facts["protected"].values())
    inc = facts["incoherence"]
    assert sum(v["after"] for v in inc.values()) < sum(v["before"] for v in inc.values())
    blocks = qm.report["blocks"]
    assert all(b["denoised"] and b["noise_after"] < b["noise_before"] for b in blocks)


def test_config_and_budget_errors(wide, calib):
    with pytest.raises(FlexQuantError, match="protect"):
        FlexibleConfig(protect="everything")
    with pytest.raises(FlexQuantError, match="candidates"):
        FlexibleConfig(candidates=(4, 2))
    # the rotation's default follows the budget (measured: it helps at 2.5 and 3.5 bpw, costs at 4.25)
    assert [FlexibleConfig(bpw=b).dosa for b in (2.5, 3.0, 3.5, 3.99, 4.0, 4.25)] == [True, True, True, True,
                                                                                     False, False]
    assert not FlexibleConfig(bpw=2.5, dosa=False).dosa and not FlexibleConfig(bpw=3.5, dosa=False).dosa
    path, _ = wide
    with pytest.raises(FlexQuantError, match="infeasible"):
        fq.quantize(path, method="flexible", group_size=64, calib_ids=calib, progress=False,
                    options=dict(bpw=2.2))


def test_cli_flexible_flags(wide, tmp_path, capsys):
    path, _ = wide
    assert main(["quantize", path, "--method", "gptq", "--bpw", "2.5", "--out", str(tmp_path / "x"), "-q"]) == 2
    assert "--bpw applies to --method flexible or hiratio only (this run is --method gptq)" in capsys.readouterr().err
    assert main(["quantize", path, "--method", "flexible", "--bpw", "3.2", "--no-lfd", "--protect", "none",
                 "--nsamples", "4", "--seqlen", "64", "--out", str(tmp_path / "f"), "-q"]) == 0


def test_fisher_on_a_prefix_of_the_allocation_windows(wide, calib):
    """fisher_nsamples=k: the Fisher of the first k windows, whatever alloc_nsamples is."""
    path, _ = wide

    def sensitivity(**opts):
        qm = fq.quantize(path, method="flexible", group_size=64, calib_ids=calib, batch_size=4, progress=False,
                         options=dict(bpw=3.0, **opts))
        return qm.report["method"]["flexible"]["sensitivity"]

    prefix = sensitivity(alloc_nsamples=8, fisher_nsamples=4)
    assert prefix == pytest.approx(sensitivity(alloc_nsamples=4))
    assert prefix != pytest.approx(sensitivity(alloc_nsamples=8))
    with pytest.raises(FlexQuantError, match="fisher_nsamples"):
        FlexibleConfig(fisher_nsamples=-1)


@pytest.mark.parametrize("unit,count", [("block", 2), ("linear", 14)])
def test_probes_rescale_the_search(wide, calib, unit, count):
    """--probe block|linear measures every block (linear) alone at the widest candidate within the budget and
    rescales its errors: the budget is still hit exactly and the report says what was measured."""
    path, _ = wide
    qm = fq.quantize(path, method="flexible", group_size=64, calib_ids=calib, progress=False,
                     options=dict(bpw=3.3, lfd=False, probe=unit, probe_nsamples=2, probe_seqlen=64))
    probes = qm.report["method"]["flexible"]["probes"]
    assert probes["width"] == 3 and probes["tokens"] == 128 and len(probes["measured_kl"]) == count
    assert all(k > 0 for k in probes["measured_kl"]) and all(p > 0 for p in probes["predicted"])
    assert torch.tensor(probes["scale"]).log().mean().abs() < 1e-6  # only ratios between blocks matter
    assert 3.3 - 0.02 <= qm.bpw <= 3.3
    with pytest.raises(FlexQuantError, match="probe="):
        FlexibleConfig(probe="layer")


def test_tied_tables_take_one_option_for_all_members():
    """Tied per-layer tables are allocated as one (errors and costs summed) and each member gets its choice."""
    import torch

    from flexquant.alloc import GroupTable, greedy_allocate
    from flexquant.alloc.greedy import tie_tables, untie

    def table(name, errors, costs):
        return GroupTable(name, 1, 1, (0, 1), torch.tensor([errors]), torch.zeros(1, dtype=torch.bool),
                          costs=costs)

    # alone, the search raises only e0 (its error drops the most per bit); tied, e0 and e1 go up together or not
    # at all, which costs 20 bits where the budget leaves 10, so a goes up instead
    tables = [table("a", [5.0, 1.0], (10, 20)), table("e0", [9.0, 0.0], (10, 20)), table("e1", [1.0, 0.9], (10, 20))]
    alone, _ = greedy_allocate(tables, 40)
    assert {n: int(b[0]) for n, b in alone.items()} == {"a": 0, "e0": 1, "e1": 0}
    tied_tables, tied = tie_tables(tables, lambda n: "experts" if n.startswith("e") else None)
    assert tied == {"experts": ["e0", "e1"]} and tied_tables[-1].costs == (20, 40)
    bits, used = greedy_allocate(tied_tables, 40)
    bits = untie(bits, tied)
    assert {n: int(b[0]) for n, b in bits.items()} == {"a": 1, "e0": 0, "e1": 0} and used == 40
