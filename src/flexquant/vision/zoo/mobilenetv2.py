"""MobileNetV2 (Sandler et al. 2018, "Inverted Residuals and Linear Bottlenecks") with torchvision's
module names, so its state dicts load strictly.

``features``: a 3×3/2 conv unit (32 channels), 17 inverted-residual blocks, a 1×1 conv unit to 1280
channels; then global average pooling and ``classifier = Sequential(Dropout, Linear)``. Each block is
``conv = Sequential([1×1 expand unit,] 3×3 depthwise unit, 1×1 projection conv, BatchNorm)`` with ReLU6,
the expansion left out when the factor is 1, and a residual sum when stride and channels allow it.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import conv_norm_act, round_to_multiple

# (expansion factor t, output channels c, repeats n, stride of the first repeat s), from the paper's table 2
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    """Expand (1×1) → depthwise 3×3 → linear 1×1 projection; adds the input when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: float) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        units: list[nn.Module] = []
        if expand_ratio != 1:
            units.append(conv_norm_act(cin, hidden, 1, activation=nn.ReLU6))
        units += [
            conv_norm_act(hidden, hidden, 3, stride, groups=hidden, activation=nn.ReLU6),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*units)
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """The ImageNet MobileNetV2; `width_mult` scales every layer's channels (rounded to multiples of 8)."""

    def __init__(
        self, num_classes: int = 1000, width_mult: float = 1.0, in_channels: int = 3, dropout: float = 0.2
    ) -> None:
        super().__init__()
        cin = round_to_multiple(32 * width_mult, 8)
        last = round_to_multiple(1280 * max(1.0, width_mult), 8)
        layers: list[nn.Module] = [conv_norm_act(in_channels, cin, 3, 2, activation=nn.ReLU6)]
        for t, c, n, s in STAGES:
            cout = round_to_multiple(c * width_mult, 8)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(conv_norm_act(cin, last, 1, activation=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last, num_classes))
        # He-normal convolutions (fan-out), unit BatchNorm, a small-normal classifier, zero biases
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes: int = 1000, in_channels: int = 3) -> MobileNetV2:
    return MobileNetV2(num_classes=num_classes, in_channels=in_channels)


BUILDERS = {"mobilenet_v2": mobilenet_v2}
