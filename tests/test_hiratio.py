"""Layer-wise high-impact ratio optimisation (--method hiratio): the QP, its rounding, the budget, the hybrid
quantizer and the packed result."""

import numpy as np
import pytest
import torch

import flexquant as fq
from flexquant.alloc.qp import (
    LossModel,
    StepTable,
    convex_fit,
    fit_curve_model,
    fit_loss_model,
    project_psd,
    pwl,
    round_to_steps,
    solve_ratio_qp,
)
from flexquant.alloc.ratio_qp import trust_bounds
from flexquant.cli import main
from flexquant.config import GPTQConfig, GridConfig
from flexquant.errors import FlexQuantError
from flexquant.methods.hiratio import HiRatioConfig
from flexquant.models.builtin import tiny_llama
from flexquant.nn import QuantLinear
from flexquant.quant import gptq_quantize
from flexquant.quant.grid import log_scale, log_scale_base, log_scale_codes
from flexquant.quant.impact import latent_high_columns
from flexquant.quant.learned import LearnableGroups

FAST = dict(stats_nsamples=4, probe_nsamples=2, probe_seqlen=64, learn_nsamples=2, learn_batch=1, learn_steps=6)


def _random_qp(seed, n=12):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, n))
    Q = A @ A.T / n + np.diag(rng.uniform(0.1, 1, n))
    a = -rng.uniform(0.5, 2.0, n)
    cost = rng.uniform(1e5, 4e5, n)
    return LossModel(a, Q), cost, 0.3 * cost.sum() / 2, rng.uniform(0.2, 0.8, n)


