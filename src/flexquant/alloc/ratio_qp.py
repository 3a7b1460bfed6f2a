"""The ratio QP's probe design and fits (METHODS.md §2, steps 3-4): probe KL at the centre, at two points per
layer and at pairs of layers, fit the loss model (quadratic, or convex curves per layer + pair couplings,
optionally refitted on random joint probes), project it to PSD and solve the budget QP (in a trust region for
the quadratic model), then round to whole steps within the budget."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from ..errors import FlexQuantError
from ..pipeline.store import ActivationStore
from .probe import ProbeEngine, ProbeQuantizer
from .qp import (
    LossModel,
    fit_curve_model,
    fit_loss_model,
    fit_loss_model_lstsq,
    project_psd,
    round_to_steps,
    solve_ratio_qp,
    spearman,
)
from .ratio import RatioPlan

log = logging.getLogger(__name__)


def trust_bounds(center: np.ndarray, r1: np.ndarray, r2: np.ndarray, upper: np.ndarray,
                 trust: float) -> tuple[np.ndarray, np.ndarray]:
    """QP bounds per layer: [0, upper] (trust = 0), or the probed span around the centre widened by
    ``trust`` (1 = from the lower to the higher probe point), clipped to [0, upper]. The centre always lies
    inside, so the centre allocation stays feasible."""
    if trust == 0:
        return np.zeros_like(upper), upper
    lo_pt, hi_pt = np.minimum(r1, r2), np.maximum(r1, r2)
    lower = np.clip(center - trust * np.maximum(center - lo_pt, 0), 0, upper)  # <= the centre (or upper)
    return lower, np.clip(center + trust * np.maximum(hi_pt - center, 0), lower, upper)


@dataclass
class Probes:
    """The probe design (steps per layer) and what was measured there."""

    base: list[int]
    s1: list[int]
    s2: list[int]
    pair_point: int  # which probe point (1 or 2) the pairs use
    L0: float = 0.0
    L1: np.ndarray = field(default_factory=lambda: np.zeros(0))
    L2: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pairs: dict = field(default_factory=dict)

    @property
    def sp(self) -> list[int]:
        return self.s1 if self.pair_point == 1 else self.s2


@dataclass
class QPAllocation:
    steps: list[int]
    loss_model: LossModel
    probe: dict
    qp: dict


class RatioSearch:
    """Probes, fits and solves for one `RatioPlan` under ``options`` (the hiratio options: delta, center,
    r_max, band, trust, loss_model, curve_points, joint_probes, qp_backend, probe_nsamples, probe_seqlen)."""

    def __init__(self, plan: RatioPlan, prober: ProbeQuantizer, options, seed: int):
        self.plan, self.prober, self.h, self.seed = plan, prober, options, seed
        self.tables = plan.tables

    def ratio(self, steps) -> np.ndarray:
        return self.plan.ratios(steps)

    def probe_points(self, r_equal: float, extra: int) -> Probes:
        """Steps per layer of the centre and the two probe points, and which point the pairs use.

        "zero" (METHODS.md): centre r = 0, probes at δ and 2δ, pairs at δ. "equal": centre at the equal
        allocation, probes at c − δ and c + δ (central difference; two points above when c is at 0), pairs
        at c + δ. Realised in whole steps, within r_max."""
        h = self.h
        delta = h.delta or r_equal
        cap = [t.steps_below(h.r_max) for t in self.tables]
        if h.center == "zero":
            base = [0] * len(self.tables)
            s1 = [max(1, min(t.steps_below(delta), c - 1)) for t, c in zip(self.tables, cap)]
            s2 = [max(a + 1, min(t.steps_below(2 * delta), c)) for a, t, c in zip(s1, self.tables, cap)]
            pair_point = 1
        else:
            base = round_to_steps(np.full(len(self.tables), r_equal), self.tables, extra, None, h.r_max)
            s1, s2 = [], []
            for t, b, c in zip(self.tables, base, cap):
                lo = min(t.steps_below(max(0.0, t.ratio(b) - delta)), b - 1)
                hi = max(b + 1, min(t.steps_below(t.ratio(b) + delta), c))
                if lo < 0:  # the centre is at 0: two points above it
                    lo, hi = hi, max(hi + 1, min(t.steps_below(t.ratio(b) + 2 * delta), c))
                s1.append(lo)
                s2.append(hi)
            pair_point = 2
        if any(b > c for b, c in zip(s2, cap)):
            raise FlexQuantError(f"r_max={h.r_max} leaves a layer too few column groups to probe; raise r_max or "
                                 "use a smaller group size")
        return Probes(base, s1, s2, pair_point)

    def _measure(self, eng: ProbeEngine, p: Probes) -> None:
        """L0 at the centre, L1/L2 with one layer moved to its probe points, pairs within the band."""
        L, base, changes = len(p.base), p.base, self.prober.changes
        p.L0 = eng.set_base(self.prober.weights(base))
        moved = lambda pts, i: [pts[j] if j == i else base[j] for j in range(L)]  # noqa: E731
        p.L1 = np.array([eng.loss(changes(moved(p.s1, i), base, (i,)), i) for i in range(L)])
        p.L2 = np.array([eng.loss(changes(moved(p.s2, i), base, (i,)), i) for i in range(L)])
        for i in range(L):
            for j in range(i + 1, L if self.h.band == 0 else min(L, i + self.h.band + 1)):
                both = [p.sp[k] if k in (i, j) else base[k] for k in range(L)]
                p.pairs[(i, j)] = eng.loss(changes(both, base, (i, j)), i)

    def run(self, model, spec, calib_ids, device, batch_size: int, cost: np.ndarray, extra: int,
            upper: np.ndarray, r_equal: float, store: ActivationStore | None = None) -> QPAllocation:
        """Probe, fit, solve and round: the QP's allocation (whole steps per layer) and its facts. The probes'
        kept inputs and reference go to ``store`` (the run's)."""
        h, L, ratio = self.h, len(self.tables), self.ratio
        ids = calib_ids[: min(h.probe_nsamples, calib_ids.shape[0]), : h.probe_seqlen]
        p = self.probe_points(r_equal, extra)
        t0 = time.perf_counter()
        with ProbeEngine(model, spec, ids, device, batch_size, store) as eng:
            self._measure(eng, p)
            curve, joint = [], []
            if h.loss_model == "curve":
                raw, curve = self._curve_fit(eng, p)
            else:
                raw = fit_loss_model(p.L0, ratio(p.base), ratio(p.s1), p.L1, ratio(p.s2), p.L2, p.pairs,
                                     p.pair_point)
            if h.joint_probes:
                raw, joint = self._joint_fit(eng, raw, p)
            Qp, psd = project_psd(raw.Q)
            model_ = LossModel(raw.a, Qp, p.L0, raw.center, curves=raw.curves)
            if raw.curves is not None:  # the curves span [0, r_max]: no trust region
                lower, hi = np.zeros(L), upper
            else:
                lower, hi = trust_bounds(ratio(p.base), ratio(p.s1), ratio(p.s2), upper, h.trust)
            sol = solve_ratio_qp(model_, cost, extra, hi, h.qp_backend, lower=lower)
            steps = round_to_steps(sol.r, self.tables, extra, model_, hi)
            diff = [i for i in range(L) if steps[i] != p.base[i]]
            measured = eng.loss(self.prober.changes(steps, p.base), min(diff)) if diff else p.L0
            probe_cost = eng.cost()
        probe_cost["total_seconds"] = time.perf_counter() - t0  # probe-quantizer GPTQ runs included
        probe = {"center": h.center, "L0": p.L0, "center_ratios": ratio(p.base).tolist(),
                 "L1": p.L1.tolist(), "L2": p.L2.tolist(), "r1": ratio(p.s1).tolist(), "r2": ratio(p.s2).tolist(),
                 "delta": h.delta or r_equal, "pairs": {f"{i},{j}": v for (i, j), v in p.pairs.items()},
                 "band": h.band, "tokens": int(ids.numel()), "cost": probe_cost, "joint": joint,
                 "curve": curve, "fit": raw.facts}
        equal = round_to_steps(np.full(L, r_equal), self.tables, extra, None, h.r_max)
        qp = {
            "loss_model": h.loss_model, "a": raw.a.tolist(), "Q": raw.Q.tolist(), "Q_psd": Qp.tolist(),
            "psd_projection": psd,
            "curves": None if raw.curves is None else [[x.tolist(), g.tolist()] for x, g in raw.curves],
            "cost_bits_per_ratio": cost.tolist(), "ratio_budget_bits": extra, "trust": h.trust,
            "lower": lower.tolist(), "upper": hi.tolist(),
            "solution": sol.r.tolist(), "objective": sol.objective, "backend": sol.backend,
            "budget_used": sol.budget_used, "max_violation": sol.max_violation, "iterations": sol.iterations,
            "rounded": ratio(steps).tolist(), "rounded_bits": self.plan.bits(steps),
            "predicted_kl": p.L0 + model_(ratio(steps)), "measured_probe_kl": measured,
            "predicted_kl_equal": p.L0 + model_(ratio(equal)),
        }
        log.info("hiratio probes: %d probes, %.0f s; QP (%s) predicted KL %.4f, measured %.4f",
                 probe_cost["probes"], probe_cost["total_seconds"], sol.backend, qp["predicted_kl"], measured)
        return QPAllocation(steps, model_, probe, qp)

    def _curve_fit(self, eng: ProbeEngine, p: Probes):
        """Probe every layer alone at ``curve_points`` × r_max (whole steps; points already probed are reused)
        and fit the curve loss model (`fit_curve_model`) on them with the centre, the probe points and pairs."""
        h, r1, r2 = self.h, self.ratio(p.s1), self.ratio(p.s2)
        singles = [[(r1[i], float(p.L1[i])), (r2[i], float(p.L2[i]))] for i in range(len(p.base))]
        measured = []
        for i, t in enumerate(tqdm(self.tables, desc="hiratio curve probes", leave=False, disable=None)):
            done = {p.base[i], p.s1[i], p.s2[i]}
            for f in h.curve_points:
                s = t.steps_below(f * h.r_max)
                if s in done:
                    continue
                done.add(s)
                steps = list(p.base)
                steps[i] = s
                loss = eng.loss(self.prober.changes(steps, p.base, (i,)), i)
                singles[i].append((t.ratio(s), loss))
                measured.append({"layer": i, "ratio": t.ratio(s), "loss": loss})
        fit = fit_curve_model(p.L0, self.ratio(p.base), singles, self.ratio(p.sp),
                              p.L2 if p.sp is p.s2 else p.L1, p.pairs)
        return fit, measured

    def _joint_fit(self, eng: ProbeEngine, raw: LossModel, p: Probes):
        """Measure ``joint_probes`` random allocations (each layer at its centre or one of its probe points,
        seeded), check how the per-probe model ranks them, and refit a, Q over every probe by least squares."""
        h, L, ratio, base = self.h, len(p.base), self.ratio, p.base
        rng = np.random.default_rng(self.seed)
        levels = np.array([base, p.s1, p.s2])  # [3, L] steps
        joint, seen = [], set()
        for _ in range(100 * h.joint_probes):  # distinct draws that move at least two layers
            if len(joint) == h.joint_probes:
                break
            steps = [int(levels[k, i]) for i, k in enumerate(rng.integers(0, 3, L))]
            diff = [i for i in range(L) if steps[i] != base[i]]
            if len(diff) < min(2, L) or tuple(steps) in seen:
                continue
            seen.add(tuple(steps))
            loss = eng.loss(self.prober.changes(steps, base), min(diff))
            joint.append({"ratios": ratio(steps).tolist(), "loss": loss,
                          "per_probe_prediction": p.L0 + raw(ratio(steps))})
        c = ratio(base)
        points = [(c, p.L0)]
        for i in range(L):
            for st, Li in ((p.s1, p.L1[i]), (p.s2, p.L2[i])):
                r = c.copy()
                r[i] = ratio(st)[i]
                points.append((r, float(Li)))
        for (i, j), Lij in p.pairs.items():
            r = c.copy()
            r[[i, j]] = ratio(p.sp)[[i, j]]
            points.append((r, Lij))
        points += [(np.array(q["ratios"]), q["loss"]) for q in joint]
        fit = fit_loss_model_lstsq(p.L0, c, points, h.band)
        fit.facts["per_probe_spearman_on_joint"] = spearman([q["per_probe_prediction"] for q in joint],
                                                            [q["loss"] for q in joint])
        return fit, joint
