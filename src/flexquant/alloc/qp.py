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
    """ΔL(r) = aᵀ(r − c) + ½ (r − c)ᵀQ(r − c) around the probed centre c (0 = METHODS.md's r = 0 form),
    plus, with ``curves``, a convex piecewise-linear term per layer Σ_l g_l(r_l) − g_l(c_l) (see
    `fit_curve_model`; the QP then runs in epigraph form)."""

    a: np.ndarray  # [L] gradient at the centre
    Q: np.ndarray  # [L, L] (symmetric; PSD after `project_psd`)
    L0: float = 0.0  # the measured loss at the centre (ΔL is relative to it)
    center: np.ndarray | None = None  # [L]; None = 0
    facts: dict = field(default_factory=dict)
    curves: list[tuple[np.ndarray, np.ndarray]] | None = None  # per layer: knots x (sorted), convex values g
    _g0: float | None = field(default=None, init=False, repr=False, compare=False)

    def _d(self, r) -> np.ndarray:
        r = np.asarray(r, dtype=np.float64)
        return r if self.center is None else r - self.center

    def _curve_term(self, r: np.ndarray) -> float:
        if self.curves is None:
            return 0.0
        if self._g0 is None:  # the curves at the centre, once
            c = np.zeros(len(self.curves)) if self.center is None else self.center
            self._g0 = sum(pwl(x, g, c[i]) for i, (x, g) in enumerate(self.curves))
        return float(sum(pwl(x, g, r[i]) for i, (x, g) in enumerate(self.curves)) - self._g0)

    def __call__(self, r) -> float:
        d = self._d(r)
        return float(self.a @ d + 0.5 * d @ self.Q @ d) + self._curve_term(np.asarray(r, np.float64))

    def grad(self, r) -> np.ndarray:
        """Gradient (for curves: the right slope of each piecewise-linear term)."""
        g = self.a + self.Q @ self._d(r)
        if self.curves is not None:
            r = np.asarray(r, np.float64)
            g = g + np.array([pwl_slope(x, v, r[i]) for i, (x, v) in enumerate(self.curves)])
        return g

    def linear_term(self) -> np.ndarray:
        """q of the same objective written as qᵀr + ½rᵀQr + const."""
        return self.a if self.center is None else self.a - self.Q @ self.center


def fit_loss_model(L0: float, center, x1, L1, x2, L2, pairs: dict[tuple[int, int], float] | None = None,
                   pair_point: int = 1) -> LossModel:
    """a and Q from probes around the centre c (all layers at c_l, loss L0): L1/L2 = loss with only layer l
    moved to x1_l / x2_l (the ratios actually realised, not the nominal ones); ``pairs[(l, k)]`` = loss with
    l and k both moved to their probe point ``pair_point`` (1: x1, 2: x2).

    Per layer, the parabola through (c, L0), (x1, L1), (x2, L2) gives a_l (its slope at c) and Q_ll. With
    c = 0, x1 = δ, x2 = 2δ this is METHODS.md's Q_ll = (L² − 2L + L0)/δ², a_l = (L − L0)/δ − ½Q_llδ; with
    x1 = c − δ, x2 = c + δ it is the central difference. A pair gives
    Q_lk = (L_lk − L_l − L_k + L0)/(d_l d_k), d = x − c at the pair point. Unprobed pairs stay 0 (banded Q).
    """
    c = np.zeros(np.asarray(x1).shape) if center is None else np.asarray(center, np.float64)
    d1, d2 = np.asarray(x1, np.float64) - c, np.asarray(x2, np.float64) - c
    e1, e2 = np.asarray(L1, np.float64) - L0, np.asarray(L2, np.float64) - L0
    if np.any(d1 == 0) or np.any(d2 == 0) or np.any(d1 == d2):
        raise FlexQuantError("each layer needs two probe ratios distinct from each other and from the centre; "
                             "raise the probe step delta")
    n = d1.size
    Q = np.zeros((n, n))
    # Solve [d1 d1²/2; d2 d2²/2] [a; q] = [e1; e2] per layer.
    det = d1 * d2**2 / 2 - d2 * d1**2 / 2
    a = (e1 * d2**2 / 2 - e2 * d1**2 / 2) / det
    Q[np.diag_indices(n)] = (d1 * e2 - d2 * e1) / det
    dp, Lp = (d1, np.asarray(L1, np.float64)) if pair_point == 1 else (d2, np.asarray(L2, np.float64))
    _pair_couplings(Q, pairs, dp, Lp, L0)
    return LossModel(a, Q, float(L0), None if center is None else c, {"pairs": len(pairs or {})})


