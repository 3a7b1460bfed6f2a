"""Options of ``--method flexible`` (FlexibleLLM) and the parts of it a model family refuses; docs/flexible.md has
the measured tables behind the defaults."""

from __future__ import annotations

from dataclasses import dataclass

from ..alloc import PROXIES
from ..config import MethodConfig, option
from ..errors import FlexQuantError

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


def refuse(f: FlexibleConfig, spec) -> None:
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
