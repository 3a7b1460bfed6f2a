"""Layer-wise high-impact ratio optimisation (METHODS.md §2, after arXiv 2511.17801).

Each decoder layer l keeps a fraction r_l of its weights — its highest-impact input columns — at a
moderate bit-width b_hi and quantizes the rest at an extreme one b_lo. The ratios are chosen jointly
under one honest bit budget by a quadratic program whose loss model ΔL(r) = aᵀr + ½rᵀQr (inter-layer
terms included) is fitted from probe measurements of KL(full precision ‖ quantized) on a small
calibration subset. Then the hybrid quantization: GPTQ at b_lo with the high-impact columns ordered
last (they absorb its compensation), and a learnable quantizer (clipping or rounding) at b_hi for
those columns, trained on the block-output error. Packed in the foundation's format: a column
permutation and per-group bits (whole groups of g columns at b_hi, or fp16 for b_hi = 16).
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from ..alloc.qp import (
    QP_BACKENDS,
    LossModel,
    StepTable,
    fit_curve_model,
    fit_loss_model,
    fit_loss_model_lstsq,
    project_psd,
    round_to_steps,
    solve_ratio_qp,
    spearman,
)
from ..config import QuantConfig
from ..errors import FlexQuantError
from ..pipeline import Method
from ..pipeline.capture import capture_block_inputs, run_block
from ..pipeline.hooks import collect_hessian, onload
from ..pipeline.prenorm import prenorm_applicable, quantize_prenorm_block
from ..pipeline.sensitivity import output_fisher
from ..quant import gptq_quantize
from ..quant.gptq import inverse_cholesky_upper
from ..quant.grid import choose_qparams, dequantize, quantize
from ..quant.learned import LearnableGroups, make_optimizer
from ..quant.result import FP16_BITS
from .hiratio_probe import ProbeEngine, slice_inputs
from .registry import register

log = logging.getLogger(__name__)
ALLOCATIONS = ("qp", "equal")
CENTERS = ("equal", "zero")
LOSS_MODELS = ("quadratic", "curve")
IMPACTS = ("salience", "obs")
HI_LEARNERS = ("clip", "round", "gptq")
OBS_QUANTILE = 0.99  # impact "obs": a column scores the per-weight OBS costs it holds above this quantile


@dataclass(frozen=True)
class HiRatioConfig:
    """Settings of ``--method hiratio`` (``QuantConfig.options``)."""

    bpw: float = 2.5  # honest budget over all quantized linears (codes + all metadata)
    b_lo: int = 2  # bit-width of the low-impact columns (GPTQ)
    b_hi: int = 4  # bit-width of the high-impact columns (2..8), or 16 = fp16 retention (OWQ-style)
    allocation: str = "qp"  # "qp": ratios by the quadratic program; "equal": one ratio for every layer
    impact: str = "salience"  # column impact: "salience" σ_j = Σ_i f_i(w_ij − Q(w_ij))²/[H⁻¹]_jj, or
    #                           "obs": the per-weight OBS costs above the layer's 99% quantile it holds
    learner: str = "clip"  # b_hi quantizer: "clip" (OmniQuant LWC), "round" (AutoRound), "gptq" (no learning)
    r_max: float = 0.5  # upper bound of every layer's ratio
    center: str = "equal"  # loss-model expansion point: "equal" (the equal allocation; probes at c ± δ) or
    #                        "zero" (METHODS.md's r = 0; probes at δ and 2δ)
    delta: float = 0.0  # probe step; 0 = the equal ratio at this budget
    band: int = 2  # inter-layer terms probed for |l − k| ≤ band; 0 = every pair (full Q)
    # Trust region of the QP: each ratio stays within `trust` × the span its probes covered around the centre
    # (1 = between its two probe points, where the quadratic interpolates); 0 = only 0 ≤ r ≤ r_max. Measured
    # on smollm2-135m at 2.5 bpw (bench/results/hiratio_trust.md): 0.5 → 21.07 ppl, off → 24.52 (equal 21.90).
    trust: float = 0.5
    # Joint probes: random allocations with every layer at one of its three probed points (centre, the two
    # probe ratios); with N > 0, a and Q are refitted by least squares over every probe (single-layer, pairs,
    # joint), with one coupling per layer distance beyond the band. 0 = METHODS.md's per-probe formulas only.
    joint_probes: int = 0
    # Loss model: "quadratic" (METHODS.md: aᵀr + ½rᵀQr from the probes around the centre, QP within `trust`) or
    # "curve": each layer's loss is also probed at `curve_points` (fractions of r_max) and fitted by a convex
    # piecewise-linear curve over [0, r_max] (the measured curves are L-shaped: most of the gain in the first
    # few groups), plus METHODS.md's pair couplings; the same QP in epigraph form over the whole range.
    loss_model: str = "quadratic"
    curve_points: tuple[float, ...] = (0.0, 0.06, 0.12, 0.2, 0.4, 0.56, 0.76, 1.0)
    ratios: tuple[float, ...] = ()  # fixed per-layer ratios (skips probing; must fit the budget)
    qp_backend: str = "auto"  # "auto" (OSQP when installed, else scipy) | "osqp" | "scipy"
    stats_nsamples: int = 32  # calibration windows of the full-precision statistics pass (Hessians, Fisher)
    probe_nsamples: int = 8  # calibration windows the probes measure KL on
    probe_seqlen: int = 256  # tokens of each probe window
    learn_nsamples: int = 8  # calibration windows the learnable quantizer trains on
    learn_batch: int = 2  # windows per training step
    learn_steps: int = 40
    learn_lr: float = 0.0  # 0 = default: 0.05 (Adam, clip) or 1/learn_steps (signed steps, round)

    def __post_init__(self) -> None:
        def check(ok, msg):
            if not ok:
                raise FlexQuantError(msg)

        check(1.0 < self.bpw <= 16, f"bpw={self.bpw} must be in (1, 16]")
        check(self.b_lo in range(1, 8), f"b_lo={self.b_lo} must be 1..7")
        check(self.b_hi == FP16_BITS or self.b_lo < self.b_hi <= 8,
              f"b_hi={self.b_hi} must be above b_lo={self.b_lo} and at most 8, or 16 (fp16 retention)")
        check(self.center in CENTERS, f"center={self.center!r} must be one of {CENTERS}")
        check(self.allocation in ALLOCATIONS, f"allocation={self.allocation!r} must be one of {ALLOCATIONS}")
        check(self.impact in IMPACTS, f"impact={self.impact!r} must be one of {IMPACTS}")
        check(self.learner in HI_LEARNERS, f"learner={self.learner!r} must be one of {HI_LEARNERS}")
        check(self.qp_backend in QP_BACKENDS, f"qp_backend={self.qp_backend!r} must be one of {QP_BACKENDS}")
        check(0 < self.r_max <= 1, f"r_max={self.r_max} must be in (0, 1]")
        check(0 <= self.delta <= 0.5, f"delta={self.delta} must be in [0, 0.5] (0 = automatic)")
        check(self.band >= 0, f"band={self.band} must be >= 0")
        check(self.joint_probes >= 0, f"joint_probes={self.joint_probes} must be >= 0 (0 = off)")
        check(self.loss_model in LOSS_MODELS, f"loss_model={self.loss_model!r} must be one of {LOSS_MODELS}")
        check(all(0 <= f <= 1 for f in self.curve_points),
              f"curve_points={self.curve_points} must lie in [0, 1]: they are fractions of r_max")
        check(not (self.loss_model == "curve" and self.joint_probes),
              "joint_probes refit the quadratic loss model; use them with loss_model='quadratic'")
        check(self.trust >= 0, f"trust={self.trust} must be >= 0 (0 = no trust region)")
        check(all(0 <= r <= 1 for r in self.ratios), f"ratios={self.ratios} must lie in [0, 1]")
        for k in ("stats_nsamples", "probe_nsamples", "probe_seqlen", "learn_nsamples", "learn_batch"):
            check(getattr(self, k) >= 1, f"{k}={getattr(self, k)} must be >= 1")
        check(self.learn_steps >= 0 and self.learn_lr >= 0, "learn_steps and learn_lr must be >= 0")
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        object.__setattr__(self, "curve_points", tuple(float(f) for f in self.curve_points))

    @property
    def top_bits(self) -> int:
        """The widest quantized (not fp16) group."""
        return self.b_lo if self.b_hi == FP16_BITS else self.b_hi


@dataclass
class _Linear:
    name: str
    block: int
    m: int
    n: int
    impact_order: torch.Tensor  # input columns by impact, descending
    group_gain: np.ndarray  # [ng]: predicted loss saved by raising the t-th impact group to b_hi
    k: int = 0  # high-impact groups in the plan
    kmax: int = 0  # the most high-impact groups any allowed ratio of its layer gives it


@dataclass
class _Facts:
    budget: dict = field(default_factory=dict)
    probe: dict = field(default_factory=dict)
    qp: dict = field(default_factory=dict)
    allocation: dict = field(default_factory=dict)


def column_impact(W: torch.Tensor, H: torch.Tensor, rows: torch.Tensor, bits: int, group_size: int, damp: float,
                  mode: str = "salience") -> torch.Tensor:
    """Impact of each input column of W [m, n]: the OBS cost of rounding its weights at ``bits``,
    s_ij = f_i (w_ij − Q(w_ij))² / [H⁻¹]_jj (rows weighted by their loss Fisher f), summed per column
    ("salience"), or only the costs above the layer's OBS_QUANTILE ("obs": columns that hold the most
    damaging single weights)."""
    m, n = W.shape
    Wg = W.float().reshape(m, n // group_size, group_size)
    s, z = choose_qparams(Wg, bits)
    err = (Wg - dequantize(quantize(Wg, s, z, 2**bits - 1), s, z)).reshape(m, n)
    U, _ = inverse_cholesky_upper(H.float(), damp)
    hinv = (U * U).sum(0)  # diag(UᵀU) = diag(H⁻¹)
    cost = rows.float()[:, None] * err**2 / hinv
    if mode == "salience":
        return cost.sum(0)
    flat = cost.flatten()
    tau = flat.kthvalue(max(1, int(OBS_QUANTILE * flat.numel()))).values
    return (cost * (cost >= tau)).sum(0) + 1e-6 * cost.sum(0)  # the full sum breaks ties


def latent_high_columns(W: torch.Tensor, H: torch.Tensor, Q_lo: torch.Tensor, perm: torch.Tensor, k_cols: int,
                        damp: float) -> torch.Tensor:
    """The last ``k_cols`` columns (in order ``perm``) after GPTQ has compensated the quantized others:
    V = W_hi + (W_lo − Q_lo) H_lo,hi H_hi,hi⁻¹ (damped H, dead columns as in GPTQ) — the continuous weights
    that minimise the layer-output error given Q_lo, which the b_hi quantizer then rounds."""
    n = W.shape[1]
    W64, H64 = W.double().clone(), H.double().clone()
    dead = torch.diag(H64) == 0
    H64[dead, dead] = 1
    W64[:, dead] = 0
    W64, H64 = W64[:, perm], H64[perm][:, perm]
    H64 += damp * float(torch.diag(H64).mean()) * torch.eye(n, dtype=torch.float64, device=H.device)
    lo, hi = slice(0, n - k_cols), slice(n - k_cols, n)
    dW = W64[:, lo] - Q_lo.double()
    return (W64[:, hi] + torch.linalg.solve(H64[hi, hi], H64[lo, hi].T @ dW.T).T).float()


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


class HiRatio(Method):
    name = "hiratio"

    @classmethod
    def default_grid(cls, config) -> dict:
        """Compact metadata (8-bit log-coded scales, 4-bit zeros when no group exceeds 4 bits), as FlexibleLLM:
        0.19 instead of 0.375 bpw at group 64, which leaves more of the budget to the ratios."""
        h = HiRatioConfig(**config.options)
        return {"scale_bits": 8, "zero_bits": 4 if h.top_bits <= 4 else 8}

    def __init__(self, config: QuantConfig):
        self.config = config
        self.hcfg = HiRatioConfig(**config.options)
        if config.grid.zero_bits == 4 and self.hcfg.top_bits > 4:
            raise FlexQuantError(f"zero_bits=4 holds zero points of at most 4 bits, but b_hi={self.hcfg.b_hi}; "
                                 "pass --zero-bits 8 or --b-hi 4")
        self.lins: dict[str, _Linear] = {}
        self.blocks: list[list[str]] = []
        self.steps_seq: list[list[tuple[str, int]]] = []  # per block: (linear, its new k) per step
        self.tables: list[StepTable] = []
        self.facts = _Facts()
        self.loss_model: LossModel | None = None
        self.keep_probe_weights = False  # the benchmark keeps the probe quantizer's cache for more allocations
        self._H: dict[str, torch.Tensor] = {}
        self._fp: dict[str, torch.Tensor] = {}
        self._fp_learn: dict[int, list[torch.Tensor]] = {}
        self._probe_cache: dict[tuple[str, int], torch.Tensor] = {}
        self._stash: list = []

    # ----- exact storage cost -----
    def linear_bits(self, m: int, n: int, k: int) -> int:
        """Bits stored for an m×n linear with k high-impact groups (mirrors `format.pack.result_to_tensors`)."""
        h, grid, g = self.hcfg, self.config.grid, self.config.grid.group_size
        ng = n // g
        counts = {h.b_lo: ng - k}
        if h.b_hi != FP16_BITS:
            counts[h.b_hi] = counts.get(h.b_hi, 0) + k
        bits = ng * 8  # bit map
        bits += sum(m * math.ceil(c * g / 32) * 32 * b for b, c in counts.items() if c)
        nq = ng - (k if h.b_hi == FP16_BITS else 0)
        if nq:
            bits += m * nq * 16 if grid.scale_bits == 16 else m * nq * 8 + 16 * m
            if not grid.sym:
                bits += m * nq * 8 if grid.zero_bits == 8 else math.ceil(m * nq / 32) * 4 * 32
        bits += m * (ng - nq) * g * 16  # fp16 columns
        bits += n * (16 if n <= 2**15 else 32)  # permutation
        return bits

    # ----- whole-model preparation -----
    @torch.no_grad()
    def prepare(self, model, spec, calib_ids, device) -> None:
        h, g = self.hcfg, self.config.grid.group_size
        layers = model.get_submodule(spec.layers)
        self.spec = spec
        self.blocks = [[f"{spec.layers}.{i}.{n}" for n in spec.linears] for i in range(len(layers))]
        self._fp = {n: model.get_submodule(n).weight.data for blk in self.blocks for n in blk}
        if h.ratios and len(h.ratios) != len(layers):
            raise FlexQuantError(f"ratios has {len(h.ratios)} entries; the model has {len(layers)} layers")
        t0 = time.perf_counter()
        rows = self._fp_statistics(model, spec, calib_ids, device)
        for i, blk in enumerate(self.blocks):
            for name in blk:
                W = self._fp[name].float()
                m, n = W.shape
                imp = column_impact(W, self._H[name], rows[name], h.b_lo, g, self.config.gptq.damp, h.impact)
                order = torch.argsort(imp, descending=True, stable=True)
                shrink = 1.0 if h.b_hi == FP16_BITS else 1 - 4.0 ** (h.b_lo - h.b_hi)  # error left at b_hi
                gain = (imp[order].reshape(n // g, g).sum(1) * shrink).double().numpy()
                self.lins[name] = _Linear(name, i, m, n, order, gain)
        self._build_steps()
        stats_seconds = time.perf_counter() - t0
        N = sum(lin.m * lin.n for lin in self.lins.values())
        budget = int(h.bpw * N)
        base = sum(self.linear_bits(lin.m, lin.n, 0) for lin in self.lins.values())
        extra = budget - base
        if extra < 0:
            raise FlexQuantError(f"bpw={h.bpw} is infeasible: b_lo={h.b_lo} with its metadata alone costs "
                                 f"{base / N:.4f} bpw here; raise --bpw or lower --b-lo")
        cost = np.array([t.bits[-1] / t.weights[-1] * t.total for t in self.tables], np.float64)
        upper = np.array([min(h.r_max, t.ratio(len(t.weights) - 1)) for t in self.tables])
        r_equal = float(min(1.0, extra / cost.sum()))
        self.facts.budget = {"target_bpw": h.bpw, "weights": N, "budget_bits": budget, "low_bits": base,
                             "low_bpw": base / N, "ratio_budget_bits": extra, "equal_ratio": r_equal,
                             "stats_seconds": stats_seconds}
        if h.ratios:
            steps = [t.steps_below(r) for t, r in zip(self.tables, h.ratios)]
            if sum(int(t.bits[s]) for t, s in zip(self.tables, steps)) > extra:
                raise FlexQuantError(f"the fixed ratios need more than the bpw={h.bpw} budget; lower them")
        elif h.allocation == "equal":
            steps = round_to_steps(np.full(len(self.tables), r_equal), self.tables, extra, None, h.r_max)
        else:
            steps = self._qp_allocation(model, spec, calib_ids, device, cost, extra, upper, r_equal)
        self.apply_steps(steps)
        used = sum(int(t.bits[s]) for t, s in zip(self.tables, steps))
        ratios = [t.ratio(s) for t, s in zip(self.tables, steps)]
        self.facts.allocation = {
            "mode": "fixed" if h.ratios else h.allocation, "ratios": ratios, "steps": steps,
            "planned_bits": base + used, "planned_bpw": (base + used) / N,
            "per_matrix_high_groups": {n: lin.k for n, lin in self.lins.items()},
        }
        if self.loss_model is not None:
            self.facts.allocation["predicted_kl"] = self.loss_model.L0 + self.loss_model(ratios)
        if not self.keep_probe_weights:
            self._probe_cache.clear()
        log.info("hiratio: planned %.4f bpw (target %.3f); ratios %s", (base + used) / N, h.bpw,
                 " ".join(f"{r:.3f}" for r in ratios))

    def _fp_statistics(self, model, spec, calib_ids, device) -> dict[str, torch.Tensor]:
        """Input Hessians of every linear in the full-precision model and the loss Fisher of every output,
        over the first ``stats_nsamples`` windows; keeps the FP block inputs the learnable quantizer needs."""
        h, bs = self.hcfg, self.config.batch_size
        layers = model.get_submodule(spec.layers)
        calib = calib_ids[: max(1, min(calib_ids.shape[0], h.stats_nsamples))]
        inputs = capture_block_inputs(model, spec, calib, device, bs)
        stored = []
        for i, block in enumerate(layers):
            with onload(block, device):
                def keep(group, H, D=None, i=i):
                    for n in group:
                        self._H[f"{spec.layers}.{i}.{n}"] = H.cpu()
                if prenorm_applicable(spec, inputs, block):
                    out = quantize_prenorm_block(block, spec, inputs, device, keep)
                else:
                    for group in spec.linear_groups:
                        keep(group, collect_hessian(block, group[0], inputs, device))
                    out = run_block(block, inputs, device)
            stored.append(inputs)
            inputs = inputs.with_hidden(out)
        rows = output_fisher(model, spec, stored, inputs.hidden, calib, device, progress=False)
        if self.hcfg.learner in ("clip", "round"):
            self._fp_learn = {i: slice_inputs(s, h.learn_nsamples) for i, s in enumerate(stored)}
        return rows

    def _build_steps(self) -> None:
        """Per layer, the order in which its linears' impact groups go to b_hi: a merge of the linears'
        group sequences by predicted loss saved per stored bit (each linear's own groups stay in order)."""
        g = self.config.grid.group_size
        self.steps_seq, self.tables = [], []
        for blk in self.blocks:
            heap, seq = [], []
            weights, bits = [0], [0]

            def push(name, k, heap=heap):
                lin = self.lins[name]
                if k < lin.n // g:
                    step = self.linear_bits(lin.m, lin.n, k + 1) - self.linear_bits(lin.m, lin.n, k)
                    heapq.heappush(heap, (-lin.group_gain[k] / max(step, 1), name, k, step))

            for name in blk:
                push(name, 0)
            while heap:
                _, name, k, step = heapq.heappop(heap)
                seq.append((name, k + 1))
                weights.append(weights[-1] + self.lins[name].m * g)
                bits.append(bits[-1] + step)
                push(name, k + 1)
            total = sum(self.lins[n].m * self.lins[n].n for n in blk)
            self.steps_seq.append(seq)
            self.tables.append(StepTable(np.array(weights), np.array(bits), total))
            cap = max([self.hcfg.r_max] + ([self.hcfg.ratios[len(self.tables) - 1]] if self.hcfg.ratios else []))
            for name, k in seq[: self.tables[-1].steps_below(cap)]:
                self.lins[name].kmax = max(self.lins[name].kmax, k)

    def layer_groups(self, block: int, steps: int) -> dict[str, int]:
        """High-impact groups per linear of layer ``block`` after ``steps`` steps."""
        ks = {n: 0 for n in self.blocks[block]}
        for name, k in self.steps_seq[block][:steps]:
            ks[name] = k
        return ks

    def apply_steps(self, steps: list[int]) -> None:
        for i, s in enumerate(steps):
            for name, k in self.layer_groups(i, s).items():
                self.lins[name].k = k

    # ----- probes and the quadratic program -----
    def _order(self, name: str, diag_h: torch.Tensor) -> torch.Tensor:
        """Quantization order, the same for every k: the columns outside the linear's top ``kmax`` impact
        groups (act-order by diag H, or natural), then those groups from the ``kmax``-th down to the first.
        With k high groups, the last k·g columns are exactly the top k·g impact columns, and the columns
        before them are quantized identically for every k (the probes reuse that prefix)."""
        lin, g = self.lins[name], self.config.grid.group_size
        top = lin.impact_order[: lin.kmax * g]
        is_top = torch.zeros(lin.n, dtype=torch.bool)
        is_top[top] = True
        low = (torch.argsort(diag_h.cpu(), descending=True, stable=True) if self.config.gptq.act_order
               else torch.arange(lin.n))
        return torch.cat([low[~is_top[low]], top.view(-1, g).flip(0).reshape(-1)])

    def _group_bits(self, name: str, k: int) -> torch.Tensor:
        lin, g = self.lins[name], self.config.grid.group_size
        return torch.tensor([self.hcfg.b_lo] * (lin.n // g - k) + [self.hcfg.b_hi] * k, dtype=torch.uint8)

    def probe_weight(self, name: str, k: int) -> torch.Tensor:
        """The probe quantizer: GPTQ against the full-precision Hessian, without sequential propagation, so
        that results can be cached per (linear, k) and mixed freely. One GPTQ pass at b_lo (k = 0) per
        linear; for k > 0 its prefix is kept and only the last k groups are redone: the compensated latent
        columns (`latent_high_columns`) quantized by GPTQ at b_hi on their own Hessian block."""
        key = (name, k)
        if key in self._probe_cache:
            return self._probe_cache[key]
        lin, g = self.lins[name], self.config.grid.group_size
        if k > lin.kmax:
            raise FlexQuantError(f"{name}: {k} high-impact groups exceed the {lin.kmax} that r_max allows")
        W, H = self._fp[name], self._H[name]
        if (name, "perm") not in self._probe_cache:
            perm = self._order(name, torch.diag(H))
            r = gptq_quantize(W, H, self.config.grid, self.config.gptq, group_bits=self._group_bits(name, 0),
                              order=perm)
            self._probe_cache[(name, "perm")] = perm
            self._probe_cache[(name, "q0")] = r.dequantize(torch.float32)[:, perm]
            self._probe_cache[(name, "damp")] = r.stats["damp"]
        perm, Q0 = self._probe_cache[(name, "perm")], self._probe_cache[(name, "q0")]
        Qp = Q0
        if k:
            kc = k * g
            V = latent_high_columns(W, H, Q0[:, : lin.n - kc], perm, kc, self._probe_cache[(name, "damp")])
            if self.hcfg.b_hi == FP16_BITS:
                tail = V.half().float()
            else:
                Ht = H.float()[perm][:, perm][lin.n - kc:, lin.n - kc:]
                tail = gptq_quantize(V, Ht, self.config.grid, self.config.gptq,
                                     group_bits=torch.full((k,), self.hcfg.b_hi, dtype=torch.uint8),
                                     order=torch.arange(kc)).dequantize(torch.float32)
            Qp = torch.cat([Q0[:, : lin.n - kc], tail], 1)
        out = torch.empty_like(Qp)
        out[:, perm] = Qp
        self._probe_cache[key] = out.to(W.dtype)
        return self._probe_cache[key]

    def probe_weights(self, steps: list[int]) -> dict[str, torch.Tensor]:
        """Probe-quantizer weights of every linear for an allocation (steps per layer)."""
        return {n: self.probe_weight(n, k) for i, s in enumerate(steps) for n, k in self.layer_groups(i, s).items()}

    def _changes(self, steps: list[int], base: list[int], only: tuple[int, ...] | None = None) -> dict:
        """Probe weights of the linears whose k differs between allocation ``steps`` and ``base``."""
        out = {}
        for i in (range(len(steps)) if only is None else only):
            old = self.layer_groups(i, base[i])
            out.update({n: self.probe_weight(n, k) for n, k in self.layer_groups(i, steps[i]).items() if k != old[n]})
        return out

    def _probe_points(self, r_equal: float) -> tuple[list[int], list[int], list[int], int]:
        """Steps per layer of the centre and the two probe points, and which point the pairs use.

        "zero" (METHODS.md): centre r = 0, probes at δ and 2δ, pairs at δ. "equal": centre at the equal
        allocation, probes at c − δ and c + δ (central difference; two points above when c is at 0), pairs
        at c + δ. Realised in whole steps, within r_max."""
        h = self.hcfg
        delta = h.delta or r_equal
        cap = [t.steps_below(h.r_max) for t in self.tables]
        if h.center == "zero":
            base = [0] * len(self.tables)
            s1 = [max(1, min(t.steps_below(delta), c - 1)) for t, c in zip(self.tables, cap)]
            s2 = [max(a + 1, min(t.steps_below(2 * delta), c)) for a, t, c in zip(s1, self.tables, cap)]
            pair_point = 1
        else:
            base = round_to_steps(np.full(len(self.tables), r_equal), self.tables,
                                  self.facts.budget["ratio_budget_bits"], None, h.r_max)
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
        return base, s1, s2, pair_point

    def _qp_allocation(self, model, spec, calib_ids, device, cost, extra, upper, r_equal) -> list[int]:
        h = self.hcfg
        L = len(self.tables)
        ids = calib_ids[: min(h.probe_nsamples, calib_ids.shape[0]), : h.probe_seqlen]
        base, s1, s2, pair_point = self._probe_points(r_equal)
        sp = s1 if pair_point == 1 else s2
        ratio = lambda steps: np.array([t.ratio(s) for t, s in zip(self.tables, steps)])  # noqa: E731
        t0 = time.perf_counter()
        with ProbeEngine(model, spec, ids, device, self.config.batch_size) as eng:
            L0 = eng.set_base(self.probe_weights(base))
            moved = lambda pts, i: [pts[j] if j == i else base[j] for j in range(L)]  # noqa: E731
            L1 = np.array([eng.loss(self._changes(moved(s1, i), base, (i,)), i) for i in range(L)])
            L2 = np.array([eng.loss(self._changes(moved(s2, i), base, (i,)), i) for i in range(L)])
            pairs = {}
            for i in range(L):
                for j in range(i + 1, L if h.band == 0 else min(L, i + h.band + 1)):
                    both = [sp[k] if k in (i, j) else base[k] for k in range(L)]
                    pairs[(i, j)] = eng.loss(self._changes(both, base, (i, j)), i)
            curve = []
            if h.loss_model == "curve":
                raw, curve = self._curve_fit(eng, base, s1, s2, sp, L0, L1, L2, pairs, ratio)
            else:
                raw = fit_loss_model(L0, ratio(base), ratio(s1), L1, ratio(s2), L2, pairs, pair_point)
            joint = []
            if h.joint_probes:
                raw, joint = self._joint_fit(eng, raw, base, s1, s2, sp, L0, L1, L2, pairs, ratio)
            Qp, psd = project_psd(raw.Q)
            self.loss_model = LossModel(raw.a, Qp, L0, raw.center, curves=raw.curves)
            if raw.curves is not None:  # the curves span [0, r_max]: no trust region
                lower, hi = np.zeros(L), upper
            else:
                lower, hi = trust_bounds(ratio(base), ratio(s1), ratio(s2), upper, h.trust)
            sol = solve_ratio_qp(self.loss_model, cost, extra, hi, h.qp_backend, lower=lower)
            steps = round_to_steps(sol.r, self.tables, extra, self.loss_model, hi)
            diff = [i for i in range(L) if steps[i] != base[i]]
            measured = eng.loss(self._changes(steps, base), min(diff)) if diff else L0
            probe_cost = eng.cost()
        rounded = ratio(steps)
        probe_cost["total_seconds"] = time.perf_counter() - t0  # probe-quantizer GPTQ runs included
        self.facts.probe = {"center": h.center, "L0": L0, "center_ratios": ratio(base).tolist(),
                            "L1": L1.tolist(), "L2": L2.tolist(), "r1": ratio(s1).tolist(), "r2": ratio(s2).tolist(),
                            "delta": h.delta or r_equal, "pairs": {f"{i},{j}": v for (i, j), v in pairs.items()},
                            "band": h.band, "tokens": int(ids.numel()), "cost": probe_cost, "joint": joint,
                            "curve": curve, "fit": raw.facts}
        equal = round_to_steps(np.full(L, r_equal), self.tables, extra, None, h.r_max)
        self.facts.qp = {
            "loss_model": h.loss_model, "a": raw.a.tolist(), "Q": raw.Q.tolist(), "Q_psd": Qp.tolist(),
            "psd_projection": psd,
            "curves": None if raw.curves is None else [[x.tolist(), g.tolist()] for x, g in raw.curves],
            "cost_bits_per_ratio": cost.tolist(), "ratio_budget_bits": extra, "trust": h.trust,
            "lower": lower.tolist(), "upper": hi.tolist(),
            "solution": sol.r.tolist(), "objective": sol.objective, "backend": sol.backend,
            "budget_used": sol.budget_used, "max_violation": sol.max_violation, "iterations": sol.iterations,
            "rounded": rounded.tolist(), "rounded_bits": int(sum(int(t.bits[s]) for t, s in zip(self.tables, steps))),
            "predicted_kl": L0 + self.loss_model(rounded), "measured_probe_kl": measured,
            "predicted_kl_equal": L0 + self.loss_model(ratio(equal)),
        }
        log.info("hiratio probes: %d probes, %.0f s; QP (%s) predicted KL %.4f, measured %.4f",
                 probe_cost["probes"], probe_cost["total_seconds"], sol.backend,
                 self.facts.qp["predicted_kl"], measured)
        return steps

    def _curve_fit(self, eng, base, s1, s2, sp, L0, L1, L2, pairs, ratio):
        """Probe every layer alone at ``curve_points`` × r_max (whole steps; points already probed are reused)
        and fit the curve loss model (`fit_curve_model`) on them with the centre, the two probe points and the
        pairs."""
        h, r1, r2 = self.hcfg, ratio(s1), ratio(s2)
        singles = [[(r1[i], float(L1[i])), (r2[i], float(L2[i]))] for i in range(len(base))]
        measured = []
        for i, t in enumerate(tqdm(self.tables, desc="hiratio curve probes", leave=False, disable=None)):
            done = {base[i], s1[i], s2[i]}
            for f in h.curve_points:
                s = t.steps_below(f * h.r_max)
                if s in done:
                    continue
                done.add(s)
                steps = list(base)
                steps[i] = s
                loss = eng.loss(self._changes(steps, base, (i,)), i)
                singles[i].append((t.ratio(s), loss))
                measured.append({"layer": i, "ratio": t.ratio(s), "loss": loss})
        return fit_curve_model(L0, ratio(base), singles, ratio(sp), L2 if sp is s2 else L1, pairs), measured

    def _joint_fit(self, eng, raw, base, s1, s2, sp, L0, L1, L2, pairs, ratio):
        """Measure ``joint_probes`` random allocations (each layer at its centre or one of its probe points,
        seeded), check how the per-probe model ranks them, and refit a, Q over every probe by least squares."""
        h, L = self.hcfg, len(base)
        rng = np.random.default_rng(self.config.seed)
        levels = np.array([base, s1, s2])  # [3, L] steps
        joint, seen = [], set()
        for _ in range(100 * h.joint_probes):  # distinct draws that move at least two layers
            if len(joint) == h.joint_probes:
                break
            steps = [int(levels[k, i]) for i, k in enumerate(rng.integers(0, 3, L))]
            diff = [i for i in range(L) if steps[i] != base[i]]
            if len(diff) < min(2, L) or tuple(steps) in seen:
                continue
            seen.add(tuple(steps))
            loss = eng.loss(self._changes(steps, base), min(diff))
            joint.append({"ratios": ratio(steps).tolist(), "loss": loss,
                          "per_probe_prediction": L0 + raw(ratio(steps))})
        c = ratio(base)
        points = [(c, L0)]
        for i in range(L):
            for st, Li in ((s1, L1[i]), (s2, L2[i])):
                r = c.copy()
                r[i] = ratio(st)[i]
                points.append((r, float(Li)))
        for (i, j), Lij in pairs.items():
            r = c.copy()
            r[[i, j]] = ratio(sp)[[i, j]]
            points.append((r, Lij))
        points += [(np.array(p["ratios"]), p["loss"]) for p in joint]
        fit = fit_loss_model_lstsq(L0, c, points, h.band)
        fit.facts["per_probe_spearman_on_joint"] = spearman([p["per_probe_prediction"] for p in joint],
                                                            [p["loss"] for p in joint])
        return fit, joint

    def predicted_kl(self, steps: list[int]) -> float:
        """The loss model's KL for an allocation (steps per layer); needs the QP allocation's probes."""
        if self.loss_model is None:
            raise FlexQuantError("no loss model: run prepare() with allocation='qp' first")
        return self.loss_model.L0 + self.loss_model([t.ratio(s) for t, s in zip(self.tables, steps)])

    # ----- per linear: GPTQ at b_lo with the high-impact groups last -----
    def quantize_linear(self, ctx, name, W, H):
        full = f"{ctx.prefix}.{name}"
        lin, g = self.lins[full], self.config.grid.group_size
        r = gptq_quantize(W, H, self.config.grid, self.config.gptq, group_bits=self._group_bits(full, lin.k),
                          order=self._order(full, torch.diag(H)))
        if self.hcfg.learner in ("clip", "round") and lin.k and self.hcfg.b_hi != FP16_BITS:
            kc = lin.k * g
            Qp = r.dequantize(torch.float32)[:, r.perm]
            V = latent_high_columns(W, H, Qp[:, : lin.n - kc], r.perm, kc, r.stats["damp"])
            self._stash.append((name, r, V, Qp[:, : lin.n - kc]))
        return r

    # ----- after each block: the learnable b_hi quantizer on the block-output error -----
    @torch.no_grad()
    def after_block(self, ctx, out_q, out_fp):
        stash, self._stash = self._stash, []
        fp_in = self._fp_learn.pop(ctx.index, None)
        if not stash or self.hcfg.learn_steps == 0:
            return out_q
        h, g, block, dev = self.hcfg, self.config.grid.group_size, ctx.block, ctx.device
        kw = ctx.inputs.kwargs[0]
        X = torch.cat(slice_inputs(ctx.inputs, h.learn_nsamples)).to(dev)
        orig = {f"{n}.weight": self._fp[f"{ctx.prefix}.{n}"].to(dev) for n in self.spec.linears}
        # Target: the full-precision block on full-precision inputs (the FP stream, OmniQuant's target), so the
        # high-impact groups also absorb error accumulated upstream; inputs: the quantized stream.
        src = X if fp_in is None else torch.cat(fp_in).to(dev)
        T = torch.cat([_out(functional_call(block, orig, (src[i:i + 1],), kw)) for i in range(src.shape[0])])
        learners = []
        for name, r, V, Q_lo in stash:
            m, kc = V.shape
            lg = LearnableGroups(V.view(m, kc // g, g).to(dev), h.b_hi, h.learner,
                                 None if r.scale_base is None else r.scale_base.to(dev), r.sym)
            inv = torch.argsort(r.perm).to(dev)
            learners.append((name, r, lg, Q_lo.to(dev), inv))
        dtype = block.get_submodule(stash[0][0]).weight.dtype

        def weights():
            return {f"{n}.weight": torch.cat([Q_lo, lg.fake_quant().reshape(Q_lo.shape[0], -1)], 1)[:, inv].to(dtype)
                    for n, _, lg, Q_lo, inv in learners}

        def mse(ws, idx) -> torch.Tensor:
            return ((_out(functional_call(block, ws, (X[idx],), kw)) - T[idx]) ** 2).mean()

        chunks = [slice(i, i + h.learn_batch) for i in range(0, X.shape[0], h.learn_batch)]
        init = sum(float(mse({}, c)) for c in chunks) / len(chunks)
        params = [p for _, _, lg, _, _ in learners for p in lg.params]
        lr = h.learn_lr or (0.05 if h.learner == "clip" else 1.0 / max(1, h.learn_steps))
        opt = make_optimizer(h.learner, params, lr)
        frozen = [(p, p.requires_grad) for p in block.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        try:
            with torch.enable_grad():
                for step in range(h.learn_steps):
                    loss = mse(weights(), chunks[step % len(chunks)])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    for _, _, lg, _, _ in learners:
                        lg.clamp_()
        finally:
            for p, req in frozen:
                p.requires_grad_(req)
        learned = sum(float(mse(weights(), c)) for c in chunks) / len(chunks)
        ctx.notes["learn"] = {"learner": h.learner, "gptq_mse": init, "learned_mse": learned,
                              "kept": "learned" if learned < init else "gptq",
                              "linears": [n for n, *_ in stash]}
        if learned >= init:  # the GPTQ rounding of the high-impact groups stays
            return out_q
        for name, r, lg, _, _ in learners:
            codes, scales, zeros = lg.export()
            m, k, _ = codes.shape
            r.codes[:, -k * g:] = codes.reshape(m, -1).to(r.codes.device)
            r.scales[:, -k:] = scales.to(r.scales.device)
            if r.zeros is not None:
                r.zeros[:, -k:] = zeros.to(r.zeros.dtype).to(r.zeros.device)
            lin = block.get_submodule(name)
            lin.weight.data = r.dequantize(torch.float32).to(lin.weight.device, lin.weight.dtype)
        return run_block(block, ctx.inputs, dev)

    def summary(self) -> dict:
        cfg = dict(self.hcfg.__dict__)
        cfg["ratios"] = list(cfg["ratios"])
        return {"hiratio": {"config": cfg, **self.facts.__dict__}}


def _out(o):
    return o[0] if isinstance(o, (tuple, list)) else o


CLI_FLAGS = ("b_lo", "b_hi", "allocation", "impact", "learner", "r_max", "center", "delta", "band", "trust",
             "joint_probes", "loss_model", "curve_points", "ratios", "qp_backend", "stats_nsamples", "probe_nsamples",
             "probe_seqlen", "learn_nsamples", "learn_batch", "learn_steps", "learn_lr")


def add_cli_arguments(parser) -> None:
    """The hiratio flags, named like `HiRatioConfig` fields (``--bpw`` is shared with flexible)."""
    g = parser.add_argument_group("hiratio (layer-wise high-impact ratio) options; budget: --bpw")
    g.add_argument("--b-lo", type=int, help="bits of the low-impact columns, GPTQ (default 2)")
    g.add_argument("--b-hi", type=int, help="bits of the high-impact columns (default 4; 16 = fp16 retention)")
    g.add_argument("--allocation", choices=ALLOCATIONS, help="ratios by the quadratic program, or equal (default qp)")
    g.add_argument("--impact", choices=IMPACTS, help="column impact score (default salience)")
    g.add_argument("--learner", choices=HI_LEARNERS, help="quantizer of the high-impact columns (default clip)")
    g.add_argument("--r-max", type=float, help="upper bound of each layer's ratio (default 0.5)")
    g.add_argument("--center", choices=CENTERS, help="loss-model expansion point (default equal)")
    g.add_argument("--delta", type=float, help="probe step (default 0: the equal ratio)")
    g.add_argument("--band", type=int, help="inter-layer terms probed for |l-k| <= band; 0 = all pairs (default 2)")
    g.add_argument("--trust", type=float,
                   help="QP trust region: ratios within TRUST x the probed span around centre (default 0.5; 0 = off)")
    g.add_argument("--joint-probes", type=int,
                   help="random joint allocations probed to refit the loss model by least squares (default 0 = off)")
    g.add_argument("--loss-model", choices=LOSS_MODELS,
                   help="QP loss model: quadratic around the centre, or per-layer convex curves over [0, r_max] "
                        "+ pair couplings (default quadratic)")
    g.add_argument("--curve-points", type=float, nargs="+",
                   help="ratios (fractions of r_max) each layer is probed at for --loss-model curve")
    g.add_argument("--ratios", type=float, nargs="+", help="fixed per-layer ratios instead of the QP")
    g.add_argument("--qp-backend", choices=QP_BACKENDS, help="QP solver (default auto: OSQP if installed, else scipy)")
    g.add_argument("--stats-nsamples", type=int, help="windows of the full-precision statistics pass (32)")
    g.add_argument("--probe-nsamples", type=int, help="windows the probes measure KL on (8)")
    g.add_argument("--probe-seqlen", type=int, help="tokens per probe window (256)")
    g.add_argument("--learn-nsamples", type=int, help="windows the learnable quantizer trains on (8)")
    g.add_argument("--learn-batch", type=int, help="windows per training step (2)")
    g.add_argument("--learn-steps", type=int, help="training steps per block (40; 0 = no learning)")
    g.add_argument("--learn-lr", type=float, help="learning rate (0 = 0.05 for clip, 1/steps for round)")


def cli_options(args, options: dict) -> dict:
    """Method options from parsed flags: with ``--method hiratio``, ``--bpw`` and the hiratio flags
    (validated; other methods' flags are an error); else ``options`` unchanged (hiratio flags are an error)."""
    given = {k: getattr(args, k) for k in CLI_FLAGS if getattr(args, k, None) is not None}
    if args.method != "hiratio":
        if given:
            raise FlexQuantError(f"--{next(iter(given)).replace('_', '-')} applies to --method hiratio only")
        return options
    foreign = [k for k in options if k != "bpw"]
    if foreign:
        raise FlexQuantError(f"--{foreign[0].replace('_', '-')} applies to --method flexible only")
    given.update({k: v for k, v in options.items() if k == "bpw"})
    HiRatioConfig(**given)
    return given


register("hiratio")(HiRatio)
