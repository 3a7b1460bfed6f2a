"""The ranking-check helpers of bench/hiratio_bench.py and bench/hiratio_fresh.py (pure numpy on stored data)."""

import json
from pathlib import Path

import numpy as np
import pytest

from bench import hiratio_bench, hiratio_fresh

ROOT = Path(__file__).resolve().parents[1]


def test_at_budget_spends_the_bits_within_r_max():
    rng = np.random.default_rng(0)
    cost = rng.uniform(1e5, 3e5, 12)
    for w in (rng.dirichlet(np.full(12, 0.3)), np.ones(12), np.exp(np.linspace(-3, 3, 12))):
        bits = 0.15 * cost.sum()
        r = hiratio_bench.at_budget(w, cost, bits, 0.4)
        assert r.max() <= 0.4 + 1e-12 and r.min() >= 0
        assert cost @ r == pytest.approx(bits, abs=1.0)


def test_curve_model_rebuilt_from_stored_probes_matches_the_runs_predictions():
    src = json.loads((ROOT / "bench/results/hiratio_curve.json").read_text())["spearman"]
    model = hiratio_fresh.curve_model_from_probe(src["probe"], src["loss_model"])
    for a in src["allocations"]:
        assert model.L0 + model(a["ratios"]) == pytest.approx(a["predicted_kl"], abs=1e-9)
    with pytest.raises(SystemExit, match="loss-model curve"):
        hiratio_fresh.curve_model_from_probe(src["probe"], "quadratic")


def _rows(model, y_of_d, n=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        r = np.clip(model.center + rng.normal(0, 0.08, model.center.size), 0, 0.5)
        d = np.array([np.interp(r[i], *c) - np.interp(model.center[i], *c) for i, c in enumerate(model.curves)])
        rows.append({"ratios": r.tolist(), "probe_tokens_kl": model.L0 + y_of_d(d, rng)})
    return rows


def test_reweight_cv_finds_structured_error_and_not_noise():
    src = json.loads((ROOT / "bench/results/hiratio_curve.json").read_text())["spearman"]
    model = hiratio_fresh.curve_model_from_probe(src["probe"], src["loss_model"])
    model.Q = np.zeros_like(model.Q)  # curve terms only: the synthetic truth below has no couplings
    half = (model.center.size + 1) // 2
    structured = hiratio_fresh.reweight_cv(model, _rows(model, lambda d, rng: 2.0 * d[:half].sum() + d[half:].sum()))
    assert min(v for k, v in structured.items() if k.startswith("3 depth")) < 0.5 * structured["plain model"]
    noise = hiratio_fresh.reweight_cv(model, _rows(model, lambda d, rng: d.sum() + rng.normal(0, 0.03)))
    assert min(noise.values()) > 0.8 * noise["plain model"]


def test_exact_sum_check_on_the_stored_joint_probes():
    probe = json.loads((ROOT / "bench/results/hiratio_joint_study.json").read_text())["spearman"]["probe"]
    facts = hiratio_fresh.exact_sum_check(probe)
    assert facts["joint_probes"] == len(probe["joint"]) == 60
    assert facts["rms_miss"] == pytest.approx(0.1094, abs=1e-3) and facts["spread"] == pytest.approx(0.2457, abs=1e-3)
    off = dict(probe, joint=[dict(probe["joint"][0], ratios=[x + 0.01 for x in probe["joint"][0]["ratios"]])])
    with pytest.raises(SystemExit, match="off its probe points"):
        hiratio_fresh.exact_sum_check(off)
    with pytest.raises(SystemExit, match="no joint probes"):
        hiratio_fresh.exact_sum_check(dict(probe, joint=[]))


def test_measure_allocation_puts_the_weights_back_and_counts_the_stored_bits():
    import torch

    from flexquant.config import QuantConfig
    from flexquant.eval import reference_logprobs
    from flexquant.methods import build_method
    from flexquant.models import get_spec
    from flexquant.models.builtin import tiny_llama
    from flexquant.pipeline import prepare_model

    model, _ = tiny_llama(hidden=128, intermediate=256, layers=2)
    model.eval()
    calib = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))
    config = QuantConfig(model="tiny", method="hiratio", nsamples=4, seqlen=64,
                         options={"bpw": 2.6, "allocation": "equal", "stats_nsamples": 4}).replace(group_size=64)
    method = build_method(config)
    method.keep_prober = True  # as the bench sets it
    prepare_model(model, get_spec(model.config.model_type), method, calib, torch.device("cpu"))
    fp = {n: model.get_submodule(n).weight.data for blk in method.ratio_plan.blocks for n in blk}
    before = {n: w.clone() for n, w in fp.items()}
    ref = reference_logprobs(model, calib, progress=False)
    facts = method.summary()["hiratio"]
    steps = facts["allocation"]["steps"]
    row = hiratio_bench.measure_allocation(model, method, fp, steps, calib[:2], ref[:2], calib[2:], ref[2:])
    assert all(torch.equal(model.get_submodule(n).weight.data, w) for n, w in before.items())
    assert row["bpw"] == pytest.approx(facts["allocation"]["planned_bpw"])
    assert row["ratios"] == facts["allocation"]["ratios"]
    assert row["measured_kl"] > 0 and row["probe_tokens_kl"] > 0
