"""Fake quantization of activations and of the K/V cache for weight-activation methods."""

from .quantizers import fake_quant_asym, fake_quant_sym, fake_quant_weight
from .runtime import ActQuantRuntime, KVQuantizer, SiteQuantizer, attach, install, remove, stored_bits

__all__ = [
    "ActQuantRuntime",
    "KVQuantizer",
    "SiteQuantizer",
    "attach",
    "fake_quant_asym",
    "fake_quant_sym",
    "fake_quant_weight",
    "install",
    "remove",
    "stored_bits",
]
