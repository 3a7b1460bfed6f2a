"""Modules a loaded quantized checkpoint is made of."""

from .quant_linear import QuantLinear

__all__ = ["QuantLinear"]
