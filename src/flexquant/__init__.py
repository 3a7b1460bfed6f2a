"""flexquant: post-training quantization with honest bit accounting and packed checkpoints."""

from ._version import __version__
from .api import QuantizedModel, evaluate, export, generate, load, quantize, save  # noqa: E402
from .config import GPTQConfig, GridConfig, QuantConfig  # noqa: E402
from .errors import CheckpointError, FlexQuantError  # noqa: E402
from .quant import QuantResult, gptq_quantize, rtn_quantize  # noqa: E402

__all__ = [
    "CheckpointError",
    "FlexQuantError",
    "GPTQConfig",
    "GridConfig",
    "QuantConfig",
    "QuantResult",
    "QuantizedModel",
    "__version__",
    "evaluate",
    "export",
    "generate",
    "gptq_quantize",
    "load",
    "quantize",
    "rtn_quantize",
    "save",
]
