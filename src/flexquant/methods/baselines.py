"""The baselines: RTN (data-free) and GPTQ (Hessian-aware), as recipes over the pipeline."""

from __future__ import annotations

import dataclasses

from ..pipeline import Method
from ..quant import gptq_quantize, rtn_quantize
from .registry import register


@register
class RTN(Method):
    """Round to nearest per group: no data."""

    name = "rtn"
    needs_calibration = False
    targets = ("flexquant", "vllm", "gptqmodel", "gguf")

    def quantize_linear(self, ctx, name, W, H):
        return rtn_quantize(W, self.config.grid)


@register
class GPTQ(Method):
    """GPTQ: column-by-column rounding with Hessian-based error compensation."""

    name = "gptq"
    targets = ("flexquant", "vllm", "gptqmodel", "gguf")

    def quantize_linear(self, ctx, name, W, H):
        gptq = self.config.gptq
        if gptq.act_order and not self.act_order_for(name):
            gptq = dataclasses.replace(gptq, act_order=False)
        return gptq_quantize(W, H, self.config.grid, gptq)
