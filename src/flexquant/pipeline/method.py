"""What a method is to the pipeline: a recipe of a few hooks over the block loop (DESIGN.md, data flow).

The pipeline calls, in order: `Method.resolve` (class-level: grid settings the method decides),
`prepare` (whole-model transforms; returns what full-precision statistics it needs), the statistics pass,
`plan` (allocation from those statistics), then per block `quantize_linear` for every linear and
`after_block`, and finally `summary` for the run report.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import MethodConfig, NoOptions, QuantConfig
from ..errors import FlexQuantError
from ..models.spec import ModelSpec
from ..quant.result import QuantResult
from ..quant.targets import get_target
from .capture import BlockInputs
from .distributed import SINGLE, Dist
from .statistics import FPStatistics, StatsRequest

log = logging.getLogger(__name__)


@dataclass
class BlockContext:
    """What a method sees while one decoder block is being quantized."""

    index: int
    prefix: str  # module path of the block, e.g. "model.layers.3"
    block: nn.Module  # on the compute device; its weights are replaced as linears are quantized
    inputs: BlockInputs  # quantized stream (outputs of the already-quantized blocks)
    fp_inputs: BlockInputs | None = None  # the FP stream into this block (first windows; batches read lazily)
    device: torch.device = torch.device("cpu")
    notes: dict = field(default_factory=dict)  # per-block facts the method wants in the report
    # D = 2(X_fp − X_q)ᵀX_q/T of the group being quantized, for the method's ``feedback_groups``
    cross: torch.Tensor | None = None
    dist: Dist = SINGLE  # the run's ranks: per-token statistics over ``inputs`` are reduced through it


class Method:
    """A quantization recipe. Subclasses set ``name``, ``Config`` (their options dataclass) and
    ``quantize_linear``; the other hooks default to doing nothing."""

    name = "base"
    Config: type[MethodConfig] = NoOptions
    needs_calibration = True  # False: data-free (RTN); no forward passes at all
    # Groups (named by their first linear) that also get D = 2(X_fp − X_q)ᵀX_q/T in ``ctx.cross``; needs the
    # statistics pass to keep full-precision inputs, and pre-norm blocks.
    feedback_groups: tuple[str, ...] = ()
    # The activation/KV-cache runtime a weight-activation method hands the packer (`actquant`); None: weights only.
    runtime = None
    # A run can continue from its finished blocks (`quantize(..., resume=True)`): the method keeps no per-block
    # state beyond the packed tensors and its report notes.
    resumable = True
    # False: the method cannot run on several ranks (`pipeline.distributed`), e.g. it trains on per-rank data.
    distributed = True
    # The serving targets (`quant.targets`) the method can search inside; others are refused.
    targets: tuple[str, ...] = ("flexquant",)
    # True: the method quantizes every linear at the grid's --bits (so the target must run that width).
    uses_grid_bits = True
    # Block-relative linears whose act-order permutation the pipeline folds into the producers of their input
    # (`transforms.permute`), for targets that store none; set by the pipeline before `prepare`.
    fold_sites: tuple[str, ...] = ()

    def __init__(self, config: QuantConfig):
        self.config = config
        self.options = config.options

    @classmethod
    def resolve(cls, config: QuantConfig) -> QuantConfig:
        """The run's config with what the user left unset filled in: classic fp16 scales and byte zero points
        unless the method has measured better (``grid_defaults``); inside a serving target, what it carries."""
        config = cls._within_target(config)
        unset = {k: v for k, v in cls.grid_defaults(config.options).items() if getattr(config.grid, k) is None}
        return dataclasses.replace(config, grid=dataclasses.replace(config.grid, **unset)) if unset else config

    @classmethod
    def _within_target(cls, config: QuantConfig) -> QuantConfig:
        """``config`` with the grid and GPTQ settings the serving target needs (fp16 scales, act-order only
        where a permutation can be stored), or a clear error where the user asked for what it cannot carry."""
        target = get_target(config.target)
        if target.name == "flexquant":
            return config
        if target.name not in cls.targets:
            raise FlexQuantError(f"--method {cls.name} cannot search inside --target {target.name} (it supports "
                                 f"{', '.join(cls.targets)}); use --method flexible or gptq for a serving target")
        if config.grid.scale_bits == 8:
            raise FlexQuantError(f"--target {target.name} stores one float16 scale per group; drop --scale-bits 8")
        if cls.uses_grid_bits and target.bits and config.grid.bits not in target.bits:
            raise FlexQuantError(f"--target {target.name} runs {'/'.join(map(str, target.bits))}-bit weights only "
                                 f"({target.note}); --bits {config.grid.bits} is not one of them")
        if config.gptq.act_order and not target.permutation:
            log.info("--target %s: act-order only where the permutation folds into the neighbours (the MLP "
                     "intermediate); %s stores no per-column group index", target.name, target.format)
        forced = {"scale_bits": 16}
        if target.name == "gguf":  # measured better into GGML's types (docs/gguf.md): GGML's own grid rule, and
            # the least-squares scales weighted by GPTQ's column costs (llama.cpp weights by its importance matrix)
            if config.grid.sym_grid is None:
                forced["sym_grid"] = "signed"
            if config.grid.clip is None:
                forced["clip"] = "lsq"
        for key, value in (("group_size", target.group_size), ("sym", target.sym)):
            if value is not None and getattr(config.grid, key) != value:
                log.info("--target %s: %s %s (%s stores no other)", target.name, key.replace("_", " "), value,
                         target.format)
                forced[key] = value
        return dataclasses.replace(config, grid=dataclasses.replace(config.grid, **forced))

    def act_order_for(self, name: str) -> bool:
        """GPTQ act-order for block-relative linear ``name``: as configured where the target stores a column
        permutation, else only at the sites where the pipeline folds it into the neighbours (``fold_sites``)."""
        return self.config.gptq.act_order and (get_target(self.config.target).permutation or name in self.fold_sites)

    @classmethod
    def grid_defaults(cls, options: MethodConfig) -> dict:
        return {"scale_bits": 16, "zero_bits": 8}

    def prepare(self, model: nn.Module, spec: ModelSpec) -> StatsRequest | None:
        """Whole-model transforms before any statistics; returns the statistics the method needs (or None)."""
        return None

    def plan(self, model: nn.Module, spec: ModelSpec, stats: FPStatistics | None, calib_ids: torch.Tensor | None,
             device: torch.device) -> None:
        """Decisions from the statistics before the block loop (bit allocation, ratios); default none."""
        return None

    def quantize_linear(self, ctx: BlockContext | None, name: str, W: torch.Tensor,
                        H: torch.Tensor | None) -> QuantResult:
        """The `QuantResult` of linear ``name`` (weight W, input Hessian H or None if data-free)."""
        raise TypeError(f"{type(self).__name__} must define quantize_linear")

    def after_block(self, ctx: BlockContext, out_q: list[torch.Tensor],
                    out_fp: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """Hook after a block is quantized (denoising, learned quantizers); returns the quantized-stream
        outputs. ``out_fp``: the block's full-precision outputs when the statistics pass kept an FP stream."""
        return out_q

    def summary(self) -> dict:
        """Method-specific facts for the run report."""
        return {}
