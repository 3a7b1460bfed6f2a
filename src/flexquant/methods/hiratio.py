"""Layer-wise high-impact ratio optimisation (METHODS.md §2, after arXiv 2511.17801).

Each decoder layer l keeps a fraction r_l of its weights — its highest-impact input columns
(`quant.impact.column_impact`) — at a moderate bit-width b_hi and quantizes the rest at an extreme one b_lo.
The ratios are chosen jointly under one honest bit budget by a quadratic program whose loss model is fitted
from probe measurements of KL(full precision ‖ quantized) (`alloc.ratio_qp`). Then the hybrid quantization:
GPTQ at b_lo with the high-impact columns ordered last (they absorb its compensation), and a learnable
quantizer at b_hi for those columns, trained on the block-output error (`quant.learned.learn_tails`).
Packed in the foundation's format: a column permutation and per-group bits. docs/hiratio.md has the
measured tables behind the defaults.

After `plan`, ``ratio_plan`` (the step tables) and ``loss_model`` (None unless the QP ran) are public, and with
``keep_prober = True`` set before the run so is ``prober`` (the probe quantizer, which then keeps the weights and
Hessians it reads), for analysis of other allocations (bench/hiratio_bench.py).

Like every pass, the plan reads the blocks through the model's residency: a streamed model is never held
whole. The weights and Hessians the probes read and the weights they make are kept in the run's store (spilled
under ``--max-memory``); the learners' targets are the block's own full-precision weights, taken as it is
quantized.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.func import functional_call

from ..alloc.probe import ProbeQuantizer
from ..alloc.qp import LossModel, round_to_steps
from ..alloc.ratio import RatioGrid, RatioLinear, RatioPlan
from ..alloc.ratio_qp import RatioSearch
from ..errors import FlexQuantError
from ..models.stream import residency
from ..pipeline import Method, StatsRequest, run_block
from ..pipeline.statistics import first_windows
from ..pipeline.store import TensorMap
from ..quant import gptq_quantize
from ..quant.impact import column_impact, latent_high_columns
from ..quant.learned import HighTail, learn_tails
from ..quant.result import FP16_BITS
from .hiratio_config import HiRatioConfig
from .registry import register

log = logging.getLogger(__name__)
__all__ = ["HiRatio", "HiRatioConfig"]


@dataclass
class _Facts:
    budget: dict = field(default_factory=dict)
    probe: dict = field(default_factory=dict)
    qp: dict = field(default_factory=dict)
    allocation: dict = field(default_factory=dict)


@register
class HiRatio(Method):
    """Per-layer ratios of high-impact columns at a higher bit-width, chosen by a QP under the budget."""

    name = "hiratio"
    resumable = False  # learned per-block state (quantizers, runtime) is not replayed on resumption
    Config = HiRatioConfig

    @classmethod
    def grid_defaults(cls, options: HiRatioConfig) -> dict:
        """Compact metadata (8-bit log-coded scales, 4-bit zeros when no group exceeds 4 bits), as FlexibleLLM,
        which leaves more of the budget to the ratios."""
        return {"scale_bits": 8, "zero_bits": 4 if options.top_bits <= 4 else 8}

    def __init__(self, config):
        super().__init__(config)
        if config.grid.zero_bits == 4 and self.options.top_bits > 4:
            raise FlexQuantError(f"zero_bits=4 holds zero points of at most 4 bits, but b_hi={self.options.b_hi}; "
                                 "pass --zero-bits 8 or --b-hi 4")
        self.facts = _Facts()
        self.ratio_plan: RatioPlan | None = None
        self.prober: ProbeQuantizer | None = None
        self.keep_prober = False  # keep the prober's inputs after the plan (analysis: bench/hiratio_bench.py)
        self.loss_model: LossModel | None = None
        self._block_fp: dict[str, torch.Tensor] = {}  # the block's full-precision weights (the learners' targets)
        self._tails: list[HighTail] = []
        # the learned b_hi quantizers train in after_block on one rank's windows, from solves made on other ranks
        self.distributed = self.options.learner not in ("clip", "round")

    def prepare(self, model, spec) -> StatsRequest:
        h, layers = self.options, model.get_submodule(spec.layers)
        if spec.experts:
            raise FlexQuantError(f"hiratio does not handle mixture-of-experts blocks yet ({spec.family}); use "
                                 "--method gptq or flexible")
        residency(model, spec).hold_wide("hiratio's probes and learners compute on the block's float32 weights")
        if h.ratios and len(h.ratios) != len(layers):
            raise FlexQuantError(f"ratios has {len(h.ratios)} entries; the model has {len(layers)} layers")
        self.linears = spec.linears
        learn = h.learner in ("clip", "round")
        return StatsRequest(windows=h.stats_nsamples, fisher_windows=h.stats_nsamples,
                            keep_windows=h.learn_nsamples if learn else 0)

    # ----- the plan: impact order per linear, step tables, the budget, the allocation -----
    @torch.no_grad()
    def plan(self, model, spec, stats, calib_ids, device) -> None:
        h, grid = self.options, self.config.grid
        t0 = time.perf_counter()
        probing = self.keep_prober or not (h.ratios or h.allocation == "equal")
        store = stats.store
        fp = TensorMap(store, "hiratio-fp") if probing else None  # the probes' full-precision weights
        blocks, lins = self._impact_orders(model, spec, stats, fp)
        cap = [max([h.r_max] + ([h.ratios[i]] if h.ratios else [])) for i in range(len(blocks))]
        rgrid = RatioGrid(h.b_lo, h.b_hi, grid.group_size, grid.sym, grid.scale_bits, grid.zero_bits,
                          self.config.gptq.act_order)
        plan = self.ratio_plan = RatioPlan(blocks, lins, rgrid, cap)
        hessians = stats.hessians
        if self.keep_prober:  # its own references (the pipeline drops the statistics after the plan)
            hessians = TensorMap(store, "hiratio-H")
            for n in lins:
                hessians[n] = stats.hessians[n]
        self.prober = ProbeQuantizer(plan, {} if fp is None else fp, hessians, grid, self.config.gptq, store)
        N = sum(lin.m * lin.n for lin in lins.values())
        budget, base = int(h.bpw * N), plan.base_bits()
        extra = budget - base
        if extra < 0:
            raise FlexQuantError(f"bpw={h.bpw} is infeasible: b_lo={h.b_lo} with its metadata alone costs "
                                 f"{base / N:.4f} bpw here; raise --bpw or lower --b-lo")
        tables = plan.tables
        cost = np.array([t.bits[-1] / t.weights[-1] * t.total for t in tables], np.float64)
        upper = np.array([min(h.r_max, t.ratio(len(t.weights) - 1)) for t in tables])
        r_equal = float(min(1.0, extra / cost.sum()))
        self.facts.budget = {"target_bpw": h.bpw, "weights": N, "budget_bits": budget, "low_bits": base,
                             "low_bpw": base / N, "ratio_budget_bits": extra, "equal_ratio": r_equal,
                             "stats_seconds": stats.seconds + time.perf_counter() - t0}
        if h.ratios:
            steps = [t.steps_below(r) for t, r in zip(tables, h.ratios)]
            if plan.bits(steps) > extra:
                raise FlexQuantError(f"the fixed ratios need more than the bpw={h.bpw} budget; lower them")
        elif h.allocation == "equal":
            steps = round_to_steps(np.full(len(tables), r_equal), tables, extra, None, h.r_max)
        else:
            qp = RatioSearch(plan, self.prober, h, self.config.seed).run(
                model, spec, calib_ids, device, self.config.batch_size, cost, extra, upper, r_equal, store)
            steps, self.loss_model, self.facts.probe, self.facts.qp = qp.steps, qp.loss_model, qp.probe, qp.qp
        self._apply(steps, base, N)
        self.prober.clear()
        if not self.keep_prober and fp is not None:
            fp.clear()

    def _impact_orders(self, model, spec, stats, fp: TensorMap | None):
        """Per block (read through the residency, one at a time): each linear's impact order and group gains;
        ``fp`` (when given) keeps the full-precision weights for the probes. (blocks' linear paths, lins)"""
        res, n_layers = residency(model, spec), len(model.get_submodule(spec.layers))
        blocks = [[f"{spec.layers}.{i}.{n}" for n in spec.linears] for i in range(n_layers)]
        lins = {}
        for i, names in enumerate(blocks):
            with res.block(i, "cpu") as blk:
                for full, n in zip(names, spec.linears):
                    W = blk.get_submodule(n).weight.data
                    if fp is not None:  # (a streamed block's own tensor goes with it: a 16-bit copy if exact)
                        fp[full] = _exact_half(W) if res.streamed else W
                    lins[full] = self._linear(i, full, W, stats.hessians[full], stats.fisher[full])
        return blocks, lins

    def _linear(self, block: int, name: str, W: torch.Tensor, H: torch.Tensor, rows: torch.Tensor) -> RatioLinear:
        h, g = self.options, self.config.grid.group_size
        W = W.float()
        m, n = W.shape
        imp = column_impact(W, H, rows, h.b_lo, g, self.config.gptq.damp, h.impact, self.config.gptq.factor_dtype)
        order = torch.argsort(imp, descending=True, stable=True)
        shrink = 1.0 if h.b_hi == FP16_BITS else 1 - 4.0 ** (h.b_lo - h.b_hi)  # error left at b_hi
        gain = (imp[order].reshape(n // g, g).sum(1) * shrink).double().numpy()
        return RatioLinear(name, block, m, n, order, gain)

    def _apply(self, steps: list[int], base: int, N: int) -> None:
        h, plan = self.options, self.ratio_plan
        plan.apply(steps)
        used, ratios = plan.bits(steps), plan.ratios(steps).tolist()
        self.facts.allocation = {
            "mode": "fixed" if h.ratios else h.allocation, "ratios": ratios, "steps": steps,
            "planned_bits": base + used, "planned_bpw": (base + used) / N,
            "per_matrix_high_groups": {n: lin.k for n, lin in plan.lins.items()},
        }
        if self.loss_model is not None:
            self.facts.allocation["predicted_kl"] = self.loss_model.L0 + self.loss_model(ratios)
        log.info("hiratio: planned %.4f bpw (target %.3f); ratios %s", (base + used) / N, h.bpw,
                 " ".join(f"{r:.3f}" for r in ratios))

    # ----- per linear: GPTQ at b_lo with the high-impact groups last -----
    def quantize_linear(self, ctx, name, W, H):
        full, plan = f"{ctx.prefix}.{name}", self.ratio_plan
        lin, g = plan.lins[full], self.config.grid.group_size
        r = gptq_quantize(W, H, self.config.grid, self.config.gptq, group_bits=plan.group_bits(full, lin.k),
                          order=plan.order(full, torch.diag(H)))
        if self.options.learner in ("clip", "round"):
            self._block_fp[name] = W  # (W itself: the write-back puts a new tensor in the linear)
        if self.options.learner in ("clip", "round") and lin.k and self.options.b_hi != FP16_BITS:
            kc = lin.k * g
            Qp = r.dequantize(torch.float32)[:, r.perm]
            V = latent_high_columns(W, H, Qp[:, : lin.n - kc], r.perm, kc, r.stats["damp"])
            self._tails.append(HighTail(name, r, V, Qp[:, : lin.n - kc]))
        return r

    # ----- after each block: the learnable b_hi quantizer on the block-output error -----
    @torch.no_grad()
    def after_block(self, ctx, out_q, out_fp):
        tails, self._tails = self._tails, []
        fp, self._block_fp = self._block_fp, {}
        h, block, dev = self.options, ctx.block, ctx.device
        if not tails or h.learn_steps == 0:
            return out_q
        kw = ctx.inputs.kwargs[0]
        X = torch.cat(first_windows(ctx.inputs, h.learn_nsamples).hidden).to(dev)
        orig = {f"{n}.weight": fp[n].to(dev) for n in self.linears}
        # Target: the full-precision block on full-precision inputs (OmniQuant's target), so the high-impact
        # groups also absorb error accumulated upstream; inputs: the quantized stream.
        src = X if ctx.fp_inputs is None else torch.cat(list(ctx.fp_inputs.hidden)).to(dev)
        T = torch.cat([_out(functional_call(block, orig, (src[i:i + 1],), kw)) for i in range(src.shape[0])])
        lr = h.learn_lr or (0.05 if h.learner == "clip" else 1.0 / max(1, h.learn_steps))
        ctx.notes["learn"] = learn_tails(block, tails, X, T, kw, h.b_hi, h.learner, h.learn_steps, h.learn_batch, lr)
        if ctx.notes["learn"]["kept"] == "gptq":  # the GPTQ rounding of the high-impact groups stays
            return out_q
        for t in tails:
            lin = block.get_submodule(t.name)
            lin.weight.data = t.result.dequantize(torch.float32).to(lin.weight.device, lin.weight.dtype)
        return run_block(block, ctx.inputs, dev)

    def summary(self) -> dict:
        return {"hiratio": {"config": asdict(self.options), **asdict(self.facts)}}


def _exact_half(W: torch.Tensor) -> torch.Tensor:
    """W in float16 or bfloat16 where that keeps every value (weights read from 16-bit files), else W."""
    for dtype in (torch.float16, torch.bfloat16):
        half = W.to(dtype)
        if torch.equal(half.float(), W):
            return half
    return W


def _out(o):
    return o[0] if isinstance(o, (tuple, list)) else o
