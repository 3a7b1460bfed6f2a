"""Plain-PyTorch definitions of torchvision's ResNet, MobileNetV2 and RegNet families.

Written from the papers, with torchvision's module and parameter names, so a torchvision state dict
(converted to safetensors) loads into them with ``strict=True`` and `flexquant.vision.graph` splits them
exactly like torchvision's own classes. `flexquant.vision.build_model` uses them when torchvision
cannot be imported (its PyPI wheels for recent torch are CUDA builds that fail on a CPU-only torch).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from . import mobilenetv2, regnet, resnet

ZOO: dict[str, Callable[..., nn.Module]] = {**resnet.BUILDERS, **mobilenetv2.BUILDERS, **regnet.BUILDERS}

__all__ = ["ZOO"]