@pytest.mark.parametrize("backend", ["scipy", "osqp"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_qp_answer_satisfies_constraints_and_kkt(seed, backend):
    if backend == "osqp":
        pytest.importorskip("osqp")
    model, cost, budget, upper = _random_qp(seed)
    lower = np.zeros_like(upper) if seed == 0 else 0.1 * upper  # a trust region on the last seeds
    sol = solve_ratio_qp(model, cost, budget, upper, backend=backend, lower=lower)
    assert sol.backend == backend
    r = sol.r
    assert (r >= lower - 1e-12).all() and (r <= upper + 1e-12).all() and cost @ r <= budget * (1 + 1e-12)
    # KKT: g + μc = 0 on free coordinates, ≥ 0 at the lower bound, ≤ 0 at the upper bound, μ ≥ 0.
    g = model.grad(r)
    at_lo, at_hi = r <= lower + 1e-7, r >= upper - 1e-7
    free = ~at_lo & ~at_hi
    mu = float(np.median(-g[free] / cost[free])) if free.any() else 0.0
    assert mu >= -1e-9
    kkt = g + mu * cost
    scale = np.abs(g).max()
    assert np.abs(kkt[free]).max(initial=0) < 1e-4 * scale
    assert (kkt[at_lo] >= -1e-4 * scale).all() and (kkt[at_hi] <= 1e-4 * scale).all()
    # and no random feasible point does better
    rng = np.random.default_rng(seed + 10)
    for _ in range(200):
        x = rng.uniform(lower, upper)
        if cost @ x > budget:
            x = lower + (x - lower) * (budget - cost @ lower) / (cost @ (x - lower))
        assert model(x) >= sol.objective - 1e-9


@pytest.mark.parametrize("center", ["zero", "equal"])
def test_loss_model_fit_recovers_a_quadratic_and_psd_projection(center):
    rng = np.random.default_rng(3)
    n = 5
    a, B = rng.normal(size=n), rng.normal(size=(n, n))
    Q = (B + B.T) / 2  # indefinite on purpose
    c = np.zeros(n) if center == "zero" else rng.uniform(0.1, 0.2, n)
    truth = LossModel(a, Q, center=c)
    f = lambda r: truth(r) + 7.0  # noqa: E731
    x1 = c + rng.uniform(0.05, 0.1, n) * (1 if center == "zero" else -1)
    x2 = c + rng.uniform(0.15, 0.3, n)
    at = lambda i, v: np.where(np.arange(n) == i, v, c)  # noqa: E731
    L1 = np.array([f(at(i, x1[i])) for i in range(n)])
    L2 = np.array([f(at(i, x2[i])) for i in range(n)])
    pp = x1 if center == "zero" else x2
    pairs = {(i, j): f(np.where(np.isin(np.arange(n), (i, j)), pp, c)) for i in range(n) for j in range(i + 1, n)}
    fit = fit_loss_model(7.0, None if center == "zero" else c, x1, L1, x2, L2, pairs,
                         pair_point=1 if center == "zero" else 2)
    assert np.allclose(fit.a, a, atol=1e-8) and np.allclose(fit.Q, Q, atol=1e-8)
    r = rng.uniform(0, 0.3, n)
    assert fit(r) + fit.L0 == pytest.approx(f(r))
    P, info = project_psd(fit.Q)
    assert np.linalg.eigvalsh(P).min() > -1e-10 and info["negative_eigenvalues"] > 0
    S = np.eye(n) * 2.0
    assert np.allclose(project_psd(S)[0], S)
    with pytest.raises(FlexQuantError, match="semidefinite"):
        solve_ratio_qp(fit, np.ones(n), 1.0, 1.0)
    with pytest.raises(FlexQuantError, match="negative"):
        solve_ratio_qp(LossModel(a, P), np.ones(n), -1.0, 1.0)


def test_rounding_to_steps_never_exceeds_the_budget():
    rng = np.random.default_rng(5)
    tables = []
    for _ in range(6):
        w = np.concatenate([[0], np.cumsum(rng.integers(1, 5, 20) * 64 * 100)])
        tables.append(StepTable(w, w * 2 + np.arange(21) * 7, int(w[-1] * 2)))
    model, _, _, _ = _random_qp(4, n=6)
    budget = 900_000
    r = np.full(6, 0.3)
    for m in (model, None):
        steps = round_to_steps(r, tables, budget, m, upper=0.45)
        used = sum(int(t.bits[s]) for t, s in zip(tables, steps))
        assert used <= budget
        assert all(t.ratio(s) <= 0.45 for t, s in zip(tables, steps))
        # maximal: no further step of any layer fits (the model is decreasing here)
        assert all(s + 1 >= len(t.weights) or used + t.bits[s + 1] - t.bits[s] > budget or t.ratio(s + 1) > 0.45
                   for t, s in zip(tables, steps))


def test_latent_columns_equal_gptq_compensation(correlated_layer):
    W, H = correlated_layer
    g, k = 64, 1
    grid = GridConfig(bits=2, group_size=g)
    perm = torch.randperm(W.shape[1], generator=torch.Generator().manual_seed(0))
    kept = perm[-k * g:]
    r = gptq_quantize(W, H, grid, GPTQConfig(), kept=kept, order=perm)  # last group kept in fp16
    Qp = r.dequantize()[:, perm]
    V = latent_high_columns(W, H, Qp[:, :-k * g], perm, k * g, r.stats["damp"])
    assert torch.allclose(V, Qp[:, -k * g:], atol=2e-3, rtol=2e-3)  # fp16 storage of the kept columns


@pytest.mark.parametrize("kind", ["clip", "round"])
def test_learnable_groups_export_exactly_on_the_stored_grid(kind):
    torch.manual_seed(0)
    V = torch.randn(16, 3, 64)
    base = log_scale_base(V, torch.full((3,), 4, dtype=torch.uint8), False)
    lg = LearnableGroups(V, 4, kind, base)
    codes, scales, zeros = lg.export()
    assert torch.equal(log_scale(base[:, None], log_scale_codes(scales, base[:, None])), scales)
    deq = (codes.float() - zeros[..., None]) * scales[..., None]
    assert torch.equal(deq, lg.fake_quant().detach())
    target = V * 0.9
    err0 = float(((lg.fake_quant().detach() - target) ** 2).sum())
    from flexquant.quant.learned import make_optimizer

    opt = make_optimizer(kind, lg.params, 0.05)
    for _ in range(30):
        loss = ((lg.fake_quant() - target) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        lg.clamp_()
    assert float(((lg.fake_quant().detach() - target) ** 2).sum()) < err0  # it learns


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    model, tok = tiny_llama(hidden=128, intermediate=256, layers=2)
    path = tmp_path_factory.mktemp("hiratio") / "m"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), model


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))


