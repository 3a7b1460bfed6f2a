"""FlexibleLLM (METHODS.md §1): DOSA (rotation + attribute-outlier protection), SBGBS (fractional bit search),
LFD (feedback against full-precision targets + dynamic denoising), each switchable. docs/flexible.md has the
measured tables behind the defaults."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace

import torch

from ..alloc import GroupTable, Layout, error_table, fixed_bits, greedy_allocate
from ..alloc.greedy import tie_tables, untie
from ..errors import FlexQuantError
from ..models.stream import residency
from ..pipeline import Method, StatsRequest
from ..pipeline.sensitivity import block_probe_kl
from ..quant import gptq_quantize
from ..quant.gptq import column_order, inverse_cholesky_upper
from ..quant.impact import hinv_diagonal, salience
from ..quant.targets import TARGETS, get_target
from ..transforms.rotate import incoherence, rotate_inputs_online, rotate_model
from .flexible_config import FlexibleConfig, refuse
from .registry import register

log = logging.getLogger(__name__)


@dataclass
class _Plan:
    order: torch.Tensor | None
    group_bits: torch.Tensor
    protected: int = 0  # protected columns (ordered last)
    group_size: int | None = None  # chosen per linear (a per-layer target's options); None: the grid's


@dataclass
class _Entry:
    """One linear's part of the plan, built from its Hessian (which is not kept)."""
    table: GroupTable
    order: torch.Tensor
    nkept: int
    shape: tuple[int, int]
    fixed: int  # bits stored whatever the widths (metadata; fp16 protected columns)
    predicted: torch.Tensor | None  # --probe: the predicted cost at the probe width


@dataclass
class _Facts:
    incoherence: dict = field(default_factory=dict)
    rotation: dict = field(default_factory=dict)
    protected: dict = field(default_factory=dict)
    allocation: dict = field(default_factory=dict)
    sensitivity: dict = field(default_factory=dict)  # mean output Fisher per matrix
    probes: dict = field(default_factory=dict)  # --probe: unit, width, predicted and measured KL per probe