def _pair_couplings(Q: np.ndarray, pairs: dict[tuple[int, int], float] | None, dp: np.ndarray, Lp: np.ndarray,
                    L0: float) -> None:
    """Q_lk = (L_lk − L_l − L_k + L0)/(d_l d_k) into Q for every probed pair: d = the pair point's offset from
    the centre, L_l = the single-layer loss there."""
    for (i, j), Lij in (pairs or {}).items():
        if i == j:
            raise FlexQuantError(f"pair probe ({i}, {j}) names one layer twice")
        if dp[i] == 0 or dp[j] == 0:
            raise FlexQuantError(f"pair probe ({i}, {j}) does not move both layers from the centre")
        Q[i, j] = Q[j, i] = (Lij - Lp[i] - Lp[j] + L0) / (dp[i] * dp[j])


def fit_loss_model_lstsq(L0: float, center, points: list[tuple[np.ndarray, float]], band: int,
                         far: bool = True) -> LossModel:
    """a and Q by least squares over probe points (ratios r, measured loss L) of any kind: single-layer,
    pairs and joint moves of many layers. Parameters: a_l, Q_ll, Q_lk for 0 < |l − k| ≤ band (band 0 = every
    pair) and, with ``far``, one coupling per distance beyond the band (Q_lk = γ_|l−k|, Toeplitz). Solved
    with numpy's minimum-norm least squares, so unidentified parameters stay 0."""
    c = np.asarray(center, np.float64)
    n = c.size
    near = [(i, j) for i in range(n) for j in range(i + 1, n) if band == 0 or j - i <= band]
    dists = list(range(band + 1, n)) if far and band else []
    D = np.array([np.asarray(r, np.float64) - c for r, _ in points])  # [P, n]
    y = np.array([L for _, L in points], np.float64) - L0
    cols = [D, 0.5 * D**2]
    if near:
        ii, jj = np.array(near).T
        cols.append(D[:, ii] * D[:, jj])
    for k in dists:
        cols.append((D[:, :-k] * D[:, k:]).sum(1, keepdims=True))
    X = np.concatenate(cols, 1)
    scale = np.abs(X).max(0)
    scale[scale == 0] = 1.0
    theta = np.linalg.lstsq(X / scale, y, rcond=None)[0] / scale
    a, Q = theta[:n], np.diag(theta[n:2 * n])
    off = theta[2 * n:]
    for (i, j), q in zip(near, off[: len(near)]):
        Q[i, j] = Q[j, i] = q
    for k, g in zip(dists, off[len(near):]):
        idx = np.arange(n - k)
        Q[idx, idx + k] = Q[idx + k, idx] = g
    resid = y - X @ theta
    return LossModel(a, Q, float(L0), c, {"points": len(points), "parameters": int(X.shape[1]),
                                          "rms_residual": float(np.sqrt(np.mean(resid**2))),
                                          "far_couplings": dict(zip(map(str, dists), off[len(near):].tolist()))})


def _segment(x: np.ndarray, r: float) -> int:
    """The segment [x_k, x_k+1] that holds r (the first or last one beyond the ends)."""
    return int(np.clip(np.searchsorted(x, r, side="right") - 1, 0, x.size - 2))