def _stored_bits(qm):
    return sum(m.stored_bits() for m in qm.model.modules() if isinstance(m, QuantLinear))


def test_hiratio_qp_budget_holds_exactly_from_stored_bits_and_reloads(wide, calib, tmp_path):
    path, _ = wide
    qm = fq.quantize(path, method="hiratio", group_size=64, clip="minmax", calib_ids=calib, progress=False,
                     options=dict(bpw=2.6, learner="round", **FAST))
    facts = qm.report["method"]["hiratio"]
    alloc, qp, budget = facts["allocation"], facts["qp"], facts["budget"]
    assert _stored_bits(qm) == alloc["planned_bits"] <= budget["budget_bits"]  # exact, never above
    assert qm.bpw <= 2.6
    # the solver's answer satisfies its constraints
    r, cost = np.array(qp["solution"]), np.array(qp["cost_bits_per_ratio"])
    assert (r >= np.array(qp["lower"]) - 1e-12).all() and (r <= np.array(qp["upper"]) + 1e-12).all()
    assert cost @ r <= qp["ratio_budget_bits"] * (1 + 1e-12) and qp["max_violation"] == 0
    assert all(0 <= x <= 0.5 for x in alloc["ratios"])
    # L0, two points per layer, the band-2 pair, and the chosen allocation unless it is the centre
    assert 1 + 2 * 2 + 1 <= facts["probe"]["cost"]["probes"] <= 1 + 2 * 2 + 1 + 1
    assert np.isfinite(qp["predicted_kl"]) and qp["measured_probe_kl"] > 0
    # high-impact groups are stored at 4 bits, the rest at 2, and the learner ran on every block
    bits = {n: sorted(set(m.group_bits.tolist())) for n, m in qm.model.named_modules() if isinstance(m, QuantLinear)}
    assert {b for v in bits.values() for b in v} == {2, 4}
    assert all("learn" in b for b in qm.report["blocks"])
    out = fq.save(qm, tmp_path / "hr")
    assert (out / "report_hiratio.png").stat().st_size > 10_000
    loaded = fq.load(out)
    ids = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, qm.model(ids).logits, atol=1e-5)
    assert loaded.bpw == pytest.approx(qm.bpw)


def test_zero_centred_loss_model_keeps_the_budget(wide, calib):
    path, _ = wide
    qm = fq.quantize(path, method="hiratio", group_size=64, clip="minmax", calib_ids=calib, progress=False,
                     options=dict(bpw=2.6, center="zero", learner="gptq", trust=1.0, **FAST))
    facts = qm.report["method"]["hiratio"]
    assert _stored_bits(qm) == facts["allocation"]["planned_bits"] <= facts["budget"]["budget_bits"]
    assert facts["probe"]["center_ratios"] == [0, 0] and min(facts["probe"]["r1"]) > 0
    # trust region 1: between the centre (0) and the farther probe point
    qp = facts["qp"]
    assert qp["lower"] == [0, 0] and np.allclose(qp["upper"], facts["probe"]["r2"])
    assert (np.array(qp["solution"]) <= np.array(qp["upper"]) + 1e-12).all()


