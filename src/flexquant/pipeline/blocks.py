"""The sequential block loop every method runs through (DESIGN.md, data flow step 6)."""

from __future__ import annotations

import abc
import copy
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import FlexQuantError
from ..models.spec import ModelSpec
from ..quant.gptq import hessian_error
from ..quant.result import QuantResult
from .capture import BlockInputs, capture_block_inputs, run_block
from .hooks import collect_hessian, onload, run_capturing
from .prenorm import prenorm_applicable, quantize_prenorm_block

log = logging.getLogger(__name__)


@dataclass
class BlockContext:
    """What a method sees while one decoder block is being quantized."""

    index: int
    prefix: str  # module path of the block, e.g. "model.layers.3"
    block: nn.Module  # on the compute device; its weights are replaced as linears are quantized
    inputs: BlockInputs  # quantized stream (outputs of the already-quantized blocks)
    fp_block: nn.Module | None = None  # an untouched copy, when the method asks for the FP stream
    fp_inputs: BlockInputs | None = None
    device: torch.device = torch.device("cpu")
    notes: dict = field(default_factory=dict)  # per-block facts the method wants in the report
    # D = 2(X_fp − X_q)ᵀX_q/T of the group being quantized, when the method asks for feedback stats
    cross: torch.Tensor | None = None


