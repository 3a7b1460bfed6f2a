"""Quantization primitives: grids, Hessians, RTN, GPTQ and the canonical `QuantResult`."""

from .gptq import gptq_quantize
from .grid import choose_qparams, dequantize, quantize
from .hessian import HessianAccumulator
from .result import FP16_BITS, QuantResult
from .rtn import rtn_quantize

__all__ = [
    "FP16_BITS",
    "HessianAccumulator",
    "QuantResult",
    "choose_qparams",
    "dequantize",
    "gptq_quantize",
    "quantize",
    "rtn_quantize",
]
