"""Adaptive per-layer transformation selection for weight-activation-KV quantization (METHODS.md §3).

Weights (GPTQ, per group), activations (symmetric per token, at every linear's input) and the K/V cache
(asymmetric per head and token) are quantized; activations and the cache are fake-quantized in the
forward pass (`flexquant.actquant`), and the saved checkpoint re-applies them when loaded.

Each decoder block has four activation sites — the inputs of q/k/v, o, gate/up and down — and each site
gets one transform type: an online randomized Hadamard rotation (QuaRot-style) or a learnable Kronecker
affine transform with a per-channel scale (FlatQuant-style); keys follow the q/k/v site's type and values
the o site's (head-dim transforms). How the types are chosen (``transform``):
  none / rotation / affine   every site the same (baselines);
  search                     differentiable search: per-site softmax-mixed outputs of both types trained
                             jointly with the transforms, argmax, then calibration with the chosen types;
  rule                       fast rule: kurtosis κ of the weights reading each site (``rule_weights``: as
                             stored in the checkpoint, or with the norm scales folded in), robust z-score per
                             site type across layers, z = 0.6745·(κ − median κ)/MAD(κ); sites above
                             ``z_threshold`` are outliers and get the type that is not ``rule_default``.
The rotation type (``rotation``) is the fixed randomized Hadamard or orthogonal Kronecker factors learned from it.
The transforms act on each norm's output (``fold_norms`` "on": on x/rms(x), the gains folded into the readers,
QuaRot's order; that puts the channels a norm switches off — Gemma 3's zero gains, near-zero ones in
smollm2's MLP norms — into the activation range, and measured worse on both models).
Transforms and clipping ratios (activations, K/V, and the calibration-time weight quantizer) are trained
per block on the MSE to the full-precision block output over a few calibration windows; then the
transforms are folded into the weights (float64) and GPTQ quantizes the weights from Hessians of the
transformed, quantized activations.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..actquant.calibrate import ROTATIONS, Bits, SiteSpec, TrainSettings, calibrate_block, finalize_block
from ..actquant.runtime import ActQuantRuntime, install
from ..config import SUPPORTED_BITS, MethodConfig, option
from ..errors import FlexQuantError
from ..models.stream import residency
from ..pipeline import Method, StatsRequest
from ..quant import gptq_quantize, rtn_quantize
from ..quant.result import FP16_BITS
from ..transforms.rotate import fold_norm
from .registry import register

log = logging.getLogger(__name__)
MODES = ("none", "rotation", "affine", "search", "rule")
CANDIDATES = ("affine", "rotation")
SITE_NAMES = ("qkv", "o", "gate_up", "down")
RULE_WEIGHTS = ("raw", "folded")
FOLDS = ("off", "on")
KV_SITES = ("qkv", "o")  # keys follow the q/k/v site's type, values the o site's


@dataclass(frozen=True)
class AdaptiveConfig(MethodConfig):
    """Weight-activation-KV options."""

    w_bits: int | None = option(None, "weight bits (sets --bits; 16 = float16 weights); unset = --bits")
    a_bits: int = option(4, "activation bits, symmetric per token (16 = not quantized)")
    k_bits: int = option(4, "key-cache bits, asymmetric per head (16 = not quantized)")
    v_bits: int = option(4, "value-cache bits, asymmetric per head (16 = not quantized)")
    transform: str = option("rule", "per-site transform: one type everywhere (none, rotation, affine), the "
                                    "differentiable search, or the kurtosis rule", MODES)
    rule_default: str = option("affine", "the rule's type for ordinary sites; outlier sites get the other",
                               CANDIDATES)
    z_threshold: float = option(3.5, "robust z-score of the kurtosis above which a site is an outlier")
    rule_weights: str = option("raw", "the rule scores the kurtosis of the raw weights or of the weights with "
                                      "the norm scales folded in", RULE_WEIGHTS)
    rotation: str = option("hadamard", "the rotation type: fixed randomized Hadamard, or orthogonal Kronecker "
                                       "factors learned from it", ROTATIONS)
    train_nsamples: int = option(4, "calibration windows the transforms and clipping ratios are trained on")
    train_steps: int = option(16, "Adam steps per block (one window per step)")
    search_steps: int = option(16, "steps of the differentiable search per block (before recalibration)")
    affine_lr: float = option(5e-3, "Adam learning rate of the affine transforms")
    transform_seed: int = option(0, "seed of the random signs and initial transforms")
    fold_norms: str = option("off", "'on' folds each norm's gains into the linears reading it, so the transforms "
                                    "and quantizers see x/rms(x) instead of the norm's output (QuaRot's order)", FOLDS)

    def __post_init__(self) -> None:
        for name in ("a_bits", "k_bits", "v_bits"):
            b = getattr(self, name)
            if not (isinstance(b, int) and (2 <= b <= 8 or b == FP16_BITS)):
                raise FlexQuantError(f"{name}={b} must be 2..8, or 16 for no quantization")
        if self.w_bits is not None and self.w_bits not in SUPPORTED_BITS + (FP16_BITS,):
            raise FlexQuantError(f"w_bits={self.w_bits} must be one of {SUPPORTED_BITS} or 16 (float16 weights)")
        if self.transform not in MODES:
            raise FlexQuantError(f"transform={self.transform!r} must be one of {', '.join(MODES)}")
        if self.rule_default not in CANDIDATES:
            raise FlexQuantError(f"rule_default={self.rule_default!r} must be one of {', '.join(CANDIDATES)}")
        if self.rule_weights not in RULE_WEIGHTS:
            raise FlexQuantError(f"rule_weights={self.rule_weights!r} must be one of {', '.join(RULE_WEIGHTS)}")
        if self.rotation not in ROTATIONS:
            raise FlexQuantError(f"rotation={self.rotation!r} must be one of {', '.join(ROTATIONS)}")
        if not self.z_threshold > 0:
            raise FlexQuantError(f"z_threshold={self.z_threshold} must be > 0 (3.5 is the usual value)")
        if self.train_nsamples < 1 or self.train_steps < 0 or self.search_steps < 1:
            raise FlexQuantError("train_nsamples and search_steps must be >= 1, train_steps >= 0")
        if not self.affine_lr > 0:
            raise FlexQuantError(f"affine_lr={self.affine_lr} must be > 0")
        if self.fold_norms not in FOLDS:
            raise FlexQuantError(f"fold_norms={self.fold_norms!r} must be one of {', '.join(FOLDS)}")


def kurtosis(W: torch.Tensor) -> float:
    """Pearson kurtosis E[(w−μ)⁴]/σ⁴ of all entries (3 for a Gaussian)."""
    x = W.detach().double().flatten()
    x = x - x.mean()
    return float((x**4).mean() / (x**2).mean().clamp(min=1e-300) ** 2)


def site_kurtosis(block, groups, gains: dict | None = None) -> dict[str, float]:
    """{site: kurtosis of the weights of all linears reading it} for ``groups`` = [(site, linear names)], the
    weights' columns scaled by ``gains[site]`` where given (a norm's gains folded in)."""
    gains = gains or {}

    def weights(name, linears):
        W = torch.cat([block.get_submodule(n).weight.detach().double() for n in linears])
        return W * gains[name][None, :] if name in gains else W

    return {name: kurtosis(weights(name, linears)) for name, linears in groups}


def robust_z(values: list[float]) -> list[float]:
    """0.6745·(v − median)/MAD; with MAD = 0 every value off the median is infinitely far."""
    med = statistics.median(values)
    mad = statistics.median([abs(v - med) for v in values])
    if mad == 0:
        return [0.0 if v == med else float("inf") * (1 if v > med else -1) for v in values]
    return [0.6745 * (v - med) / mad for v in values]


def rule_choice(kappa: list[dict[str, float]], default: str, threshold: float):
    """Per layer and site: the rule's type, and the z-scores (per site type across layers)."""
    other = CANDIDATES[1] if default == CANDIDATES[0] else CANDIDATES[0]
    z = [dict() for _ in kappa]
    for site in kappa[0]:
        for i, v in enumerate(robust_z([k[site] for k in kappa])):
            z[i][site] = v
    choice = [{s: other if z[i][s] > threshold else default for s in k} for i, k in enumerate(kappa)]
    return choice, z


