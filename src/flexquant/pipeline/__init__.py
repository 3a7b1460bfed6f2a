"""The block-by-block pipeline: the full-precision statistics pass, then the sequential block loop."""

from .blocks import LinearRecord, quantize_blocks
from .capture import BlockInputs, capture_block_inputs, run_block
from .hooks import collect_hessian, onload
from .method import BlockContext, Method
from .run import prepare_model, quantize_model
from .statistics import FPStatistics, StatsRequest, fp_statistics
from .store import ActivationStore, MemoryStore

__all__ = [
    "ActivationStore",
    "BlockContext",
    "BlockInputs",
    "FPStatistics",
    "LinearRecord",
    "MemoryStore",
    "Method",
    "StatsRequest",
    "capture_block_inputs",
    "collect_hessian",
    "fp_statistics",
    "onload",
    "prepare_model",
    "quantize_blocks",
    "quantize_model",
    "run_block",
]