@register
class FlexibleLLM(Method):
    """FlexibleLLM: Hadamard rotation + outlier protection, fractional bit search, feedback (weight-only)."""

    name = "flexible"
    Config = FlexibleConfig
    targets = ("flexquant", "vllm", "gptqmodel", "gguf")
    uses_grid_bits = False  # SBGBS chooses the widths (inside the target's)

    @classmethod
    def grid_defaults(cls, options: FlexibleConfig) -> dict:
        """Compact metadata: 8-bit log-coded scales and, when no group can exceed 4 bits, 4-bit zeros."""
        return {"scale_bits": 8, "zero_bits": 4 if options.top_bits <= 4 else 8}

    def __init__(self, config):
        super().__init__(config)
        top = self.options.top_bits
        if config.grid.zero_bits == 4 and top > 4:
            raise FlexQuantError(f"zero_bits=4 holds zero points of at most 4 bits, but {top}-bit groups are "
                                 "possible here; pass --zero-bits 8 or keep candidates/protect-bits <= 4")
        self.target = get_target(config.target)
        self.candidates = self.target.candidates(self.options.candidates)
        self.protect = self.options.protect
        if self.options.group_sizes and not self.target.per_layer:
            per_layer = ", ".join(t.name for t in TARGETS.values() if t.per_layer)
            raise FlexQuantError("--group-sizes chooses one group size per linear, which only a --target of one "
                                 f"width per linear ({per_layer}) uses; drop it or pass --target")
        if self.target.group_size and set(self.options.group_sizes) - {self.target.group_size}:
            raise FlexQuantError(f"--target {self.target.name} stores groups of {self.target.group_size} only "
                                 f"({self.target.note}); drop --group-sizes")
        self.layer_options: dict[str, list[tuple[int, int]]] = {}  # per-layer target: (width, group size) options
        if self.target.per_layer and self.protect != "none":
            # salience-ordered groups need per-group widths and a stored permutation; kept columns mixed widths
            log.info("--target %s: outlier protection off (one width per linear)", self.target.name)
            self.protect = "none"
        self.plan_: dict[str, _Plan] = {}
        self.online: dict = {}  # online input rotations by linear path (DOSA's down_proj)
        self.spec_writer = "mlp.down_proj"  # the block's last residual writer (set from the spec)
        self.facts = _Facts()
        self._hinv: tuple = (None, None)  # (H, H⁻¹) of the last feedback group
        self._entries: dict[str, _Entry] = {}  # plan entries built in the statistics pass

    # ----- whole-model preparation: rotation, then what the statistics pass must give -----
    @torch.no_grad()
    def prepare(self, model, spec) -> StatsRequest:
        f, bs = self.options, self.config.batch_size
        refuse(f, spec)
        if f.lfd:
            # Feedback where the residual stream enters the block (the q/k/v and gate/up inputs): that is
            # where the quantized stream's accumulated noise shows.
            self.feedback_groups = tuple(g[0] for g in spec.linear_groups if g[0] in spec.residual_readers)
        self.spec_writer = spec.residual_writers[-1] if spec.residual_writers else None  # (used by LFD only)
        self.layers_path, self._spec = spec.layers, spec
        online_only = f.dosa_rotation == "online" or (f.dosa_rotation == "auto" and not spec.rotatable)
        if f.dosa and online_only and not self.target.online_rotation:
            log.warning("--target %s cannot express online rotations and %s's residual stream cannot be rotated: "
                        "DOSA's rotation is off", self.target.name, spec.family)
        elif f.dosa:
            res, inc = residency(model, spec), {}

            def observe(stage):  # incoherence of each linear the first time its block is seen (before/after)
                def fn(i, block):
                    for n in spec.linears_in(block):
                        inc.setdefault(f"{spec.layers}.{i}.{n}", {}).setdefault(
                            stage, incoherence(block.get_submodule(n).weight))
                return fn

            res.transform_blocks(observe("before"))
            if online_only:
                rotated = rotate_inputs_online(model, spec, seed=f.rotation_seed)
            else:
                rotated = rotate_model(model, spec, seed=f.rotation_seed, online=self.target.online_rotation)
            res.transform_blocks(observe("after"))
            self.facts.rotation, self.online, self.facts.incoherence = rotated.facts, rotated.online, inc
        # A whole number of batches, so that the kept FP inputs are the first batches of the block loop.
        windows = max(bs, f.alloc_nsamples // bs * bs)
        # Without probes the plan needs each Hessian only for its linear's error table: built in the pass, block
        # by block, so the Hessians are never all held (the probes quantize with them: they keep them).
        self._entries = {}
        return StatsRequest(windows=windows,
                            fisher_windows=(f.fisher_nsamples or windows) if f.sensitivity == "fisher" else 0,
                            keep_windows=windows if f.lfd else 0,
                            on_hessians=self._block_entries if f.probe == "off" else None)

    @staticmethod
    def _weights(model, spec):
        """(path, float32 weight) of every linear, one block resident at a time."""
        res = residency(model, spec)
        for i in range(len(model.get_submodule(spec.layers))):
            with res.block(i, "cpu") as block:
                for n in spec.linears_in(block):
                    yield f"{spec.layers}.{i}.{n}", block.get_submodule(n).weight.data.float()

    @staticmethod
    def _names(model, spec) -> list[str]:
        layers = model.get_submodule(spec.layers)
        return [f"{spec.layers}.{i}.{n}" for i in range(len(layers)) for n in spec.linears_in(layers[i])]

    # ----- allocation: salience order, error tables, the greedy search under the exact budget -----
    def _rows(self, fisher: dict, name: str, out_features: int) -> torch.Tensor:
        """The allocation's weights of one linear's output rows: its Fisher (to --fisher-power), or ones."""
        f = self.options
        if f.sensitivity != "fisher":
            return torch.ones(out_features)
        return fisher[name] if f.fisher_power == 1 else fisher[name].pow(f.fisher_power)

    def _entry(self, name: str, W: torch.Tensor, H: torch.Tensor, fisher: dict, hinv: dict) -> _Entry:
        """What the plan keeps of one linear: its error table, quantization order and the fixed bits it stores."""
        f, grid = self.options, self.config.grid
        rows = self._rows(fisher, name, W.shape[0])
        table, order, nkept = self._linear_table(name, W, H, rows, hinv)
        predicted = table.errors[:, table.candidates.index(self._probe_width)].sum() if f.probe != "off" else None
        if self.target.per_layer:
            table = self._layer_table(name, W, H, rows, order, table)
        rot = self.online.get(name)
        factor = 0 if rot is None or bool((rot.factor.abs() == 1).all()) else rot.factor.shape[0]
        layout = Layout(*W.shape, grid.group_size, grid.sym, grid.scale_bits, grid.zero_bits, True, rot is not None,
                        factor)
        fixed = fixed_bits(layout, int(table.fixed.sum()) if f.protect_bits == 16 else 0)
        return _Entry(table, order, nkept, tuple(W.shape), fixed, predicted)

    def _block_entries(self, i: int, block, hessians: dict, fisher: dict) -> None:
        """The statistics pass's ``on_hessians``: block ``i``'s plan entries, from its Hessians and weights."""
        hinv = {}
        for n in self._spec.linears_in(block):
            name = f"{self.layers_path}.{i}.{n}"
            self._entries[name] = self._entry(name, block.get_submodule(n).weight.data.float(), hessians[name],
                                              fisher, hinv)

    @torch.no_grad()
    def plan(self, model, spec, stats, calib_ids, device) -> None:
        f, g = self.options, self.config.grid.group_size
        if f.sensitivity == "fisher":
            self.facts.sensitivity = {n: float(r.mean()) for n, r in stats.fisher.items()}
        names = self._names(model, spec)
        entries, hinv = self._entries, {}
        if not entries:  # the Hessians were kept (probes): the tables from them, one block resident at a time
            entries = {name: self._entry(name, W, stats.hessians[name], stats.fisher, hinv)
                       for name, W in self._weights(model, spec)}
        self._entries = {}
        tables = [entries[n].table for n in names]
        orders = {n: (entries[n].order, entries[n].nkept) for n in names}
        shapes = {n: entries[n].shape for n in names}
        predicted = {n: entries[n].predicted for n in names}
        fixed_total = sum(entries[n].fixed for n in names)
        weights = sum(s[0] * s[1] for s in shapes.values())
        if f.probe != "off":
            self._calibrate(model, spec, stats, calib_ids, device, orders, predicted, tables)
        if self.target.per_layer:  # each table's options cost what the target's files store, whole
            fixed_total = 0
            least = sum(t.cost(0) for t in tables) / weights
            if least > f.bpw:
                raise FlexQuantError(f"--bpw {f.bpw} is below what --target {self.target.name} stores at its lowest "
                                     f"width ({self.candidates[0]} bits, float16 scales, group "
                                     f"{max(f.group_sizes or (g,))}): {least:.3f} bpw; raise --bpw, or pass a "
                                     "larger --group-size")
        tables, tied = self._tie_experts(tables, spec)
        bits, used = self._allocate(tables, int(f.bpw * weights) - fixed_total)
        bits = untie(bits, tied)
        sizes = {}
        if self.target.per_layer:  # option index -> one width (and group size) for every group of the linear
            for n, b in bits.items():
                width, sizes[n] = self.layer_options[n][int(b[0])]
                bits[n] = torch.full((shapes[n][1] // sizes[n],), width, dtype=torch.uint8)
        for name in names:
            order, nkept = orders[name]
            if self.target.per_layer and torch.equal(order, torch.arange(order.numel())):
                order = None  # no permutation stored (a target without g_idx has none)
            self.plan_[name] = _Plan(order, bits[name], nkept, sizes.get(name))
            if name in self.facts.protected:  # bits the salient columns got (last group or first group)
                self.facts.protected[name]["bits"] = int(bits[name][-1 if nkept else 0])
        hist = torch.cat([b.float() for b in bits.values()])
        self.facts.allocation = {
            "target_bpw": f.bpw, "planned_bpw": (used + fixed_total) / weights, "target": self.target.name,
            "counted_as": self.target.format or "flexquant checkpoint",
            "histogram": {str(int(b)): int((hist == b).sum()) for b in hist.unique()},
            "per_matrix_bits": {n: float(b.float().mean()) for n, b in bits.items()},
        }
        if sizes:
            self.facts.allocation["per_matrix_group_size"] = sizes
        log.info("SBGBS: planned %.4f bpw (target %.3f)", self.facts.allocation["planned_bpw"], f.bpw)

    @property
    def _probe_width(self) -> int:
        """The width the block probes quantize at: the widest candidate within the budget."""
        return max([c for c in self.candidates if c <= self.options.bpw] or self.candidates[:1])

    def _calibrate(self, model, spec, stats, calib_ids, device, orders, predicted, tables) -> None:
        """``--probe block|linear``: scale the error tables of every block (or linear) by the measured / predicted
        KL of that block (linear) alone at the probe width (GPTQ in the planned order, float inputs), so the
        search trades them by what they really cost (the output-Fisher prediction is second order)."""
        f, w = self.options, self._probe_width
        ids = calib_ids[: f.probe_nsamples, : f.probe_seqlen]
        grid = replace(self.config.grid, bits=w)
        gptq = replace(self.config.gptq, act_order=False)
        units: list[list[str]] = []  # full linear names of each probe, in probe order

        def replaced(i, block):
            new = {}
            for n in spec.linears_in(block):
                full, W = f"{spec.layers}.{i}.{n}", block.get_submodule(n).weight.data.float()
                bits = torch.full((W.shape[1] // grid.group_size,), w, dtype=torch.uint8)
                new[n] = gptq_quantize(W, stats.hessians[full], grid, gptq, group_bits=bits,
                                       order=orders[full][0]).dequantize()
            changes = [new] if f.probe == "block" else [{n: v} for n, v in new.items()]
            units.extend([f"{spec.layers}.{i}.{n}" for n in c] for c in changes)
            return changes

        kl = [k for per_block in block_probe_kl(model, spec, ids, device, replaced, self.config.batch_size,
                                                progress=False) for k in per_block]
        pred = [float(sum(predicted[n] for n in names)) for names in units]
        factor = [max(k, 1e-12) / max(p, 1e-30) for k, p in zip(kl, pred)]
        mean = float(torch.tensor(factor).log().mean().exp())  # only ratios between probes matter to the search
        scale = {n: factor[j] / mean for j, names in enumerate(units) for n in names}
        for t in tables:
            t.errors.mul_(scale[t.name])
        self.facts.probes = {"unit": f.probe, "width": w, "windows": int(ids.shape[0]), "tokens": int(ids.numel()),
                             "measured_kl": kl, "predicted": pred, "scale": [x / mean for x in factor]}
        log.info("%s probes at %d bits: measured/predicted spans %.3g … %.3g (geometric mean 1)", f.probe, w,
                 min(factor) / mean, max(factor) / mean)

    def _linear_table(self, name, W, H, rows, hinv) -> tuple[GroupTable, torch.Tensor, int]:
        """One linear's quantization order (salience or act-order, protected columns last) and error table."""
        f, g = self.options, self.config.grid.group_size
        m, n = W.shape
        if n % g:
            raise FlexQuantError(f"group_size={g} does not divide {n} ({name})")
        sal = None
        if self.protect != "none":
            if hinv.get("of") is not H:  # the linears of a group share their Hessian (the last one is kept)
                hinv["of"], hinv["diag"] = H, hinv_diagonal(H, self.config.gptq.damp, self.config.gptq.factor_dtype)
            sal = salience(W, hinv["diag"], self.candidates[0], g, rows)
        kept = torch.empty(0, dtype=torch.long)
        if self.protect == "groups":
            order = torch.argsort(sal, descending=True, stable=True)
        else:
            if self.protect == "columns":
                kept = torch.argsort(sal, descending=True)[: f.protect_groups * g]
            rel = name[len(self.layers_path) + 1:].partition(".")[2]  # block-relative
            order = column_order(torch.diag(H), self.act_order_for(rel) and name not in self.online, kept)
            if order is None:
                order = torch.arange(n)
        salient = kept if kept.numel() else (order[:g] if self.protect == "groups" else kept)
        if salient.numel():
            # attribute outliers: salient columns that are not magnitude outliers (top 1% column max)
            colmax = W.abs().amax(0)
            attribute = colmax[salient] < torch.quantile(colmax, 0.99)
            self.facts.protected[name] = {"mode": self.protect, "columns": int(salient.numel()),
                                          "attribute_outliers": int(attribute.sum())}
        ng = n // g
        fixed = torch.zeros(ng, dtype=torch.bool)
        fixed[ng - kept.numel() // g:] = kept.numel() > 0
        errors = error_table(W, H, order, g, self.candidates, rows, f.proxy, self.config.gptq.damp,
                             self.config.gptq.factor_dtype)
        return GroupTable(name, m, g, self.candidates, errors, fixed, f.protect_bits), order, kept.numel()

    def _layer_table(self, name, W, H, rows, order, table: GroupTable) -> GroupTable:
        """Per-layer SBGBS for a target with one width per linear: the linear is one block whose options are
        (width, group size) pairs; an option's error is the sum of its groups' errors and its cost every bit the
        target's files store for the linear (metadata included). Options are sorted by cost."""
        g0, sym = self.config.grid.group_size, self.config.grid.sym
        m, n = W.shape
        opts = self.target.layer_options(n, self.candidates, (g0,) + self.options.group_sizes)
        errs, costs = [], []
        tables = {g0: dict(zip(self.candidates, table.errors.T))}
        for g in dict.fromkeys(g for _, g in opts):
            widths = tuple(b for b, h in opts if h == g and b not in tables.get(g, {}))
            if widths:
                E = error_table(W, H, order, g, widths, rows, self.options.proxy, self.config.gptq.damp,
                                    self.config.gptq.factor_dtype)
                tables.setdefault(g, {}).update(zip(widths, E.T))
        for b, g in opts:
            errs.append(float(tables[g][b].sum()))
            costs.append(self.target.stored_bits(m, n, g, sym, b))
        idx = sorted(range(len(opts)), key=lambda i: (costs[i], errs[i]))
        self.layer_options[name] = [opts[i] for i in idx]
        return GroupTable(name, 1, 1, tuple(range(len(idx))), torch.tensor([[errs[i] for i in idx]]),
                          torch.zeros(1, dtype=torch.bool), costs=tuple(costs[i] for i in idx))

    def _tie_experts(self, tables: list[GroupTable], spec):
        """A target whose loaders read one config group for all routed experts gets one table for them."""
        if not (self.target.per_layer and self.target.shared_experts and spec.experts):
            return tables, {}
        key = "routed experts"
        tables, tied = tie_tables(tables, lambda n: key if f".{spec.experts}." in n else None)
        if tied:
            if len({tuple(self.layer_options[n]) for n in tied[key]}) > 1:
                raise FlexQuantError(f"--target {self.target.name} stores all experts at one width and group size, "
                                     "but their linears allow different group sizes; drop --group-sizes")
            self.layer_options[key] = self.layer_options[tied[key][0]]
        return tables, tied

    def _allocate(self, tables: list[GroupTable], budget: int):
        """SBGBS over every group of the model, or (``sbgbs`` off) the highest uniform candidate that fits."""
        f = self.options
        if f.sbgbs:
            return greedy_allocate(tables, budget)
        for b in reversed(self.candidates):
            uniform = [self._only(t, b) for t in tables]
            try:
                return greedy_allocate(uniform, budget)
            except FlexQuantError:
                continue
        raise FlexQuantError(f"bpw={f.bpw} is below the cost of the lowest candidate bit-width")

    def _only(self, t: GroupTable, b: int) -> GroupTable:
        """``t`` reduced to width ``b`` (at the grid's group size for a per-layer table)."""
        if t.costs is None:
            return GroupTable(t.name, t.rows, t.group_size, (b,), t.errors[:, :1], t.fixed, t.fixed_bits)
        k = self.layer_options[t.name].index((b, self.config.grid.group_size))
        return GroupTable(t.name, 1, 1, (k,), t.errors[:, k:k + 1], t.fixed, costs=(t.costs[k],))

    # ----- per linear -----
    def quantize_linear(self, ctx, name, W, H):
        full = f"{ctx.prefix}.{name}"
        plan = self.plan_[full]
        target = W.float()
        if self.options.lfd and ctx.cross is not None and self.options.feedback_alpha:
            # GPTAQ-style closed form: W* = W + α·W·D·H⁻¹ makes ‖W X_fp − Ŵ X_q‖ the GPTQ objective.
            if self._hinv[0] is not H:  # q/k/v (gate/up) share H: invert it once per group
                U, _ = inverse_cholesky_upper(H, self.config.gptq.damp)
                self._hinv = (H, U.T @ U)
            target = target + self.options.feedback_alpha * (target @ ctx.cross) @ self._hinv[1]
        gptq = self.config.gptq if plan.order is not None else replace(self.config.gptq, act_order=False)
        grid = self.config.grid if plan.group_size is None else replace(
            self.config.grid, group_size=plan.group_size, superblock=self.target.superblock(plan.group_size))
        r = gptq_quantize(target, H, grid, gptq, group_bits=plan.group_bits, order=plan.order)
        r.rotation = self.online.get(full)
        return r

    # ----- dynamic denoising after each block -----
    @torch.no_grad()
    def after_block(self, ctx, out_q, out_fp):
        if not self.options.lfd or out_fp is None:
            return out_q
        # all ranks' batches in one process's order (`pipeline.distributed`): the same numbers on every rank
        qs, fps = ctx.dist.gather_batches(out_q[: len(out_fp)]), ctx.dist.gather_batches(out_fp)
        eps = torch.cat([(q - f).reshape(-1, q.shape[-1]) for q, f in zip(qs, fps)])
        ref = torch.cat([f.reshape(-1, f.shape[-1]) for f in fps])
        before = float(eps.norm() / ref.norm())
        ctx.notes["noise_before"] = before
        ctx.notes["noise_after"] = before
        if self.options.denoise == "off" or before <= self.options.denoise_threshold:
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
        return {"flexible": {"config": asdict(self.options), **asdict(self.facts)}}
