"""Classifiers by name: small built-in ResNet/MobileNetV2-style models and torchvision's families.

torchvision's ResNet, MobileNetV2 and RegNet names resolve to torchvision when it imports and works,
else to flexquant's own definitions (`flexquant.vision.zoo`), which have torchvision's module names: a
torchvision state dict loads into either, and a checkpoint written with one reloads with the other.
The tiny built-in models use the same blocks and attribute names (conv1/bn1/layer1/fc,
features/classifier), so everything goes through exactly the same splitting code.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

from .errors import VisionError
from .zoo import ZOO
from .zoo.layers import conv_norm_act
from .zoo.mobilenetv2 import InvertedResidual
from .zoo.resnet import BasicBlock

log = logging.getLogger(__name__)

# torchvision families this package knows how to split into blocks
TORCHVISION_PREFIXES = ("resnet", "wide_resnet", "resnext", "mobilenet_v2", "regnet_")


class TinyResNet(nn.Module):
    """A ResNet with a 3×3 stem and one BasicBlock per stage, for small images."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()  # small images: no early downsampling
        cin = widths[0]
        for i, w in enumerate(widths, start=1):
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(cin, w, stride=1 if i == 1 else 2)))
            cin = w
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            if hasattr(self, f"layer{i}"):
                x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return conv_norm_act(cin, cout, k, stride, groups, activation=nn.ReLU6)


class TinyMobileNetV2(nn.Module):
    """A MobileNetV2 with torchvision's layout (features, classifier), sized for small images."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(in_channels, width),
            InvertedResidual(width, width, 1, 2),
            InvertedResidual(width, 2 * width, 2, 4),
            InvertedResidual(2 * width, 2 * width, 1, 4),
            conv_bn_relu(2 * width, 4 * width, 1),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {"tiny_resnet": TinyResNet, "tiny_mobilenet_v2": TinyMobileNetV2}


def _try_torchvision() -> tuple[Any, str]:
    """(torchvision, "") when it imports, else (None, why not)."""
    try:
        import torchvision
    except Exception as exc:  # noqa: BLE001 - a CUDA-only wheel on a CPU torch fails with RuntimeError, not ImportError
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"{type(exc).__name__}: {detail}"
    return torchvision, ""


def _no_torchvision(why: str) -> VisionError:
    return VisionError(
        f"torchvision is needed for this model but cannot be imported ({why}). "
        f"Install the torchvision build that matches torch {torch.__version__} for your platform (PyPI's "
        f"torchvision wheels for torch 2.13 are CUDA builds and do not load on a CPU-only torch), "
        f"or use a model flexquant defines itself: {', '.join([*ZOO, *BUILTIN_MODELS])}"
    )


def import_torchvision() -> Any:
    """Import torchvision or raise a `VisionError` that says why and what to do."""
    tv, why = _try_torchvision()
    if tv is None:
        raise _no_torchvision(why)
    return tv


def _torchvision_family(name: str, num_classes: int) -> nn.Module:
    """torchvision's model when torchvision works, else flexquant's definition of the same architecture."""
    tv, why = _try_torchvision()
    if tv is None:
        if name not in ZOO:
            raise _no_torchvision(why)
        log.info("torchvision unavailable (%s): building %s from flexquant's own definition", why, name)
        return ZOO[name](num_classes=num_classes)
    try:
        builder = tv.models.get_model_builder(name)
    except (ValueError, AttributeError):  # unknown name, or a torchvision older than 0.14
        builder = None
    if builder is not None:
        try:
            model = builder(weights=None, num_classes=num_classes)
        except Exception as exc:  # noqa: BLE001 - a half-working torchvision: fall back when we can
            if name not in ZOO:
                raise VisionError(f"torchvision failed to build {name}: {type(exc).__name__}: {exc}") from None
            log.info("torchvision failed to build %s (%s): using flexquant's own definition", name, exc)
        else:
            log.info("building %s with torchvision %s", name, getattr(tv, "__version__", "?"))
            return model
    elif name in ZOO:
        log.info("torchvision %s has no %s: using flexquant's own definition", getattr(tv, "__version__", "?"), name)
    if name in ZOO:
        return ZOO[name](num_classes=num_classes)
    raise VisionError(f"torchvision has no model named {name!r}; e.g. resnet18, mobilenet_v2, regnet_x_400mf")


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """A randomly initialised classifier by name; it remembers the name so a checkpoint can rebuild it."""
    if not (isinstance(num_classes, int) and num_classes >= 2):
        raise VisionError(f"num_classes={num_classes!r} must be an integer >= 2")
    if name in BUILTIN_MODELS:
        model = BUILTIN_MODELS[name](num_classes=num_classes, in_channels=in_channels)
    elif name in ZOO or name.startswith(TORCHVISION_PREFIXES):
        if in_channels != 3:
            raise VisionError(f"torchvision model {name} takes 3-channel images, not {in_channels}")
        model = _torchvision_family(name, num_classes)
    else:
        raise VisionError(
            f"unknown model {name!r}: use a torchvision ResNet/MobileNetV2/RegNet name "
            f"(e.g. resnet18, mobilenet_v2, regnet_x_400mf) or one of {', '.join(BUILTIN_MODELS)}"
        )
    model._flexquant_arch = {"name": name, "num_classes": num_classes, "in_channels": in_channels}
    return model


def load_weights(model: nn.Module, path: str) -> None:
    """Load a safetensors state dict into the model (strict); safetensors cannot run code, unlike pickle."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    except FileNotFoundError:
        raise VisionError(f"weights file not found: {path}") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise VisionError(
            f"cannot read {path} as safetensors ({exc}); convert the checkpoint with safetensors.torch.save_file"
        ) from None
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad_shape = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or bad_shape:
        raise VisionError(
            f"{path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {sorted(bad_shape)[:3]} (check --model and the number of classes)"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