def test_trust_bounds_hold_the_probed_span_and_the_centre():
    c, r1, r2, up = np.array([0.15, 0.0, 0.1]), np.array([0.0, 0.1, 0.05]), np.array([0.3, 0.2, 0.15]), np.full(3, .5)
    lo, hi = trust_bounds(c, r1, r2, up, 0.0)
    assert (lo == 0).all() and (hi == up).all()
    lo, hi = trust_bounds(c, r1, r2, up, 1.0)
    assert np.allclose(lo, [0.0, 0.0, 0.05]) and np.allclose(hi, [0.3, 0.2, 0.15])
    lo, hi = trust_bounds(c, r1, r2, up, 0.5)
    assert np.allclose(lo, [0.075, 0.0, 0.075]) and np.allclose(hi, [0.225, 0.1, 0.125])
    lo, hi = trust_bounds(c, r1, r2, np.full(3, 0.12), 3.0)  # clipped to [0, upper], centre still inside
    assert (lo >= 0).all() and (hi <= 0.12 + 1e-12).all() and (lo <= np.minimum(c, 0.12)).all()


def test_fp16_retention_and_fixed_ratios_hold_the_budget(wide, calib):
    path, _ = wide
    qm = fq.quantize(path, method="hiratio", group_size=64, clip="minmax", calib_ids=calib, progress=False,
                     options=dict(bpw=2.7, b_hi=16, allocation="equal", learner="gptq", **FAST))
    alloc = qm.report["method"]["hiratio"]["allocation"]
    assert _stored_bits(qm) == alloc["planned_bits"] <= int(2.7 * qm.report["summary"]["quantized_weights"])
    fp16 = [m for m in qm.model.modules() if isinstance(m, QuantLinear) and "fp16_cols" in m.buffer_names]
    assert fp16 and all(set(m.group_bits.tolist()) == {2, 16} for m in fp16)
    fixed = fq.quantize(path, method="hiratio", group_size=64, clip="minmax", calib_ids=calib, progress=False,
                        options=dict(bpw=2.7, ratios=(0.2, 0.0), learner="gptq", **FAST))
    ratios = fixed.report["method"]["hiratio"]["allocation"]["ratios"]
    assert ratios[1] == 0 and 0 < ratios[0] <= 0.2


def test_bad_settings_fail_clearly(wide, calib):
    with pytest.raises(FlexQuantError, match="b_hi"):
        HiRatioConfig(b_lo=4, b_hi=3)
    with pytest.raises(FlexQuantError, match="allocation"):
        HiRatioConfig(allocation="greedy")
    path, _ = wide
    with pytest.raises(FlexQuantError, match="infeasible"):
        fq.quantize(path, method="hiratio", group_size=64, clip="minmax", calib_ids=calib, progress=False,
                    options=dict(bpw=2.1, **FAST))
    with pytest.raises(FlexQuantError, match="ratios has 3 entries"):
        fq.quantize(path, method="hiratio", group_size=64, clip="minmax", calib_ids=calib, progress=False,
                    options=dict(bpw=2.6, ratios=(0.1, 0.1, 0.1), **FAST))
    with pytest.raises(FlexQuantError, match="more than the bpw"):
        fq.quantize(path, method="hiratio", group_size=64, clip="minmax", calib_ids=calib, progress=False,
                    options=dict(bpw=2.45, ratios=(0.5, 0.5), learner="gptq", **FAST))


def test_cli_hiratio_flags(wide, tmp_path, capsys):
    path, _ = wide
    assert main(["quantize", path, "--method", "gptq", "--b-hi", "4", "--out", str(tmp_path / "x"), "-q"]) == 2
    assert "--method hiratio only" in capsys.readouterr().err
    assert main(["quantize", path, "--method", "hiratio", "--bpw", "2.6", "--dosa", "--out", str(tmp_path / "y"),
                 "-q"]) == 2
    assert "--method flexible only" in capsys.readouterr().err
    assert main(["quantize", path, "--method", "hiratio", "--bpw", "2.6", "--allocation", "equal", "--learner", "gptq",
                 "--clip", "minmax", "--stats-nsamples", "2", "--nsamples", "2", "--seqlen", "32",
                 "--out", str(tmp_path / "h"), "-q"]) == 0
    assert '"bpw": 2.' in capsys.readouterr().out
    assert main(["quantize", path, "--method", "hiratio", "--bpw", "2.6", "--loss-model", "curve",
                 "--curve-points", "0", "2", "--out", str(tmp_path / "c"), "-q"]) == 2
    assert "curve_points" in capsys.readouterr().err  # a fraction above 1 is named with its fix


