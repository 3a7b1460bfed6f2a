"""FlexibleLLM (METHODS.md §1): DOSA (rotation + attribute-outlier protection), SBGBS (fractional bit search),
LFD (feedback against full-precision targets + dynamic denoising), each switchable. docs/flexible.md has the
measured tables behind the defaults."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace

import torch

from ..alloc import PROXIES, GroupTable, Layout, error_table, fixed_bits, greedy_allocate
from ..alloc.greedy import tie_tables, untie
from ..config import MethodConfig, option
from ..errors import FlexQuantError
from ..models.stream import residency
from ..pipeline import Method, StatsRequest
from ..pipeline.sensitivity import block_probe_kl
from ..quant import gptq_quantize
from ..quant.gptq import column_order, inverse_cholesky_upper
from ..quant.impact import hinv_diagonal, salience
from ..quant.targets import TARGETS, get_target
from ..transforms.rotate import incoherence, rotate_inputs_online, rotate_model
from .registry import register

log = logging.getLogger(__name__)
PROTECT = ("columns", "groups", "none")
SENSITIVITY = ("fisher", "none")
PROBES = ("off", "block", "linear")
ROTATIONS = ("auto", "residual", "online")
WIDE_BUDGET = 4.0  # bpw from which the default candidates reach above 4 bits and the rotation is off


@dataclass(frozen=True)
class FlexibleConfig(MethodConfig):
    """FlexibleLLM options."""

    bpw: float = option(2.5, "honest bits-per-weight budget over all quantized linears, metadata included")
    dosa: bool | None = option(None, "DOSA Hadamard rotation (unset: on below "
                                     f"{WIDE_BUDGET:g} bpw, off from there)")
    dosa_rotation: str = option("auto", "'residual' = the residual stream (folded into the weights) and "
                                        "down_proj's input online; 'online' = every linear's input online (for "
                                        "families whose residual stream cannot be rotated: Gemma's sandwich "
                                        "norms); 'auto' = residual where the family allows it, else online",
                                ROTATIONS)
    protect: str = option("groups", "attribute outliers: 'groups' orders columns by salience so SBGBS raises the "
                                    "groups holding them; 'columns' keeps the top salient columns at "
                                    "--protect-bits, quantized last; 'none'", PROTECT)
    protect_groups: int = option(1, "salient column groups kept per linear (--protect columns)")
    protect_bits: int = option(4, "bits of the protected columns (2..8, or 16 = fp16)")
    sbgbs: bool = option(True, "greedy fractional bit search; off: the highest uniform candidate that fits")
    candidates: tuple[int, ...] = option((), "bit-widths SBGBS may choose (unset: 2 3 4 below "
                                             f"{WIDE_BUDGET:g} bpw, else 2 3 4 5 6 8)")
    lfd: bool = option(True, "LFD: feedback toward full-precision targets + block noise measurement")
    feedback_alpha: float = option(0.25, "LFD feedback weight α in W* = W + α·W·D·H⁻¹")
    denoise: str = option("off", "LFD denoising: 'bias' folds −mean(ε) into the block's last writer where the "
                                 "relative noise exceeds --denoise-threshold; 'off' only measures", ("bias", "off"))
    denoise_threshold: float = option(0.05, "relative block-output noise ‖ε‖/‖h_fp‖ that triggers denoising")
    alloc_nsamples: int = option(32, "calibration windows of the statistics pass (allocation, Fisher, LFD's "
                                     "full-precision stream), rounded down to whole batches")
    sensitivity: str = option("fisher", "weight the allocation's errors by the loss Fisher of each output "
                                        "(comparable across layers), or not", SENSITIVITY)
    fisher_nsamples: int = option(16, "windows of the Fisher backward pass, a prefix of --alloc-nsamples "
                                      "(whole batches); 0 = all")
    fisher_power: float = option(1.0, "the Fisher weights raised to this power (< 1 narrows their spread across "
                                      "layers; 0 = unweighted)")
    probe: str = option("off", "'block': measure each block's real KL to the float model with only its linears "
                               "quantized (at the widest candidate within --bpw) and scale that block's predicted "
                               "errors to it before the search (one streamed pass over the blocks); 'linear': the "
                               "same for each linear alone; 'off'", PROBES)
    probe_nsamples: int = option(8, "windows the probes measure KL on")
    probe_seqlen: int = option(256, "tokens per probe window")
    proxy: str = option("gptq", "SBGBS error proxy: 'block' = tr(ΔW H_kk ΔWᵀ) of the group's Hessian block; "
                                "'gptq' = Σ ΔW²/U_jj², GPTQ's cost after compensation", PROXIES)
    rotation_seed: int = option(0, "seed of the random Hadamard signs")
    group_sizes: tuple[int, ...] = option((), "with a --target of one width per linear: the group sizes SBGBS may "
                                              "choose per linear with its width (unset: --group-size only)")

    def __post_init__(self) -> None:
        if not 1.0 < self.bpw <= 16:
            raise FlexQuantError(f"bpw={self.bpw} must be in (1, 16]")
        if self.denoise not in ("bias", "off"):
            raise FlexQuantError(f"denoise={self.denoise!r} must be 'bias' or 'off'")
        if self.dosa_rotation not in ROTATIONS:
            raise FlexQuantError(f"dosa_rotation={self.dosa_rotation!r} must be one of {ROTATIONS}")
        if self.sensitivity not in SENSITIVITY:
            raise FlexQuantError(f"sensitivity={self.sensitivity!r} must be one of {SENSITIVITY}")
        if not 0 <= self.fisher_power <= 2:
            raise FlexQuantError(f"fisher_power={self.fisher_power} must be in [0, 2]")
        if self.fisher_nsamples < 0:
            raise FlexQuantError(f"fisher_nsamples={self.fisher_nsamples} must be >= 0 (0 = alloc_nsamples)")
        if self.probe not in PROBES:
            raise FlexQuantError(f"probe={self.probe!r} must be one of {PROBES}")
        if self.probe_nsamples < 1 or self.probe_seqlen < 2:
            raise FlexQuantError(f"probe_nsamples={self.probe_nsamples} must be >= 1 and probe_seqlen="
                                 f"{self.probe_seqlen} >= 2")
        if self.proxy not in PROXIES:
            raise FlexQuantError(f"proxy={self.proxy!r} must be one of {PROXIES}")
        if self.protect not in PROTECT:
            raise FlexQuantError(f"protect={self.protect!r} must be one of {PROTECT}")
        if self.dosa is None:
            object.__setattr__(self, "dosa", 1.0 <= self.bpw < WIDE_BUDGET)
        if not self.candidates:
            object.__setattr__(self, "candidates", (2, 3, 4) if self.bpw < WIDE_BUDGET else (2, 3, 4, 5, 6, 8))
        if sorted(self.candidates) != list(self.candidates) or \
                not all(1 <= b <= 8 for b in self.candidates):
            raise FlexQuantError(f"candidates={self.candidates} must be increasing bit-widths in 1..8")
        if self.protect_bits not in range(2, 9) and self.protect_bits != 16:
            raise FlexQuantError(f"protect_bits={self.protect_bits} must be 2..8 or 16")
        object.__setattr__(self, "candidates", tuple(self.candidates))
        if not all(isinstance(g, int) and g >= 8 and g % 8 == 0 for g in self.group_sizes):
            raise FlexQuantError(f"group_sizes={self.group_sizes} must be multiples of 8 (e.g. 32 64 128)")
        object.__setattr__(self, "group_sizes", tuple(self.group_sizes))

    @property
    def top_bits(self) -> int:
        """The widest quantized (not fp16) group this configuration can produce."""
        protect = (self.protect_bits,) if self.protect == "columns" and self.protect_bits < 16 else ()
        return max(self.candidates + protect)


def _refuse(f: FlexibleConfig, spec) -> None:
    """The parts of FlexibleLLM the family's blocks do not allow, refused with what to use instead."""
    if spec.discovered and (f.dosa or f.lfd):
        raise FlexQuantError(f"FlexibleLLM's DOSA rotation and LFD feedback need a tested ModelSpec declaring the "
                             f"norms its linears read (norm_linear_pairs, residual readers/writers, rotatable) and "
                             f"blocks of two residual sub-layers (prenorm); {spec.family} has only a discovered one "
                             "(linear groups): pass --no-dosa --no-lfd, or use --method gptq")
    if f.dosa and not spec.rotatable and (f.dosa_rotation == "residual" or spec.experts):
        why = ("its experts' router reads the residual stream and is not rotated" if spec.experts else
               "norms on its sub-layer outputs or readers without a foldable norm")
        fix = "pass --no-dosa" if spec.experts else "pass --dosa-rotation online or --no-dosa"
        raise FlexQuantError(f"FlexibleLLM's residual rotation is not exact for {spec.family} ({why}): {fix}, "
                             "or use --method gptq")
    if f.lfd and not spec.prenorm:
        raise FlexQuantError(f"FlexibleLLM's LFD feedback needs residual blocks of two sub-layers, which the "
                             f"{spec.family} ModelSpec does not declare: pass --no-lfd, or use --method gptq")
    if f.lfd and f.denoise == "bias" and not spec.direct_writers:
        raise FlexQuantError(f"LFD's bias denoising needs residual writers that add their outputs unchanged; "
                             f"{spec.family} norms or scales them: pass --denoise off")


