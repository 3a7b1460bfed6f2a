"""The baselines: RTN (data-free) and GPTQ (Hessian-aware), as recipes over the pipeline."""

from __future__ import annotations

from ..config import QuantConfig
from ..pipeline import Method
from ..quant import gptq_quantize, rtn_quantize
from .registry import register


class RTN(Method):
    name = "rtn"
    needs_calibration = False

    def __init__(self, config: QuantConfig):
        self.config = config

    def quantize_linear(self, ctx, name, W, H):
        return rtn_quantize(W, self.config.grid)


class GPTQ(Method):
    name = "gptq"

    def __init__(self, config: QuantConfig):
        self.config = config

    def quantize_linear(self, ctx, name, W, H):
        return gptq_quantize(W, H, self.config.grid, self.config.gptq)


register("rtn")(RTN)
register("gptq")(GPTQ)