def test_least_squares_fit_recovers_banded_plus_distance_couplings():
    from flexquant.alloc.qp import fit_loss_model_lstsq

    rng = np.random.default_rng(5)
    n, band = 6, 1
    a = rng.normal(size=n)
    Q = np.diag(rng.uniform(1, 2, n))
    for i in range(n - 1):
        Q[i, i + 1] = Q[i + 1, i] = rng.normal()
    gamma = {2: 0.3, 3: -0.2, 4: 0.1, 5: 0.05}
    for k, gk in gamma.items():
        for i in range(n - k):
            Q[i, i + k] = Q[i + k, i] = gk
    c = rng.uniform(0.1, 0.2, n)
    truth = LossModel(a, Q, center=c)
    points = [(r, truth(r) + 3.0) for r in rng.uniform(0.0, 0.3, (60, n))]
    fit = fit_loss_model_lstsq(3.0, c, points, band)
    assert np.allclose(fit.a, a, atol=1e-8) and np.allclose(fit.Q, Q, atol=1e-8)
    assert fit.facts["rms_residual"] < 1e-10 and fit.facts["far_couplings"]["2"] == pytest.approx(0.3)
    # without the distance terms the far couplings are not modelled: a residual is left
    assert fit_loss_model_lstsq(3.0, c, points, band, far=False).facts["rms_residual"] > 1e-3


def test_joint_probes_refit_and_keep_the_budget(wide, calib):
    path, _ = wide
    qm = fq.quantize(path, method="hiratio", group_size=64, clip="minmax", calib_ids=calib, progress=False,
                     options=dict(bpw=2.6, learner="gptq", joint_probes=3, **FAST))
    facts = qm.report["method"]["hiratio"]
    assert _stored_bits(qm) == facts["allocation"]["planned_bits"] <= facts["budget"]["budget_bits"]
    joint = facts["probe"]["joint"]
    assert len(joint) == 3 and all(np.isfinite(p["loss"]) for p in joint)
    assert facts["probe"]["fit"]["points"] == 1 + 2 * 2 + 1 + 3  # centre, 2 per layer, 1 pair, joint
    assert facts["probe"]["cost"]["probes"] >= 1 + 4 + 1 + 3  # (+ the chosen allocation unless it is the centre)


def test_convex_fit_is_convex_and_exact_on_convex_data():
    x = np.array([0.0, 0.05, 0.1, 0.1, 0.2, 0.3, 0.5])
    y = 1 / (x + 0.05)
    xs, g, rms = convex_fit(x, y)
    assert list(xs) == sorted(set(x)) and rms < 1e-9 and np.allclose(g, 1 / (xs + 0.05))
    noisy = y + np.random.default_rng(0).normal(0, 0.5, y.size)
    xs, g, _ = convex_fit(x, noisy)
    slopes = np.diff(g) / np.diff(xs)
    assert (np.diff(slopes) >= -1e-9).all()  # slopes never decrease
    assert pwl(xs, g, 0.6) == pytest.approx(g[-1] + slopes[-1] * 0.1)  # linear beyond the last knot