@dataclass
class _Plan:
    order: torch.Tensor | None
    group_bits: torch.Tensor
    protected: int = 0  # protected columns (ordered last)
    group_size: int | None = None  # chosen per linear (a per-layer target's options); None: the grid's


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

    # ----- whole-model preparation: rotation, then what the statistics pass must give -----
    @torch.no_grad()
    def prepare(self, model, spec) -> StatsRequest:
        f, bs = self.options, self.config.batch_size
        _refuse(f, spec)
        if f.lfd:
            # Feedback where the residual stream enters the block (the q/k/v and gate/up inputs): that is
            # where the quantized stream's accumulated noise shows.
            self.feedback_groups = tuple(g[0] for g in spec.linear_groups if g[0] in spec.residual_readers)
        self.spec_writer = spec.residual_writers[-1] if spec.residual_writers else None  # (used by LFD only)
        self.layers_path = spec.layers
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
        return StatsRequest(windows=windows,
                            fisher_windows=(f.fisher_nsamples or windows) if f.sensitivity == "fisher" else 0,
                            keep_windows=windows if f.lfd else 0)

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
    @torch.no_grad()
    def plan(self, model, spec, stats, calib_ids, device) -> None:
        f, g = self.options, self.config.grid.group_size
        if f.sensitivity == "fisher":
            rows = stats.fisher if f.fisher_power == 1 else {n: r.pow(f.fisher_power) for n, r in stats.fisher.items()}
            self.facts.sensitivity = {n: float(r.mean()) for n, r in stats.fisher.items()}
        else:
            rows = {n: torch.ones(model.get_submodule(n).out_features) for n in stats.hessians}
        names = self._names(model, spec)
        tables, orders, hinv, shapes, predicted = [], {}, {}, {}, {}
        fixed_total = weights = 0
        grid = self.config.grid
        for name, W in self._weights(model, spec):
            table, order, nkept = self._linear_table(name, W, stats.hessians[name], rows[name], hinv)
            if f.probe != "off":  # the predicted cost of the linear quantized alone at the probe width
                predicted[name] = table.errors[:, table.candidates.index(self._probe_width)].sum()
            if self.target.per_layer:
                table = self._layer_table(name, W, stats.hessians[name], rows[name], order, table)
            tables.append(table)
            orders[name], shapes[name] = (order, nkept), tuple(W.shape)
            rot = self.online.get(name)
            factor = 0 if rot is None or bool((rot.factor.abs() == 1).all()) else rot.factor.shape[0]
            layout = Layout(*W.shape, g, grid.sym, grid.scale_bits, grid.zero_bits, True, rot is not None, factor)
            fixed_total += fixed_bits(layout, int(table.fixed.sum()) if f.protect_bits == 16 else 0)
            weights += W.numel()
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
                hinv["of"], hinv["diag"] = H, hinv_diagonal(H, self.config.gptq.damp)
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
        errors = error_table(W, H, order, g, self.candidates, rows, f.proxy, self.config.gptq.damp)
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
                E = error_table(W, H, order, g, widths, rows, self.options.proxy, self.config.gptq.damp)
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