def pwl_slope(x: np.ndarray, g: np.ndarray, r: float) -> float:
    """The slope at r of the piecewise-linear function through (x_k, g_k) (the right slope at a knot)."""
    if x.size == 1:
        return 0.0
    k = _segment(x, r)
    return float((g[k + 1] - g[k]) / (x[k + 1] - x[k]))


def pwl(x: np.ndarray, g: np.ndarray, r: float) -> float:
    """The piecewise-linear function through (x_k, g_k) at r, extended linearly beyond the end knots."""
    if x.size == 1:
        return float(g[0])
    k = _segment(x, r)
    return float(g[k] + pwl_slope(x, g, r) * (r - x[k]))


def convex_fit(x, y) -> tuple[np.ndarray, np.ndarray, float]:
    """Least-squares convex piecewise-linear fit of points (x, y) with knots at the distinct x (repeated x
    averaged): g = β0 + β1(x − x0) + Σ_j u_j·max(0, x − x_j) with u ≥ 0 (slopes never decrease).
    Returns the knots, the fitted values there and the RMS residual over the points."""
    from scipy.optimize import lsq_linear

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xs, inv = np.unique(x, return_inverse=True)
    cnt = np.bincount(inv)
    ym = np.bincount(inv, y) / cnt
    K = xs.size
    if K <= 2:
        return xs, ym, float(np.sqrt(np.mean((y - ym[inv]) ** 2)))
    X = np.column_stack([np.ones(K), xs - xs[0]] + [np.maximum(0.0, xs - xs[j]) for j in range(1, K - 1)])
    w = np.sqrt(cnt)[:, None]
    lb = np.r_[-np.inf, -np.inf, np.zeros(K - 2)]
    beta = lsq_linear(X * w, ym * w[:, 0], bounds=(lb, np.inf), method="bvls").x
    g = X @ beta
    return xs, g, float(np.sqrt(np.mean((y - g[inv]) ** 2)))


def fit_curve_model(L0: float, center, singles: list[list[tuple[float, float]]], pair_ratios,
                    pair_losses, pairs: dict[tuple[int, int], float] | None = None) -> LossModel:
    """Loss model from per-layer curves: ``singles[l]`` = (ratio, loss) with only layer l moved from the centre
    (the centre (c_l, L0) is added); each layer's curve is a least-squares convex piecewise-linear fit
    (`convex_fit`); the inter-layer terms are METHODS.md's pair formula Q_lk = (L_lk − L_l − L_k + L0)/(d_l d_k)
    at the pair point (``pair_ratios``, single-layer losses ``pair_losses``), Q_ll = 0 (the curves carry each
    layer's own curvature). Project Q with `project_psd` before solving."""
    c = np.asarray(center, np.float64)
    n = c.size
    curves, resid = [], []
    for i in range(n):
        pts = [(float(c[i]), float(L0))] + [(float(r), float(v)) for r, v in singles[i]]
        xs, g, rms = convex_fit([p[0] for p in pts], [p[1] for p in pts])
        curves.append((xs, g))
        resid.append(rms)
    Q = np.zeros((n, n))
    _pair_couplings(Q, pairs, np.asarray(pair_ratios, np.float64) - c, np.asarray(pair_losses, np.float64), L0)
    return LossModel(np.zeros(n), Q, float(L0), c,
                     {"pairs": len(pairs or {}), "curve_points": int(sum(len(s) for s in singles)),
                      "curve_rms_residual": resid}, curves)


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


def _check(r, cost, budget, lower, upper) -> float:
    return float(max(0.0, (cost @ r - budget) / max(budget, 1e-30), (lower - r).max(initial=0.0),
                     (r - upper).max(initial=0.0)))