@pytest.mark.parametrize("backend", ["scipy", "osqp"])
def test_curve_qp_is_the_best_feasible_point(backend):
    if backend == "osqp":
        pytest.importorskip("osqp")
    rng = np.random.default_rng(3)
    n, c = 4, np.full(4, 0.2)
    grid = np.linspace(0, 0.5, 6)
    singles = [[(x, float(np.exp(-x / rng.uniform(0.05, 0.3)))) for x in grid] for _ in range(n)]
    m = fit_curve_model(1.0, c, singles, c + 0.1, [v for _, v in (s[3] for s in singles)], {(0, 1): 0.9})
    m.Q = project_psd(m.Q)[0]
    cost = rng.uniform(1, 2, n)
    budget = 0.2 * cost.sum()
    sol = solve_ratio_qp(m, cost, budget, 0.5, backend=backend)
    assert sol.max_violation == 0 and cost @ sol.r <= budget * (1 + 1e-9)
    assert (sol.r >= -1e-12).all() and (sol.r <= 0.5 + 1e-12).all()
    assert sol.objective == pytest.approx(m(sol.r))
    # no feasible point on the budget face beats it
    for _ in range(3000):
        r = np.minimum(rng.dirichlet(np.ones(n)) * budget / cost, 0.5)
        assert m(r) >= sol.objective - 1e-6


def test_curve_loss_model_probes_curves_and_keeps_the_budget(wide, calib):
    path, _ = wide
    qm = fq.quantize(path, method="hiratio", group_size=64, clip="minmax", calib_ids=calib, progress=False,
                     options=dict(bpw=2.6, learner="gptq", loss_model="curve", curve_points=[0, 0.5, 1], **FAST))
    facts = qm.report["method"]["hiratio"]
    assert _stored_bits(qm) == facts["allocation"]["planned_bits"] <= facts["budget"]["budget_bits"]
    qp = facts["qp"]
    assert qp["loss_model"] == "curve" and len(qp["curves"]) == 2 and qp["max_violation"] == 0
    assert qp["lower"] == [0, 0]  # the curves span [0, r_max]: no trust region
    for x, g in qp["curves"]:
        slopes = np.diff(g) / np.diff(x)
        assert (np.diff(slopes) >= -1e-9).all()
    assert facts["probe"]["curve"] and all(p["layer"] in (0, 1) for p in facts["probe"]["curve"])
    with pytest.raises(FlexQuantError, match="joint_probes"):
        HiRatioConfig(loss_model="curve", joint_probes=4)


def test_probe_kl_equals_the_whole_models_kl(monkeypatch):
    """The probe engine's KL (taken 5 positions at a time; a base configuration, then a change of block 1 only
    rerun from that block's stored input) equals the whole model's KL to the float model on the same tokens, and
    the model's own weights come back."""
    import copy

    import torch.nn.functional as F

    from flexquant.alloc import probe
    from flexquant.models import get_spec

    monkeypatch.setattr(probe, "ROWS", 5)
    model = tiny_llama(seed=0)[0].eval()
    ref = copy.deepcopy(model)
    spec, ids = get_spec("llama"), torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(0)

    def noisy(name):
        w = ref.get_submodule(name).weight.data
        return w + 0.05 * w.std() * torch.randn(w.shape, generator=gen)

    base = {n: noisy(n) for n in ("model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj")}
    change = {"model.layers.1.self_attn.o_proj": noisy("model.layers.1.self_attn.o_proj") * 1.5}

    def whole(weights):  # every position's next-token distribution, as the probes measure
        m = copy.deepcopy(ref)
        for n, w in weights.items():
            m.get_submodule(n).weight.data = w
        with torch.no_grad():
            lp, rp = (F.log_softmax(x(ids).logits.float(), -1) for x in (m, ref))
        return float((rp.exp() * (rp - lp)).sum()) / ids.numel()

    with probe.ProbeEngine(model, spec, ids, torch.device("cpu"), batch_size=2) as engine:
        assert engine.set_base(base) == pytest.approx(whole(base), rel=1e-4)
        changed = whole({**base, **change})
        assert changed > 2 * whole(base) and engine.loss(change, 1) == pytest.approx(changed, rel=1e-4)
    for n in base:
        assert torch.equal(model.get_submodule(n).weight, ref.get_submodule(n).weight)
