"""Adaptive per-layer transformation selection for weight-activation-KV quantization (METHODS.md §3).

Weights (GPTQ, per group), activations (symmetric per token, at every linear's input) and the K/V cache
(asymmetric per head and token) are quantized; activations and the cache are fake-quantized in the
forward pass (`flexquant.actquant`), and the saved checkpoint re-applies them when loaded.

Each decoder block has four activation sites — the inputs of q/k/v, o, gate/up and down — and each site
gets one transform type: an online randomized Hadamard rotation (QuaRot-style) or a learnable Kronecker
affine transform with a per-channel scale (FlatQuant-style); keys follow the q/k/v site's type and values
the o site's (head-dim transforms). How the types are chosen (``transform``):
  none / rotation / affine   every site the same (baselines; "none" keeps the norms unfolded too);
  search                     differentiable search: per-site softmax-mixed outputs of both types trained
                             jointly with the transforms, argmax, then calibration with the chosen types;
  rule                       fast rule: kurtosis κ of the weights reading each site (``rule_weights``: as
                             stored in the checkpoint, or with the norm scales folded in), robust z-score per
                             site type across layers, z = 0.6745·(κ − median κ)/MAD(κ); sites above
                             ``z_threshold`` are outliers and get the type that is not ``rule_default``.
The rotation type (``rotation``) is the fixed randomized Hadamard or orthogonal Kronecker factors learned from it.
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
from ..config import SUPPORTED_BITS, QuantConfig
from ..errors import FlexQuantError
from ..pipeline import Method
from ..pipeline.capture import capture_block_inputs, run_block
from ..pipeline.hooks import onload
from ..quant import gptq_quantize, rtn_quantize
from ..quant.result import FP16_BITS
from ..transforms.rotate import fold_norm
from .registry import register

log = logging.getLogger(__name__)
MODES = ("none", "rotation", "affine", "search", "rule")
CANDIDATES = ("affine", "rotation")
SITE_NAMES = ("qkv", "o", "gate_up", "down")
RULE_WEIGHTS = ("raw", "folded")
KV_SITES = ("qkv", "o")  # keys follow the q/k/v site's type, values the o site's


@dataclass(frozen=True)
class AdaptiveConfig:
    """Settings of ``--method adaptive`` (``QuantConfig.options``)."""

    w_bits: int | None = None  # None: the grid's ``bits``; 16: weights kept in float16
    a_bits: int = 4  # activations, symmetric per token (16 = not quantized)
    k_bits: int = 4  # keys, asymmetric per head and token
    v_bits: int = 4  # values
    transform: str = "rule"
    # The type of non-outlier sites under the rule; outliers get the other. Measured both ways on smollm2-135m
    # W4A4KV4 (bench/results/adaptive.md, raw weights): affine 14.44 ppl, 92.5% agreement with the search;
    # rotation 16.88, 7.5% (folded weights: 14.61 / 88.3% and 16.64 / 11.7%).
    rule_default: str = "affine"
    z_threshold: float = 3.5
    # Whose kurtosis the rule scores: "raw" (the checkpoint's weights) or "folded" (after the RMSNorm scales are
    # folded into the readers of q/k/v and gate/up; o and down have no norm, so they are the same either way).
    # Measured on smollm2-135m, mean ± sd of 3 transform seeds (bench/results/adaptive_seeds*.md): W4A4KV4 raw
    # 14.386 ± 0.051 ppl, folded 14.649 ± 0.036 (all-affine 14.381 ± 0.144); W3A3K2V2 raw 803.7 ± 25.5, folded
    # 840.8 ± 87.3 (all-affine 800.6 ± 108.6). Search agreement: raw 92.5% / 89.2%, folded 88.3% / 85.0%.
    rule_weights: str = "raw"
    # The rotation type: "hadamard" (fixed randomized Hadamard, QuaRot) or "learned" (orthogonal Kronecker factors
    # trained from that Hadamard, SpinQuant-style: the affine family with unit singular values).
    rotation: str = "hadamard"
    train_nsamples: int = 4  # calibration windows the transforms and clipping ratios are trained on
    train_steps: int = 16  # Adam steps per block (one window per step)
    search_steps: int = 16  # steps of the differentiable search per block (before recalibration)
    affine_lr: float = 5e-3  # Adam learning rate of the affine transforms
    seed: int = 0

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


def kurtosis(W: torch.Tensor) -> float:
    """Pearson kurtosis E[(w−μ)⁴]/σ⁴ of all entries (3 for a Gaussian)."""
    x = W.detach().double().flatten()
    x = x - x.mean()
    return float((x**4).mean() / (x**2).mean().clamp(min=1e-300) ** 2)


def site_kurtosis(block, groups) -> dict[str, float]:
    """{site: kurtosis of the weights of all linears reading it} for ``groups`` = [(site, linear names)]."""
    return {name: kurtosis(torch.cat([block.get_submodule(n).weight for n in linears])) for name, linears in groups}


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


class Adaptive(Method):
    name = "adaptive"

    def __init__(self, config: QuantConfig):
        self.acfg = AdaptiveConfig(**config.options)
        w = self.acfg.w_bits
        if w is not None and w != FP16_BITS and w != config.grid.bits:
            config = config.replace(bits=w)
        self.config = config
        self.w_bits = FP16_BITS if w == FP16_BITS else config.grid.bits
        self.facts: dict = {}

    # ----- whole-model preparation: transforms, clipping, selection -----
    def _sites(self, model, spec):
        if not spec.prenorm or len(spec.linear_groups) != len(SITE_NAMES):
            raise FlexQuantError(f"--method adaptive needs pre-norm blocks with q/k/v, o, gate/up and down groups; "
                                 f"the {spec.family} ModelSpec does not declare them")
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
    def prepare(self, model, spec, calib_ids, device) -> None:
        a = self.acfg
        sites, hooks = self._sites(model, spec)
        layers = model.get_submodule(spec.layers)
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        attention = spec.linear_groups[0][0].rsplit(".", 1)[0]
        bits = Bits(self.w_bits, a.a_bits, a.k_bits, a.v_bits, self.config.grid.group_size)
        t0 = time.perf_counter()
        kappas = {"raw": [site_kurtosis(block, [(st.name, st.linears) for st in sites]) for block in layers]}
        raw_seconds = time.perf_counter() - t0
        if a.transform != "none":  # norm scales into the readers, so the transforms act on normalised x
            for block in layers:
                for norm, readers in spec.norm_linear_pairs:
                    fold_norm(block.get_submodule(norm), [block.get_submodule(r) for r in readers])
        t0 = time.perf_counter()
        # Folding changes only the sites reading a norm; with transform "none" nothing is folded (the folded
        # scores are then the raw ones, reported, not used).
        normed = [(st.name, st.linears) for st in sites if hooks[st.name][0] == "output" and a.transform != "none"]
        kappas["folded"] = [{**k, **site_kurtosis(block, normed)} for k, block in zip(kappas["raw"], layers)]
        # Seconds to score every site one way (folded: an upper bound, it includes the raw pass over the norm sites).
        score_seconds = {"raw": raw_seconds, "folded": raw_seconds + time.perf_counter() - t0}
        t0 = time.perf_counter()
        kappa = kappas[a.rule_weights]
        rule, z = rule_choice(kappa, a.rule_default, a.z_threshold)
        rule_seconds = time.perf_counter() - t0 + score_seconds[a.rule_weights]
        # Every variant of the rule (scored weights / type of ordinary sites), for the agreement with the search.
        rules = {f"{w}/{d}": rule_choice(k, d, a.z_threshold)[0] for w, k in kappas.items() for d in CANDIDATES}
        fixed = {"none": "none", "rotation": "rotation", "affine": "affine"}
        if a.transform in fixed:
            types = [{s.name: (fixed[a.transform],) for s in sites} for _ in layers]
        elif a.transform == "rule":
            types = [{s: (t,) for s, t in r.items()} for r in rule]
        else:
            types = [{s.name: CANDIDATES for s in sites} for _ in layers]

        n = min(a.train_nsamples, calib_ids.shape[0])
        inputs = capture_block_inputs(model, spec, calib_ids[:n], device, batch_size=1)
        settings = TrainSettings(steps=a.train_steps, lr=a.affine_lr, rotation=a.rotation)
        search = TrainSettings(steps=a.search_steps, lr=a.affine_lr, rotation=a.rotation)
        site_q, site_hooks, kv_q, kv_paths = {}, {}, {}, {}
        chosen, mixes, blocks = [], [], []
        search_seconds = calib_seconds = 0.0
        for i, block in enumerate(layers):
            prefix = f"{spec.layers}.{i}"
            seed = a.seed * 100_003 + 1009 * i
            with onload(block, device):
                targets = run_block(block, inputs, device)
                note = {"block": i}
                if a.transform == "search":
                    res, _, _ = calibrate_block(block, sites, types[i], attention, KV_SITES, head_dim, bits,
                                                inputs, targets, device, search, seed)
                    search_seconds += res.seconds
                    types[i] = {s: (t,) for s, t in res.choice.items()}
                    mixes.append(res.mix)
                    note.update(search_loss=res.loss_last, search_seconds=res.seconds)
                res, trained, kv = calibrate_block(block, sites, types[i], attention, KV_SITES, head_dim, bits,
                                                   inputs, targets, device, settings, seed)
                calib_seconds += res.seconds
                quantizers, kvq = finalize_block(block, sites, trained, kv, KV_SITES, head_dim, bits)
            chosen.append({s: t[0] for s, t in types[i].items()})
            note.update(loss_first=res.loss_first, loss_last=res.loss_last, reverted=res.reverted, seconds=res.seconds)
            blocks.append(note)
            for s in sites:
                key = f"l{i}_{s.name}"
                site_q[key] = quantizers[s.name]
                where, path = hooks[s.name][0], hooks[s.name][1]
                site_hooks[key] = (f"{prefix}.{path}", where)
            kv_q[f"l{i}"] = kvq
            kv_paths[f"l{i}"] = f"{prefix}.{attention}"
            inputs = inputs.with_hidden(targets)  # the next block trains on full-precision inputs
            log.info("adaptive block %d: %s, loss %.3g -> %.3g", i, chosen[-1], res.loss_first, res.loss_last)

        settings_rec = {"w_bits": self.w_bits, "a_bits": a.a_bits, "k_bits": a.k_bits, "v_bits": a.v_bits,
                        "transform": a.transform, "group_size": self.config.grid.group_size}
        install(model, ActQuantRuntime(site_q, site_hooks, kv_q, kv_paths, settings_rec))
        self.facts = {
            "config": asdict(self.acfg),
            "choice": chosen,
            "kurtosis": kappa,
            "kurtosis_raw": kappas["raw"],
            "z": z,
            "rule": rules,
            "selection_seconds": rule_seconds if a.transform == "rule" else
            (search_seconds if a.transform == "search" else 0.0),
            "rule_seconds": rule_seconds,
            "search_seconds": search_seconds,
            "calibration_seconds": calib_seconds,
            "train_tokens": int(calib_ids[:n].numel()),
            "blocks": blocks,
            "counts": {t: sum(c[s] == t for c in chosen for s in c) for t in ("none",) + CANDIDATES},
        }
        if a.transform == "search":
            self.facts["mix"] = mixes
            self.facts["agreement"] = {d: agreement(r, chosen) for d, r in self.facts["rule"].items()}
            log.info("rule/search agreement: %s", self.facts["agreement"])

    # ----- per linear -----
    def quantize_linear(self, ctx, name, W, H):
        if self.w_bits == FP16_BITS:
            ng = W.shape[1] // self.config.grid.group_size
            return rtn_quantize(W, self.config.grid, torch.full((ng,), FP16_BITS, dtype=torch.uint8))
        return gptq_quantize(W, H, self.config.grid, self.config.gptq)

    def summary(self) -> dict:
        return {"adaptive": self.facts}


register("adaptive")(Adaptive)


# ----- command line (`flexquant quantize --method adaptive ...`) -----
CLI_FLAGS = ("w_bits", "a_bits", "k_bits", "v_bits", "transform", "rule_default", "z_threshold", "rule_weights",
             "rotation", "train_nsamples", "train_steps", "search_steps", "affine_lr")


def add_cli_arguments(parser) -> None:
    """The adaptive method's flags, named like `AdaptiveConfig` fields."""
    g = parser.add_argument_group("adaptive (weight-activation-KV quantization) options")
    g.add_argument("--w-bits", type=int, help="weight bits (overrides --bits; 16 = float16 weights)")
    g.add_argument("--a-bits", type=int, help="activation bits, per token (default 4; 16 = off)")
    g.add_argument("--k-bits", type=int, help="key-cache bits, per head (default 4; 16 = off)")
    g.add_argument("--v-bits", type=int, help="value-cache bits, per head (default 4; 16 = off)")
    g.add_argument("--transform", choices=MODES,
                   help="per-site transform: one type everywhere, the differentiable search, or the kurtosis "
                        "rule (default rule)")
    g.add_argument("--rule-default", choices=CANDIDATES,
                   help="the rule's type for ordinary sites; outlier sites get the other (default affine)")
    g.add_argument("--z-threshold", type=float, help="robust z-score above which a site is an outlier (3.5)")
    g.add_argument("--rule-weights", choices=RULE_WEIGHTS,
                   help="the rule scores the kurtosis of the raw weights or of the weights with the norm scales "
                        "folded in (default raw)")
    g.add_argument("--rotation", choices=ROTATIONS,
                   help="the rotation type: fixed randomized Hadamard, or orthogonal factors learned from it "
                        "(default hadamard)")
    g.add_argument("--train-nsamples", type=int, help="calibration windows the transforms are trained on (4)")
    g.add_argument("--train-steps", type=int, help="training steps per block (16)")
    g.add_argument("--search-steps", type=int, help="differentiable-search steps per block (16)")
    g.add_argument("--affine-lr", type=float, help="learning rate of the affine transforms (5e-3)")


def cli_options(args, options: dict) -> dict:
    """The method options from parsed flags: adaptive's (validated; ``--w-bits`` sets ``--bits``) when
    ``--method adaptive``, else ``options`` unchanged (adaptive flags with another method are an error)."""
    given = {k: getattr(args, k) for k in CLI_FLAGS if getattr(args, k, None) is not None}
    if args.method != "adaptive":
        if given:
            raise FlexQuantError(f"--{next(iter(given)).replace('_', '-')} applies to --method adaptive only")
        return options
    AdaptiveConfig(**given)
    if given.get("w_bits") in SUPPORTED_BITS:
        args.bits = given["w_bits"]
    return given