def _solve_scipy(P, q, G, h, lb, ub, x0):
    """min ½zᵀPz + qᵀz s.t. G z ≥ h, lb ≤ z ≤ ub (±inf allowed) (SLSQP; trust-constr fallback)."""
    from scipy.optimize import Bounds, LinearConstraint, minimize

    fun = lambda z: (q @ z + 0.5 * z @ P @ z, q + P @ z)  # noqa: E731
    cons = [{"type": "ineq", "fun": lambda z: G @ z - h, "jac": lambda z: G}]
    bounds = Bounds(lb, ub)
    res = minimize(fun, x0, jac=True, method="SLSQP", bounds=bounds, constraints=cons,
                   options={"ftol": 1e-14, "maxiter": 1000})
    if not res.success:  # fall back to the interior-point method; slower but robust
        log.info("SLSQP: %s; retrying with trust-constr", res.message)
        res = minimize(fun, x0, jac=True, hess=lambda z: P, method="trust-constr", bounds=bounds,
                       constraints=[LinearConstraint(G, h, np.inf)],
                       options={"gtol": 1e-12, "xtol": 1e-14, "maxiter": 5000})
    return np.asarray(res.x, np.float64), int(getattr(res, "nit", 0) or 0), "scipy"


def _solve_osqp(P, q, G, h, lb, ub):
    """The same problem with OSQP: rows G z ≥ h, then one row per variable for its bounds."""
    import osqp
    from scipy import sparse

    A = sparse.vstack([sparse.csc_matrix(G), sparse.eye(q.size)], format="csc")
    lo = np.concatenate([h, lb])
    hi = np.concatenate([np.full(h.size, np.inf), ub])
    prob = osqp.OSQP()
    prob.setup(sparse.csc_matrix(np.triu(P)), q, A, lo, hi, verbose=False, eps_abs=1e-10, eps_rel=1e-10,
               max_iter=200000, polishing=True)
    res = prob.solve()
    if res.x is None or str(res.info.status).lower() not in ("solved", "solved inaccurate"):
        raise FlexQuantError(f"OSQP did not solve the ratio QP: {res.info.status}")
    return np.asarray(res.x, np.float64), int(res.info.iter), "osqp"