def agreement(a: list[dict[str, str]], b: list[dict[str, str]]) -> float:
    pairs = [(x[s], y[s]) for x, y in zip(a, b) for s in x]
    return sum(p == q for p, q in pairs) / len(pairs)


@register
class Adaptive(Method):
    """Weights, per-token activations and the per-head KV cache, with an affine or rotation transform per site."""

    name = "adaptive"
    resumable = False  # learned per-block state (quantizers, runtime) is not replayed on resumption
    Config = AdaptiveConfig

    @classmethod
    def resolve(cls, config):
        """``w_bits`` (when a quantized width) is the grid's ``bits``."""
        w = config.options.w_bits
        if w is not None and w != FP16_BITS and w != config.grid.bits:
            config = config.replace(bits=w)
        return super().resolve(config)

    def __init__(self, config):
        super().__init__(config)
        self.w_bits = FP16_BITS if self.options.w_bits == FP16_BITS else config.grid.bits
        self.facts: dict = {}

    # ----- whole-model preparation: transforms, clipping, selection -----
    def _sites(self, model, spec):
        if (not spec.prenorm or len(spec.linear_groups) != len(SITE_NAMES)
                or spec.attn_implementation != "sdpa" or not spec.norm_linear_pairs):
            raise FlexQuantError(f"--method adaptive needs Llama-style blocks (q/k/v, o, gate/up and down groups, "
                                 f"norms before q/k/v and gate/up, SDPA attention); {spec.family} is not one: "
                                 "use --method gptq")
        norm_of = {tuple(readers): norm for norm, readers in spec.norm_linear_pairs}
        block0 = model.get_submodule(spec.layers)[0]
        sites, hooks = [], {}
        for name, group in zip(SITE_NAMES, spec.linear_groups):
            sites.append(SiteSpec(name, tuple(group), block0.get_submodule(group[0]).in_features))
            if tuple(group) in norm_of:
                hooks[name] = ("output", norm_of[tuple(group)])
            elif len(group) == 1:
                hooks[name] = ("input", group[0])
            else:
                raise FlexQuantError(f"linear group {group} reads neither a norm's output nor a single input")
        return sites, hooks

    @torch.no_grad()
    def prepare(self, model, spec) -> StatsRequest:
        """Score the sites, fold the norms, choose the types; the statistics pass then calibrates each block on
        full-precision inputs (`_calibrate_block`)."""
        a = self.options
        residency(model, spec).pin_all("adaptive scores and folds every block up front")
        self.spec, self.sites, self.hooks = spec, *self._sites(model, spec)
        layers = model.get_submodule(spec.layers)
        cfg = model.config
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.attention = spec.linear_groups[0][0].rsplit(".", 1)[0]
        self.bits = Bits(self.w_bits, a.a_bits, a.k_bits, a.v_bits, self.config.grid.group_size)
        self.types = self._choose_types(layers, spec)
        self.settings = TrainSettings(steps=a.train_steps, lr=a.affine_lr, rotation=a.rotation)
        self.search = TrainSettings(steps=a.search_steps, lr=a.affine_lr, rotation=a.rotation)
        self.quantizers = ({}, {}, {}, {})  # site quantizers, their hooks, K/V quantizers, their attention paths
        self.chosen, self.mixes, self.blocks = [], [], []
        self.seconds = {"search": 0.0, "calibration": 0.0}
        return StatsRequest(windows=a.train_nsamples, hessians=False, batch_size=1, on_block=self._calibrate_block)

    def _choose_types(self, layers, spec) -> list[dict]:
        """Kurtosis scores (raw and folded), the rule's choice and the candidate types of every site."""
        a, sites = self.options, self.sites
        t0 = time.perf_counter()
        kappas = {"raw": [site_kurtosis(block, [(st.name, st.linears) for st in sites]) for block in layers]}
        raw_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        normed = {site: norm for site, (where, norm) in self.hooks.items() if where == "output"}  # site -> its norm
        groups = [(st.name, st.linears) for st in sites if st.name in normed]

        def gains(block):
            return {site: block.get_submodule(n).weight.detach().double() + spec.norm_offset
                    for site, n in normed.items()}

        kappas["folded"] = [{**k, **site_kurtosis(block, groups, gains(block))}
                            for k, block in zip(kappas["raw"], layers)]
        # Seconds to score every site one way (folded: an upper bound, it includes the raw pass over the norm sites).
        score_seconds = {"raw": raw_seconds, "folded": raw_seconds + time.perf_counter() - t0}
        if a.fold_norms == "on" and a.transform != "none":  # the transforms then act on x/rms(x)
            for block in layers:
                for norm, readers in spec.norm_linear_pairs:
                    fold_norm(block.get_submodule(norm), [block.get_submodule(r) for r in readers], spec.norm_offset)
        t0 = time.perf_counter()
        kappa = kappas[a.rule_weights]
        rule, z = rule_choice(kappa, a.rule_default, a.z_threshold)
        self.rule_seconds = time.perf_counter() - t0 + score_seconds[a.rule_weights]
        # Every variant of the rule (scored weights / type of ordinary sites), for the agreement with the search.
        self.rules = {f"{w}/{d}": rule_choice(k, d, a.z_threshold)[0] for w, k in kappas.items() for d in CANDIDATES}
        self.kappas, self.z = kappas, z
        if a.transform in ("none", "rotation", "affine"):
            return [{s.name: (a.transform,) for s in sites} for _ in layers]
        if a.transform == "rule":
            return [{s: (t,) for s, t in r.items()} for r in rule]
        return [{s.name: CANDIDATES for s in sites} for _ in layers]

    def _calibrate_block(self, i: int, block, inputs, targets, device) -> None:
        """Train (search, then calibrate) block ``i``'s transforms and clipping on its FP inputs and outputs,
        and fold them into its weights."""
        a = self.options
        seed = a.transform_seed * 100_003 + 1009 * i
        args = (block, self.sites)
        tail = (self.attention, KV_SITES, self.head_dim, self.bits, inputs, targets, device)
        note = {"block": i}
        if a.transform == "search":
            res, _, _ = calibrate_block(*args, self.types[i], *tail, self.search, seed)
            self.seconds["search"] += res.seconds
            self.types[i] = {s: (t,) for s, t in res.choice.items()}
            self.mixes.append(res.mix)
            note.update(search_loss=res.loss_last, search_seconds=res.seconds)
        res, trained, kv = calibrate_block(*args, self.types[i], *tail, self.settings, seed)
        self.seconds["calibration"] += res.seconds
        quantizers, kvq = finalize_block(block, self.sites, trained, kv, KV_SITES, self.head_dim, self.bits)
        self.chosen.append({s: t[0] for s, t in self.types[i].items()})
        note.update(loss_first=res.loss_first, loss_last=res.loss_last, reverted=res.reverted, seconds=res.seconds)
        self.blocks.append(note)
        site_q, site_hooks, kv_q, kv_paths = self.quantizers
        prefix = f"{self.spec.layers}.{i}"
        for st in self.sites:
            key = f"l{i}_{st.name}"
            site_q[key] = quantizers[st.name]
            where, path = self.hooks[st.name]
            site_hooks[key] = (f"{prefix}.{path}", where)
        kv_q[f"l{i}"] = kvq
        kv_paths[f"l{i}"] = f"{prefix}.{self.attention}"
        log.info("adaptive block %d: %s, loss %.3g -> %.3g", i, self.chosen[-1], res.loss_first, res.loss_last)

    def plan(self, model, spec, stats, calib_ids, device) -> None:
        """Install the calibrated activation/KV quantizers (the block loop's Hessians see them) and the facts."""
        a = self.options
        settings = {"w_bits": self.w_bits, "a_bits": a.a_bits, "k_bits": a.k_bits, "v_bits": a.v_bits,
                    "transform": a.transform, "group_size": self.config.grid.group_size}
        self.runtime = install(model, ActQuantRuntime(*self.quantizers, settings))
        chosen = self.chosen
        self.facts = {
            "config": asdict(a), "choice": chosen, "kurtosis": self.kappas[a.rule_weights],
            "kurtosis_raw": self.kappas["raw"], "z": self.z, "rule": self.rules,
            "selection_seconds": self.rule_seconds if a.transform == "rule" else
            (self.seconds["search"] if a.transform == "search" else 0.0),
            "rule_seconds": self.rule_seconds, "search_seconds": self.seconds["search"],
            "calibration_seconds": self.seconds["calibration"],
            "train_tokens": int(calib_ids[: a.train_nsamples].numel()),
            "blocks": self.blocks,
            "counts": {t: sum(c[s] == t for c in chosen for s in c) for t in ("none",) + CANDIDATES},
        }
        if a.transform == "search":
            self.facts["mix"] = self.mixes
            self.facts["agreement"] = {d: agreement(r, chosen) for d, r in self.rules.items()}
            log.info("rule/search agreement: %s", self.facts["agreement"])

    # ----- per linear -----
    def quantize_linear(self, ctx, name, W, H):
        if self.w_bits == FP16_BITS:
            ng = W.shape[1] // self.config.grid.group_size
            return rtn_quantize(W, self.config.grid, torch.full((ng,), FP16_BITS, dtype=torch.uint8))
        return gptq_quantize(W, H, self.config.grid, self.config.gptq)

    def summary(self) -> dict:
        return {"adaptive": self.facts}
