"""FlexibleLLM (METHODS.md §1): DOSA (rotation + attribute-outlier protection), SBGBS (fractional
bit search), LFD (feedback against full-precision targets + dynamic denoising), each switchable."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..alloc import GroupTable, greedy_allocate, layer_fixed_bits
from ..config import QuantConfig
from ..errors import FlexQuantError
from ..pipeline import Method
from ..pipeline.capture import BlockInputs, capture_block_inputs
from ..pipeline.hooks import onload
from ..pipeline.prenorm import quantize_prenorm_block
from ..pipeline.sensitivity import output_fisher
from ..quant import gptq_quantize
from ..quant.gptq import column_order, inverse_cholesky_upper
from ..quant.grid import choose_qparams, dequantize, quantize
from ..transforms.rotate import incoherence, rotate_model
from .registry import register

log = logging.getLogger(__name__)
PROTECT = ("columns", "groups", "none")
SENSITIVITY = ("fisher", "none")
PROXIES = ("block", "gptq")
WIDE_BUDGET = 4.0  # bpw from which the default candidates reach above 4 bits
DOSA_BUDGETS = (1.0, WIDE_BUDGET)  # budgets where the rotation is on by default (measured at 2.5, 3.5, 4.25)


@dataclass(frozen=True)
class FlexibleConfig:
    """FlexibleLLM settings (``QuantConfig.options``)."""

    bpw: float = 2.5  # honest budget over all quantized linears (codes + all metadata)
    # Randomized Hadamard rotation of the residual stream and MLP intermediate. None = by budget: on for
    # DOSA_BUDGETS[0] <= bpw < DOSA_BUDGETS[1]. bench/results/flexible_final2.md (fisher_nsamples 16): 2.5 bpw
    # off 15.339 / on 15.096, 3.5 off 10.871 / on 10.770. Earlier (Fisher on 32 windows,
    # bench/results/flexible_ablation.md) it cost at
    # 2.5 bpw (16.63 -> 17.11 perplexity), helps at 3.5 (11.36 -> 11.12) and costs at 4.25 (10.18 -> 10.41),
    # where the candidates reach 8 bits and the bit search itself protects the outlier groups.
    dosa: bool | None = None
    protect: str = "groups"  # attribute outliers: "groups" orders columns by salience so SBGBS raises the
    #                          groups that hold them (b); "columns" keeps the top salient columns at
    #                          protect_bits, ordered last (a) (costs ~k/n bits: infeasible at 2.5 bpw, g=64)
    protect_groups: int = 1  # groups of salient columns kept per linear (option "columns")
    protect_bits: int = 4
    sbgbs: bool = True  # greedy fractional bit search; off: the highest uniform candidate that fits
    # Bit-widths SBGBS may choose; empty = by budget: (2, 3, 4) below WIDE_BUDGET bpw, else up to 8 bits
    # (a 4-bit ceiling would leave a 4.25-bpw budget unspent).
    candidates: tuple[int, ...] = ()
    lfd: bool = True
    # Weight of the GPTAQ-style correction toward full-precision targets; at 3.5 bpw (DOSA on, block proxy):
    # 0.1 -> 11.12, 0.25 -> 11.05, 0.5 -> 11.09 perplexity.
    feedback_alpha: float = 0.25
    # Denoising after each block: "bias" folds −mean(ε) into the block's last writer where the relative
    # noise ‖ε‖/‖h_fp‖ exceeds denoise_threshold; "off" only measures and reports the noise.
    denoise: str = "off"
    denoise_threshold: float = 0.05
    alloc_nsamples: int = 32  # calibration windows used by the allocation (error-ranking) pass
    # Weighting of the allocation's error tables: "fisher" weights each output row by the loss Fisher of
    # that output (comparable across layers); "none" uses the layer-local tr(ΔW H ΔWᵀ) of METHODS.md.
    sensitivity: str = "fisher"
    # Calibration windows of the Fisher backward pass (a prefix of the allocation windows, whole batches);
    # 0 = all alloc_nsamples. The Fisher only weights output rows; at 3.5 bpw 32 / 16 / 8 windows -> 10.783 /
    # 10.770 / 10.814 ppl, and the pass costs ~3 s per window on 2 cores (the speed bar: llm-compressor's time).
    fisher_nsamples: int = 16
    # SBGBS error proxy per group: "block" = tr(ΔW H_kk ΔWᵀ) of METHODS.md (the group's own Hessian block, no
    # compensation); "gptq" = Σ ΔW_ij² / U_jj², the cost GPTQ pays for each column after compensating the
    # earlier ones (U: upper Cholesky factor of H⁻¹ in quantization order). At 3.5 bpw (DOSA on): block 11.12,
    # gptq 10.90 perplexity (α 0.1); 11.05 / 10.78 (α 0.25).
    proxy: str = "gptq"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1.0 < self.bpw <= 16:
            raise FlexQuantError(f"bpw={self.bpw} must be in (1, 16]")
        if self.denoise not in ("bias", "off"):
            raise FlexQuantError(f"denoise={self.denoise!r} must be 'bias' or 'off'")
        if self.sensitivity not in SENSITIVITY:
            raise FlexQuantError(f"sensitivity={self.sensitivity!r} must be one of {SENSITIVITY}")
        if self.fisher_nsamples < 0:
            raise FlexQuantError(f"fisher_nsamples={self.fisher_nsamples} must be >= 0 (0 = alloc_nsamples)")
        if self.proxy not in PROXIES:
            raise FlexQuantError(f"proxy={self.proxy!r} must be one of {PROXIES}")
        if self.protect not in PROTECT:
            raise FlexQuantError(f"protect={self.protect!r} must be one of {PROTECT}")
        if self.dosa is None:
            object.__setattr__(self, "dosa", DOSA_BUDGETS[0] <= self.bpw < DOSA_BUDGETS[1])
        if not self.candidates:
            object.__setattr__(self, "candidates", (2, 3, 4) if self.bpw < WIDE_BUDGET else (2, 3, 4, 5, 6, 8))
        if sorted(self.candidates) != list(self.candidates) or \
                not all(1 <= b <= 8 for b in self.candidates):
            raise FlexQuantError(f"candidates={self.candidates} must be increasing bit-widths in 1..8")
        if self.protect_bits not in range(2, 9) and self.protect_bits != 16:
            raise FlexQuantError(f"protect_bits={self.protect_bits} must be 2..8 or 16")
        object.__setattr__(self, "candidates", tuple(self.candidates))

    @property
    def top_bits(self) -> int:
        """The widest quantized (not fp16) group this configuration can produce."""
        protect = (self.protect_bits,) if self.protect == "columns" and self.protect_bits < 16 else ()
        return max(self.candidates + protect)


@dataclass
class _Plan:
    order: torch.Tensor
    group_bits: torch.Tensor
    protected: int = 0  # protected columns (ordered last)


@dataclass
class _Facts:
    incoherence: dict = field(default_factory=dict)
    rotation: dict = field(default_factory=dict)
    protected: dict = field(default_factory=dict)
    allocation: dict = field(default_factory=dict)
    sensitivity: dict = field(default_factory=dict)  # mean output Fisher per matrix


def hinv_diagonal(H: torch.Tensor, damp: float) -> torch.Tensor:
    """diag((H + λI)⁻¹) = diag(UᵀU)."""
    U, _ = inverse_cholesky_upper(H, damp)
    return (U * U).sum(0)


def _salience(W: torch.Tensor, hinv_diag: torch.Tensor, bits: int, group_size: int,
              rows: torch.Tensor) -> torch.Tensor:
    """σ_j = Σ_i r_i (w_ij − Q(w_ij))² / [H⁻¹]_jj: the OBS cost of rounding each input column (rows
    weighted by their output sensitivity r)."""
    m, n = W.shape
    Wg = W.reshape(m, n // group_size, group_size)
    s, z = choose_qparams(Wg, bits)
    err = (Wg - dequantize(quantize(Wg, s, z, 2**bits - 1), s, z)).reshape(m, n)
    return (rows[:, None] * err**2).sum(0) / hinv_diag


def _error_table(W: torch.Tensor, H: torch.Tensor, order: torch.Tensor, g: int, candidates,
                 rows: torch.Tensor, proxy: str = "block", damp: float = 0.01) -> torch.Tensor:
    """E[k, c]: the error of group k (in ``order``) quantized by RTN at candidate c, output rows weighted by
    their sensitivity r. proxy "block": Σ_i r_i ΔW_ik H_kk ΔW_ikᵀ; "gptq": Σ_i Σ_(j∈k) r_i ΔW_ij² / U_jj²."""
    m, n = W.shape
    Wp, Hp = W[:, order], H[order][:, order]
    ng = n // g
    Wg = Wp.reshape(m, ng, g)
    if proxy == "gptq":
        U, _ = inverse_cholesky_upper(Hp.float(), damp)
        inv_d = (1 / torch.diag(U).float() ** 2).view(ng, g)  # GPTQ's cost per unit squared error
    else:
        Hkk = torch.stack([Hp[k * g:(k + 1) * g, k * g:(k + 1) * g] for k in range(ng)])  # [ng, g, g]
    out = torch.empty(ng, len(candidates))
    for c, b in enumerate(candidates):
        s, z = choose_qparams(Wg, b, clip="mse")
        dW = Wg - dequantize(quantize(Wg, s, z, 2**b - 1), s, z)  # [m, ng, g]
        if proxy == "gptq":
            out[:, c] = torch.einsum("m,mkg,kg->k", rows, dW**2, inv_d).cpu()
        else:
            out[:, c] = torch.einsum("m,mkg,kgh,mkh->k", rows, dW, Hkk, dW).cpu()
    return out


class FlexibleLLM(Method):
    name = "flexible"

    @classmethod
    def default_grid(cls, config) -> dict:
        """Compact metadata: 8-bit log-coded scales and, when no group can exceed 4 bits, 4-bit zeros
        (0.19 instead of 0.375 bpw at group 64)."""
        f = FlexibleConfig(**config.options)
        return {"scale_bits": 8, "zero_bits": 4 if f.top_bits <= 4 else 8}

    def __init__(self, config: QuantConfig):
        self.config = config
        self.fcfg = FlexibleConfig(**config.options)
        top = self.fcfg.top_bits
        if config.grid.zero_bits == 4 and top > 4:
            raise FlexQuantError(f"zero_bits=4 holds zero points of at most 4 bits, but {top}-bit groups are "
                                 "possible here; pass --zero-bits 8 or keep candidates/protect-bits <= 4")
        self.feedback_groups: tuple[str, ...] = ()
        self.plan: dict[str, _Plan] = {}
        self.spec_writer = "mlp.down_proj"  # the block's last residual writer (set from the spec)
        self.facts = _Facts()
        # LFD's full-precision stream: block inputs kept from the statistics pass over the allocation
        # subset of the calibration batches (the feedback term and the noise are measured there).
        self.provides_fp_stream = self.fcfg.lfd
        self._fp_inputs: dict[int, object] = {}
        self._fp_last: list[torch.Tensor] = []
        self._hinv: tuple = (None, None)  # (H, H⁻¹) of the last feedback group

    # ----- whole-model preparation: rotation, FP Hessians, protection, allocation -----
    @torch.no_grad()
    def prepare(self, model, spec, calib_ids, device) -> None:
        f = self.fcfg
        if f.lfd:
            # Feedback where the residual stream enters the block (the q/k/v and gate/up inputs): that is
            # where the quantized stream's accumulated noise shows; FP inputs come from the FP-stream pass.
            self.feedback_groups = tuple(g[0] for g in spec.linear_groups if g[0] in spec.residual_readers)
        self.spec_writer = spec.residual_writers[-1]
        layers = model.get_submodule(spec.layers)
        names = [f"{spec.layers}.{i}.{n}" for i in range(len(layers)) for n in spec.linears]
        if f.dosa:
            before = {n: incoherence(model.get_submodule(n).weight) for n in names}
            self.facts.rotation = rotate_model(model, spec, seed=f.seed)
            after = {n: incoherence(model.get_submodule(n).weight) for n in names}
            self.facts.incoherence = {n: {"before": before[n], "after": after[n]} for n in names}
        hessians, rows = self._fp_statistics(model, spec, calib_ids, device)
        if f.sensitivity != "none":
            self.facts.sensitivity = {n: float(r.mean()) for n, r in rows.items()}
        self._plan_all(model, spec, names, hessians, rows)

    def _fp_statistics(self, model, spec, calib_ids, device):
        """Input Hessians of every linear in the full-precision (rotated) model, in one pass, and the
        output sensitivity of every linear (Fisher, `sensitivity="fisher"`) from a backward pass."""
        layers = model.get_submodule(spec.layers)
        # A subset of the calibration windows is enough to rank the groups' errors; a whole number of
        # batches, so that its batches are the first batches of the block loop (LFD pairs them).
        bs = self.config.batch_size
        n = min(calib_ids.shape[0], max(bs, self.fcfg.alloc_nsamples // bs * bs))
        calib = calib_ids[:n]
        inputs = capture_block_inputs(model, spec, calib, device, bs)
        fisher = self.fcfg.sensitivity == "fisher"
        stored = []
        hessians: dict[str, torch.Tensor] = {}
        for i, block in enumerate(layers):
            with onload(block, device):
                def keep(group, H, D=None, i=i):
                    for n in group:
                        hessians[f"{spec.layers}.{i}.{n}"] = H.cpu()
                out = quantize_prenorm_block(block, spec, inputs, device, keep)
            if fisher or self.fcfg.lfd:
                stored.append(inputs)
            inputs = inputs.with_hidden(out)
        if fisher:
            nf = self.fcfg.fisher_nsamples or n
            nb = self._batches_covering(stored[0], nf)
            sub = [BlockInputs(s.hidden[:nb], s.kwargs[:nb]) for s in stored]
            rows = output_fisher(model, spec, sub, inputs.hidden[:nb], calib[: sum(h.shape[0] for h in sub[0].hidden)],
                                 device, progress=False)
        else:
            rows = {n: torch.ones(model.get_submodule(n).out_features) for n in hessians}
        if self.fcfg.lfd:
            self._fp_inputs = dict(enumerate(stored))
            self._fp_last = inputs.hidden  # the last block's FP outputs
        return hessians, rows

    @staticmethod
    def _batches_covering(inputs: BlockInputs, windows: int) -> int:
        """How many of the first stored batches hold at least ``windows`` windows (at least one batch)."""
        have = 0
        for count, h in enumerate(inputs.hidden, 1):
            have += h.shape[0]
            if have >= windows:
                return count
        return len(inputs.hidden)

    def fp_stream_inputs(self, index):
        return self._fp_inputs.pop(index)

    def fp_stream_outputs(self, index):
        """Block ``index``'s FP outputs = the next block's stored FP inputs (the statistics pass ran them)."""
        nxt = self._fp_inputs.get(index + 1)
        return nxt.hidden if nxt is not None else self._fp_last

    def _plan_all(self, model, spec, names, hessians, rows) -> None:
        f, g = self.fcfg, self.config.grid.group_size
        tables, fixed_total, weights = [], 0, 0
        orders, hinv = {}, {}
        for name in names:
            W = model.get_submodule(name).weight.data.float()
            H = hessians[name]
            m, n = W.shape
            if n % g:
                raise FlexQuantError(f"group_size={g} does not divide {n} ({name})")
            sal = None
            if f.protect != "none":
                if id(H) not in hinv:  # the linears of a group share their Hessian
                    hinv[id(H)] = hinv_diagonal(H, self.config.gptq.damp)
                sal = _salience(W, hinv[id(H)], f.candidates[0], g, rows[name])
            kept = torch.empty(0, dtype=torch.long)
            if f.protect == "groups":
                order = torch.argsort(sal, descending=True, stable=True)
            else:
                if f.protect == "columns":
                    kept = torch.argsort(sal, descending=True)[: f.protect_groups * g]
                order = column_order(torch.diag(H), self.config.gptq.act_order, kept)
                if order is None:
                    order = torch.arange(n)
            salient = kept if kept.numel() else (order[:g] if f.protect == "groups" else kept)
            if salient.numel():
                # attribute outliers: salient columns that are not magnitude outliers (top 1% column max)
                colmax = W.abs().amax(0)
                attribute = colmax[salient] < torch.quantile(colmax, 0.99)
                self.facts.protected[name] = {"mode": f.protect, "columns": int(salient.numel()),
                                              "attribute_outliers": int(attribute.sum())}
            orders[name] = (order, kept.numel())
            ng = n // g
            fixed = torch.zeros(ng, dtype=torch.bool)
            fixed[ng - kept.numel() // g:] = kept.numel() > 0
            tables.append(GroupTable(name, m, g, f.candidates,
                                     _error_table(W, H, order, g, f.candidates, rows[name], f.proxy,
                                                  self.config.gptq.damp), fixed, f.protect_bits))
            grid = self.config.grid
            fixed_total += layer_fixed_bits(m, n, g, grid.sym, True,
                                            name.endswith(tuple(spec.online_rotations)) and f.dosa,
                                            int(fixed.sum()) if f.protect_bits == 16 else 0,
                                            grid.scale_bits, grid.zero_bits)
            weights += m * n
        budget = int(f.bpw * weights) - fixed_total
        if f.sbgbs:
            bits, used = greedy_allocate(tables, budget)
        else:
            bits = None
            for b in reversed(f.candidates):
                uniform = [GroupTable(t.name, t.rows, g, (b,), t.errors[:, :1], t.fixed, t.fixed_bits)
                           for t in tables]
                try:
                    bits, used = greedy_allocate(uniform, budget)
                    break
                except FlexQuantError:
                    continue
            if bits is None:
                raise FlexQuantError(f"bpw={f.bpw} is below the cost of the lowest candidate bit-width")
        for name in names:
            order, nkept = orders[name]
            self.plan[name] = _Plan(order, bits[name], nkept)
            if name in self.facts.protected:  # bits the salient columns got (last group or first group)
                self.facts.protected[name]["bits"] = int(bits[name][-1 if nkept else 0])
        hist = torch.cat([b.float() for b in bits.values()])
        self.facts.allocation = {
            "target_bpw": f.bpw, "planned_bpw": (used + fixed_total) / weights,
            "histogram": {str(int(b)): int((hist == b).sum()) for b in hist.unique()},
            "per_matrix_bits": {n: float(b.float().mean()) for n, b in bits.items()},
        }
        log.info("SBGBS: planned %.4f bpw (target %.3f)", self.facts.allocation["planned_bpw"], f.bpw)

    # ----- per linear -----
    def quantize_linear(self, ctx, name, W, H):
        full = f"{ctx.prefix}.{name}"
        plan = self.plan[full]
        target = W.float()
        if self.fcfg.lfd and ctx.cross is not None and self.fcfg.feedback_alpha:
            # GPTAQ-style closed form: W* = W + α·W·D·H⁻¹ makes ‖W X_fp − Ŵ X_q‖ the GPTQ objective.
            if self._hinv[0] is not H:  # q/k/v (gate/up) share H: invert it once per group
                U, _ = inverse_cholesky_upper(H, self.config.gptq.damp)
                self._hinv = (H, U.T @ U)
            target = target + self.fcfg.feedback_alpha * (target @ ctx.cross) @ self._hinv[1]
        return gptq_quantize(target, H, self.config.grid, self.config.gptq, group_bits=plan.group_bits,
                             order=plan.order)

    # ----- dynamic denoising after each block -----
    @torch.no_grad()
    def after_block(self, ctx, out_q, out_fp):
        if not self.fcfg.lfd or out_fp is None:
            return out_q
        eps = torch.cat([(q - f).reshape(-1, q.shape[-1]) for q, f in zip(out_q, out_fp)])
        ref = torch.cat([f.reshape(-1, f.shape[-1]) for f in out_fp])
        before = float(eps.norm() / ref.norm())
        ctx.notes["noise_before"] = before
        ctx.notes["noise_after"] = before
        if self.fcfg.denoise == "off" or before <= self.fcfg.denoise_threshold:
            return out_q
        shift = eps.mean(0)  # the closed-form per-channel bias that minimises ‖ε − b‖²
        writer = ctx.block.get_submodule(self.spec_writer)
        bias = -shift.to(writer.weight.dtype).to(writer.weight.device)
        writer.bias = torch.nn.Parameter(bias if writer.bias is None else writer.bias + bias, requires_grad=False)
        out_q = [q - shift.to(q.dtype) for q in out_q]
        ctx.notes["noise_after"] = float((eps - shift).norm() / ref.norm())
        ctx.notes["denoised"] = True
        return out_q

    def summary(self) -> dict:
        return {"flexible": {"config": self.fcfg.__dict__, **self.facts.__dict__}}


register("flexible")(FlexibleLLM)