def _epigraph(model: LossModel, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows [G | h] of t_l ≥ every segment line of layer l's curve, over z = [r, t]: −s r_l + t_l ≥ g_k − s x_k."""
    rows, rhs = [], []
    for i, (x, g) in enumerate(model.curves):
        slopes = np.diff(g) / np.diff(x) if x.size > 1 else np.zeros(1)  # one knot: the constant g_0
        last = None
        for k, s in enumerate(slopes):
            if last is not None and abs(s - last) <= 1e-12 * max(1.0, abs(s)):
                continue  # collinear with the previous segment: the same line (a degenerate row for OSQP)
            last = s
            row = np.zeros(2 * n)
            row[i], row[n + i] = -s, 1.0
            rows.append(row)
            rhs.append(g[k] - s * x[k])
    return np.array(rows), np.array(rhs)


def solve_ratio_qp(model: LossModel, cost: np.ndarray, budget: float, upper: np.ndarray | float,
                   backend: str = "auto", lower: np.ndarray | float = 0.0) -> QPSolution:
    """min ΔL(r) (``model``) s.t. costᵀr ≤ budget, lower ≤ r ≤ upper (Q must be PSD: `project_psd` first).
    A model with convex piecewise-linear ``curves`` is solved as the equivalent QP over [r, t] (epigraph).

    ``backend``: "osqp" (needs the optional ``osqp`` package), "scipy" (SLSQP, trust-constr fallback) or
    "auto" (OSQP when installed, else scipy; scipy also when OSQP stops unsolved). The answer is clipped into
    the bounds and, if it overshoots the budget by solver tolerance, scaled back onto it, so it is always
    feasible.
    """
    if backend not in QP_BACKENDS:
        raise FlexQuantError(f"qp backend {backend!r} is unknown; choose one of {QP_BACKENDS}")
    a, Q = np.asarray(model.linear_term(), np.float64), np.asarray(model.Q, np.float64)
    cost = np.asarray(cost, np.float64)
    n = a.size
    upper = np.broadcast_to(np.asarray(upper, np.float64), (n,)).copy()
    lower = np.broadcast_to(np.asarray(lower, np.float64), (n,)).copy()
    if budget < 0:
        raise FlexQuantError(f"the ratio budget is negative ({budget:.0f} bits): the low bit-width alone "
                             "exceeds the bpw budget; raise --bpw or lower --b-lo")
    if np.any(cost <= 0) or np.any(lower < 0) or np.any(upper < lower) or Q.shape != (n, n):
        raise FlexQuantError("the ratio QP needs positive costs, bounds 0 <= lower <= upper and a square Q")
    if cost @ lower > budget:
        raise FlexQuantError(f"the ratio QP is infeasible: its lower bounds alone need {cost @ lower:.0f} of "
                             f"{budget:.0f} bits")
    if np.linalg.eigvalsh((Q + Q.T) / 2).min() < -1e-9 * max(1.0, np.abs(Q).max()):
        raise FlexQuantError("Q is not positive semidefinite; project it with project_psd() first")
    if budget == 0 or cost @ lower == budget:
        r, it, used = lower.copy(), 0, "trivial"
    else:
        # a feasible start: the lower bounds plus an equal share of what is left, within the upper bounds
        x0 = np.minimum(upper, lower + (budget - cost @ lower) / cost.sum())
        P, q = Q, a
        G, h = cost[None] / -budget, np.array([-1.0])  # costᵀr / budget ≤ 1
        lb, ub = lower, upper
        if model.curves is not None:  # epigraph: z = [r, t], minimise Σ t_l with t_l above each curve
            P = np.block([[Q, np.zeros((n, n))], [np.zeros((n, 2 * n))]])
            q = np.concatenate([a, np.ones(n)])
            Ge, he = _epigraph(model, n)
            G = np.vstack([np.hstack([G, np.zeros((1, n))]), Ge])
            h = np.concatenate([h, he])
            lb, ub = np.concatenate([lower, np.full(n, -np.inf)]), np.concatenate([upper, np.full(n, np.inf)])
            x0 = np.concatenate([x0, [pwl(*model.curves[i], x0[i]) for i in range(n)]])
        if backend in ("auto", "osqp"):
            try:
                z, it, used = _solve_osqp(P, q, G, h, lb, ub)
            except ImportError as e:
                if backend == "osqp":
                    raise FlexQuantError("backend 'osqp' needs the osqp package: pip install 'flexquant[qp]'") from e
                z, it, used = _solve_scipy(P, q, G, h, lb, ub, x0)
            except FlexQuantError as e:
                if backend == "osqp":
                    raise
                log.info("%s; solving with scipy instead", e)
                z, it, used = _solve_scipy(P, q, G, h, lb, ub, x0)
        else:
            z, it, used = _solve_scipy(P, q, G, h, lb, ub, x0)
        r = z[:n]
    r = np.clip(r, lower, upper)
    spent = float(cost @ r)
    if spent > budget:  # solver tolerance: move back onto the budget toward the lower bounds
        r = lower + (r - lower) * (budget - cost @ lower) / (spent - cost @ lower)
    viol = _check(r, cost, budget, lower, upper)
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
                   upper: float | np.ndarray = 1.0) -> list[int]:
    """Whole steps per layer near the continuous ratios ``r`` whose exact bits fit ``budget_bits``.

    Every layer starts at the most steps not above its r_l; while a next step fits the remaining budget
    (and stays ≤ ``upper``), the one with the best predicted loss change per bit is taken (``model`` None:
    the layer with the lowest ratio, i.e. equal ratios). Steps predicted to raise the loss are not taken.
    """
    upper = np.broadcast_to(np.asarray(upper, np.float64), (len(tables),))
    steps = [min(t.steps_below(float(x)), t.steps_below(float(u))) for t, x, u in zip(tables, r, upper)]
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
            if used + extra > budget_bits or t.ratio(s + 1) > upper[i] * (1 + 1e-12):
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
