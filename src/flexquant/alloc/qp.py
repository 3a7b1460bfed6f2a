"""Ratio optimisation (METHODS.md §2): a quadratic loss model over per-layer ratios, fitted from probe
measurements, projected to PSD, minimised under one linear bit budget, and rounded to whole steps.

Notation: r_l ∈ [0, r_max] is the fraction of layer l's weights held at the high bit-width; the loss
increase over the all-low-bit model is modelled as ΔL(r) = aᵀr + ½ rᵀQr; the budget is cᵀr ≤ B
(c_l = extra bits per unit of r_l). Pure numpy/scipy: no model, no I/O.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ..errors import FlexQuantError

log = logging.getLogger(__name__)
QP_BACKENDS = ("auto", "osqp", "scipy")
_FEAS_TOL = 1e-9


@dataclass
class LossModel:
    """ΔL(r) = aᵀr + ½ rᵀQr, with the probe facts it came from."""

    a: np.ndarray  # [L]
    Q: np.ndarray  # [L, L] (symmetric; PSD after `project_psd`)
    L0: float = 0.0  # the measured loss at r = 0 (ΔL is relative to it)
    facts: dict = field(default_factory=dict)

    def __call__(self, r) -> float:
        r = np.asarray(r, dtype=np.float64)
        return float(self.a @ r + 0.5 * r @ self.Q @ r)

    def grad(self, r) -> np.ndarray:
        return self.a + self.Q @ np.asarray(r, dtype=np.float64)


def fit_loss_model(L0: float, r1: np.ndarray, L1: np.ndarray, r2: np.ndarray, L2: np.ndarray,
                   pairs: dict[tuple[int, int], float] | None = None) -> LossModel:
    """a and Q from probes: L1/L2 = loss with only layer l at ratio r1_l / r2_l (r1 < r2, the ratios
    actually realised, not the nominal δ, 2δ); ``pairs[(l, k)]`` = loss with l at r1_l and k at r1_k.

    Per layer, the parabola through (0, L0), (r1, L1), (r2, L2) gives a_l and Q_ll (with r1 = δ,
    r2 = 2δ this is exactly Q_ll = (L² − 2L + L0)/δ², a_l = (L − L0)/δ − ½Q_llδ); a pair gives
    Q_lk = (L_lk − L_l − L_k + L0)/(r1_l r1_k). Unprobed pairs stay 0 (banded Q).
    """
    r1, r2 = np.asarray(r1, np.float64), np.asarray(r2, np.float64)
    d1, d2 = np.asarray(L1, np.float64) - L0, np.asarray(L2, np.float64) - L0
    if np.any(r1 <= 0) or np.any(r2 <= r1):
        raise FlexQuantError("probe ratios must satisfy 0 < r1 < r2 for every layer; raise the probe step delta")
    n = r1.size
    Q = np.zeros((n, n))
    # Solve [r1 r1²/2; r2 r2²/2] [a; q] = [d1; d2] per layer.
    det = r1 * r2**2 / 2 - r2 * r1**2 / 2
    a = (d1 * r2**2 / 2 - d2 * r1**2 / 2) / det
    q = (r1 * d2 - r2 * d1) / det
    Q[np.diag_indices(n)] = q
    for (i, j), Lij in (pairs or {}).items():
        if i == j:
            raise FlexQuantError(f"pair probe ({i}, {j}) names one layer twice")
        Q[i, j] = Q[j, i] = (Lij - L1[i] - L1[j] + L0) / (r1[i] * r1[j])
    return LossModel(a, Q, float(L0), {"pairs": len(pairs or {})})


def project_psd(Q: np.ndarray) -> tuple[np.ndarray, dict]:
    """The nearest (Frobenius) positive semidefinite matrix to sym(Q): negative eigenvalues set to 0."""
    S = (np.asarray(Q, np.float64) + np.asarray(Q, np.float64).T) / 2
    w, V = np.linalg.eigh(S)
    neg = w < 0
    P = (V * np.clip(w, 0, None)) @ V.T
    P = (P + P.T) / 2
    total = float(np.abs(w).sum()) or 1.0
    return P, {"negative_eigenvalues": int(neg.sum()), "min_eigenvalue": float(w.min()),
               "removed_fraction": float(np.abs(w[neg]).sum() / total),
               "frobenius_change": float(np.linalg.norm(P - S))}


@dataclass
class QPSolution:
    r: np.ndarray
    objective: float
    backend: str
    budget_used: float  # cᵀr / B
    max_violation: float  # largest violation of budget or bounds (0 when feasible)
    iterations: int | None = None


def _check(r, cost, budget, upper) -> float:
    return float(max(0.0, (cost @ r - budget) / max(budget, 1e-30), (-r).max(initial=0.0),
                     (r - upper).max(initial=0.0)))


def _solve_scipy(a, Q, cost, budget, upper, x0):
    from scipy.optimize import LinearConstraint, minimize

    fun = lambda r: (a @ r + 0.5 * r @ Q @ r, a + Q @ r)
    bounds = list(zip(np.zeros_like(upper), upper))
    cons = [{"type": "ineq", "fun": lambda r: 1.0 - (cost / budget) @ r, "jac": lambda r: -cost / budget}]
    res = minimize(fun, x0, jac=True, method="SLSQP", bounds=bounds, constraints=cons,
                   options={"ftol": 1e-14, "maxiter": 1000})
    if not res.success:  # fall back to the interior-point method; slower but robust
        log.info("SLSQP: %s; retrying with trust-constr", res.message)
        res = minimize(fun, x0, jac=True, hess=lambda r: Q, method="trust-constr",
                       bounds=bounds, constraints=[LinearConstraint(cost[None] / budget, -np.inf, 1.0)],
                       options={"gtol": 1e-12, "xtol": 1e-14, "maxiter": 5000})
    return np.clip(res.x, 0, upper), int(getattr(res, "nit", 0) or 0), "scipy"


def _solve_osqp(a, Q, cost, budget, upper):
    import osqp
    from scipy import sparse

    n = a.size
    A = sparse.vstack([sparse.csc_matrix(cost[None] / budget), sparse.eye(n)], format="csc")
    lo = np.concatenate([[-np.inf], np.zeros(n)])
    hi = np.concatenate([[1.0], upper])
    prob = osqp.OSQP()
    prob.setup(sparse.csc_matrix(np.triu(Q)), a, A, lo, hi, verbose=False, eps_abs=1e-10, eps_rel=1e-10,
               max_iter=200000, polishing=True)
    res = prob.solve()
    if res.x is None or str(res.info.status).lower() not in ("solved", "solved inaccurate"):
        raise FlexQuantError(f"OSQP did not solve the ratio QP: {res.info.status}")
    return np.asarray(res.x, np.float64), int(res.info.iter), "osqp"


def solve_ratio_qp(model: LossModel, cost: np.ndarray, budget: float, upper: np.ndarray | float,
                   backend: str = "auto") -> QPSolution:
    """min aᵀr + ½rᵀQr s.t. costᵀr ≤ budget, 0 ≤ r ≤ upper (Q must be PSD: call `project_psd` first).

    ``backend``: "osqp" (needs the optional ``osqp`` package), "scipy" (SLSQP, trust-constr fallback) or
    "auto" (OSQP when installed, else scipy). The answer is clipped into the bounds and, if it overshoots
    the budget by solver tolerance, scaled back onto it, so it is always feasible.
    """
    if backend not in QP_BACKENDS:
        raise FlexQuantError(f"qp backend {backend!r} is unknown; choose one of {QP_BACKENDS}")
    a, Q = np.asarray(model.a, np.float64), np.asarray(model.Q, np.float64)
    cost = np.asarray(cost, np.float64)
    n = a.size
    upper = np.broadcast_to(np.asarray(upper, np.float64), (n,)).copy()
    if budget < 0:
        raise FlexQuantError(f"the ratio budget is negative ({budget:.0f} bits): the low bit-width alone "
                             "exceeds the bpw budget; raise --bpw or lower --b-lo")
    if np.any(cost <= 0) or np.any(upper < 0) or Q.shape != (n, n):
        raise FlexQuantError("the ratio QP needs positive costs, non-negative upper bounds and a square Q")
    if np.linalg.eigvalsh((Q + Q.T) / 2).min() < -1e-9 * max(1.0, np.abs(Q).max()):
        raise FlexQuantError("Q is not positive semidefinite; project it with project_psd() first")
    if budget == 0:
        r, it, used = np.zeros(n), 0, "trivial"
    else:
        x0 = np.minimum(upper, budget / cost.sum())  # the equal ratio (feasible)
        if backend in ("auto", "osqp"):
            try:
                r, it, used = _solve_osqp(a, Q, cost, budget, upper)
            except ImportError as e:
                if backend == "osqp":
                    raise FlexQuantError("backend 'osqp' needs the osqp package: pip install 'flexquant[qp]'") from e
                r, it, used = _solve_scipy(a, Q, cost, budget, upper, x0)
        else:
            r, it, used = _solve_scipy(a, Q, cost, budget, upper, x0)
    r = np.clip(r, 0, upper)
    spent = float(cost @ r)
    if spent > budget:  # solver tolerance: scale back onto the budget
        r *= budget / spent
    viol = _check(r, cost, budget, upper)
    if viol > 1e-6:
        raise FlexQuantError(f"the QP answer violates its constraints by {viol:.2e}")
    return QPSolution(r, model(r), used, float(cost @ r / budget) if budget else 0.0, viol, it)


@dataclass
class StepTable:
    """The discrete ratios one layer can take: after s steps, ``weights[s]`` of its ``total`` weights are
    at the high bit-width and it costs ``bits[s]`` more stored bits than at s = 0 (exact, from the
    storage format). Index 0 is (0, 0)."""

    weights: np.ndarray  # [S+1] int, non-decreasing
    bits: np.ndarray  # [S+1] int
    total: int

    def ratio(self, s: int) -> float:
        return float(self.weights[s]) / self.total

    def steps_below(self, r: float) -> int:
        """The most steps whose ratio does not exceed r."""
        return int(np.searchsorted(self.weights, r * self.total * (1 + 1e-12) + 1e-9, side="right") - 1)


def round_to_steps(r: np.ndarray, tables: list[StepTable], budget_bits: int, model: LossModel | None,
                   upper: float = 1.0) -> list[int]:
    """Whole steps per layer near the continuous ratios ``r`` whose exact bits fit ``budget_bits``.

    Every layer starts at the most steps not above its r_l; while a next step fits the remaining budget
    (and stays ≤ ``upper``), the one with the best predicted loss change per bit is taken (``model`` None:
    the layer with the lowest ratio, i.e. equal ratios). Steps predicted to raise the loss are not taken.
    """
    steps = [min(t.steps_below(float(x)), t.steps_below(upper)) for t, x in zip(tables, r)]
    used = sum(int(t.bits[s]) for t, s in zip(tables, steps))
    while used > budget_bits:  # only possible when per-step bits are not linear in r; drop the cheapest loss
        cand = [i for i, s in enumerate(steps) if s > 0]
        if not cand:
            raise FlexQuantError(f"even no high-precision columns exceed the budget ({used} > {budget_bits} bits)")
        ratios = np.array([t.ratio(s) for t, s in zip(tables, steps)])

        def loss_up(i, ratios=ratios):
            t = tables[i]
            if model is None:
                return -ratios[i]
            trial = ratios.copy()
            trial[i] = t.ratio(steps[i] - 1)
            return (model(trial) - model(ratios)) / max(1, int(t.bits[steps[i]] - t.bits[steps[i] - 1]))

        i = min(cand, key=loss_up)
        used -= int(tables[i].bits[steps[i]] - tables[i].bits[steps[i] - 1])
        steps[i] -= 1
    while True:
        ratios = np.array([t.ratio(s) for t, s in zip(tables, steps)])
        base = model(ratios) if model is not None else 0.0
        best, best_i = None, None
        for i, (t, s) in enumerate(zip(tables, steps)):
            if s + 1 >= len(t.weights):
                continue
            extra = int(t.bits[s + 1] - t.bits[s])
            if used + extra > budget_bits or t.ratio(s + 1) > upper * (1 + 1e-12):
                continue
            if model is None:
                score = ratios[i]
            else:
                trial = ratios.copy()
                trial[i] = t.ratio(s + 1)
                score = (model(trial) - base) / max(extra, 1)
                if score > 0:
                    continue
            if best is None or score < best:
                best, best_i = score, i
        if best_i is None:
            return steps
        used += int(tables[best_i].bits[steps[best_i] + 1] - tables[best_i].bits[steps[best_i]])
        steps[best_i] += 1


def spearman(x, y) -> float:
    """Spearman rank correlation (ties get average ranks)."""
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(x, np.float64), np.asarray(y, np.float64)).statistic)
