"""The block-by-block pipeline: capture block-0 inputs, quantize blocks in order, feed outputs forward."""

from .blocks import BlockContext, LinearRecord, Method, quantize_blocks
from .capture import BlockInputs, capture_block_inputs, run_block
from .hooks import collect_hessian, onload

__all__ = [
    "BlockContext",
    "BlockInputs",
    "LinearRecord",
    "Method",
    "capture_block_inputs",
    "collect_hessian",
    "onload",
    "quantize_blocks",
    "run_block",
]