class Method(abc.ABC):
    """A quantization recipe: how to quantize one linear, plus optional per-block steps."""

    name = "base"
    needs_calibration = True  # False: data-free (RTN); no forward passes at all
    needs_fp_stream = False  # True: the pipeline also propagates the full-precision stream
    # True: the method keeps full-precision block inputs itself (`fp_stream_inputs`), e.g. from a
    # whole-model pass over a prefix of the calibration batches, so the pipeline never propagates
    # the FP stream over all batches (saves most of a forward pass per block).
    provides_fp_stream = False
    # Groups (named by their first linear) that also get D = 2(X_fp − X_q)ᵀX_q/T in ``ctx.cross``;
    # non-empty implies the FP stream. Needs the pre-norm fast path.
    feedback_groups: tuple[str, ...] = ()

    @classmethod
    def default_grid(cls, config) -> dict:
        """Grid settings the method fills in where the user left them unset (None): classic fp16 scales
        and byte zero points unless the method has measured better."""
        return {"scale_bits": 16, "zero_bits": 8}

    def prepare(self, model: nn.Module, spec: ModelSpec, calib_ids: torch.Tensor | None,
                device: torch.device) -> None:
        """Whole-model steps before the block loop (transforms, bit allocation); default none."""
        return None

    def summary(self) -> dict:
        """Method-specific facts for the run report."""
        return {}

    @abc.abstractmethod
    def quantize_linear(self, ctx: BlockContext | None, name: str, W: torch.Tensor,
                        H: torch.Tensor | None) -> QuantResult:
        """The `QuantResult` of linear ``name`` (weight W, input Hessian H or None if data-free)."""

    def fp_stream_inputs(self, index: int) -> BlockInputs:
        """Full-precision inputs of block ``index`` for the first batches of the calibration data
        (``provides_fp_stream`` methods only); called once per block, in order."""
        raise FlexQuantError(f"method {self.name} does not keep full-precision block inputs")

    def fp_stream_outputs(self, index: int) -> list[torch.Tensor] | None:
        """Full-precision outputs of block ``index`` for the batches of `fp_stream_inputs` when the method
        has them (then the FP block runs only up to its last feedback input); None = run the whole block."""
        return None

    def after_block(self, ctx: BlockContext, out_q: list[torch.Tensor],
                    out_fp: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """Hook after a block is quantized (e.g. denoising); returns the quantized-stream outputs."""
        return out_q


@dataclass
class LinearRecord:
    name: str
    shape: tuple[int, int]
    mean_bits: float
    rel_error: float | None  # tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), None without calibration data
    seconds: float
    stats: dict


def _quantize_one(method: Method, ctx, prefix: str, name: str, linear: nn.Linear,
                  H: torch.Tensor | None, results: dict, records: list) -> None:
    t0 = time.perf_counter()
    W = linear.weight.data
    if not torch.isfinite(W).all():
        raise FlexQuantError(f"weight {prefix}.{name} contains NaN or inf; the model checkpoint is corrupted")
    r = method.quantize_linear(ctx, name, W, H)
    Wq = r.dequantize(torch.float32)
    rel = None
    if H is not None:
        ref = hessian_error(W, torch.zeros_like(W), H)
        rel = hessian_error(W, Wq, H) / ref if ref > 0 else 0.0
    linear.weight.data = Wq.to(W.dtype)  # later groups and blocks see the quantized weight
    full = f"{prefix}.{name}"
    results[full] = r
    records.append(LinearRecord(full, tuple(W.shape), r.mean_bits(), rel, time.perf_counter() - t0, r.stats))


@torch.no_grad()
def quantize_blocks(model: nn.Module, spec: ModelSpec, method: Method, calib_ids: torch.Tensor | None,
                    device: torch.device, batch_size: int = 8, progress: bool = True, fast: bool = True):
    """Quantize every linear of every decoder block in place (fake-quant weights written back).

    ``fast`` uses the cached-activation path for pre-norm residual blocks (same result, fewer FLOPs).

    Returns ({module path: QuantResult}, [LinearRecord], [per-block notes]).
    """
    layers = model.get_submodule(spec.layers)
    results: dict[str, QuantResult] = {}
    records: list[LinearRecord] = []
    notes: list[dict] = []
    if not method.needs_calibration:
        for i, block in enumerate(tqdm(layers, desc=f"{method.name} blocks", disable=not progress)):
            with onload(block, device):
                for name in spec.linears:
                    _quantize_one(method, None, f"{spec.layers}.{i}", name, block.get_submodule(name),
                                  None, results, records)
        return results, records, notes

    inputs = capture_block_inputs(model, spec, calib_ids, device, batch_size)
    need_fp = method.needs_fp_stream or bool(method.feedback_groups)
    fp_inputs = inputs.clone() if need_fp and not method.provides_fp_stream else None
    for i, block in enumerate(tqdm(layers, desc=f"{method.name} blocks", disable=not progress)):
        known_out = None
        if need_fp and method.provides_fp_stream:
            fp_inputs = method.fp_stream_inputs(i)
            known_out = method.fp_stream_outputs(i)
        with onload(block, device):
            fp_block = copy.deepcopy(block) if need_fp else None
            ctx = BlockContext(i, f"{spec.layers}.{i}", block, inputs, fp_block, fp_inputs, device)

            def quantize_group(group, H, D=None, ctx=ctx, block=block):
                ctx.cross = D
                for name in group:
                    _quantize_one(method, ctx, ctx.prefix, name, block.get_submodule(name), H, results, records)
                ctx.cross = None

            out_fp, x_fp = (run_capturing(fp_block, fp_inputs, device, method.feedback_groups,
                                          outputs=known_out is None)
                            if fp_block is not None else (None, None))
            if known_out is not None:
                out_fp = known_out
            if (fast or method.feedback_groups) and prenorm_applicable(spec, inputs, block):
                out_q = quantize_prenorm_block(block, spec, inputs, device, quantize_group, x_fp)
            elif method.feedback_groups:
                raise FlexQuantError(f"this method's feedback needs pre-norm residual blocks; {spec.family} "
                                     "is not declared so in its ModelSpec")
            else:
                for group in spec.linear_groups:
                    quantize_group(group, collect_hessian(block, group[0], inputs, device))
                out_q = run_block(block, inputs, device)
            out_q = method.after_block(ctx, out_q, out_fp)
        inputs = inputs.with_hidden(out_q)
        if fp_inputs is not None and not method.provides_fp_stream:
            fp_inputs = fp_inputs.with_hidden(out_fp)
        notes.append({"block": i, **ctx.notes})
        del fp_block
    return results, records, notes
