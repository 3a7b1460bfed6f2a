"""RegNetX / RegNetY (Radosavovic et al. 2020, "Designing Network Design Spaces") with torchvision's
module names, so its state dicts load strictly.

Widths follow the paper's linear-then-quantised rule: block j gets u_j = w_0 + w_a·j, snapped to
w_0·w_m^round(log(u_j/w_0)/log(w_m)) and rounded to a multiple of 8; runs of equal width form the stages
(each starting with stride 2). Layout: ``stem`` (3×3/2 conv unit, 32 channels) → ``trunk_output`` =
``Sequential(block1, block2, ...)``, stage k holding blocks ``block{k}-{i}`` → ``avgpool`` → ``fc``.
A block is ``f = Sequential(a: 1×1 unit, b: 3×3 grouped unit (strided), [se: squeeze-excitation,]
c: 1×1 conv + BN)``, plus ``proj`` (1×1 conv + BN) on the shortcut when the shape changes, then ReLU.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial

import torch
from torch import nn

from .layers import conv_norm_act, round_to_multiple


def stage_plan(
    depth: int, w_0: int, w_a: float, w_m: float, group_width: int, bottleneck_ratio: float = 1.0
) -> list[tuple[int, int, int]]:
    """(width, number of blocks, group width) per stage, from the design-space parameters."""
    if w_a < 0 or w_0 <= 0 or w_m <= 1 or w_0 % 8:
        raise ValueError("RegNet needs w_a >= 0, w_0 > 0 divisible by 8 and w_m > 1")
    # float32 like the reference implementation, so widths that land near a rounding edge agree
    linear = torch.arange(depth, dtype=torch.float32, device="cpu") * w_a + w_0
    steps = torch.round(torch.log(linear / w_0) / math.log(w_m))
    widths = (torch.round(w_0 * torch.pow(w_m, steps) / 8) * 8).int().tolist()
    plan: list[list[int]] = []
    for w in widths:
        if plan and plan[-1][0] == w:
            plan[-1][1] += 1
        else:
            plan.append([w, 1])
    out = []
    for width, blocks in plan:  # make the bottleneck width a multiple of the (possibly shrunk) group width
        inner = int(width * bottleneck_ratio)
        g = min(group_width, inner)
        out.append((int(round_to_multiple(inner, g) / bottleneck_ratio), blocks, g))
    return out


class SqueezeExcitation(nn.Module):
    """Channel gating: global pool → 1×1 conv → ReLU → 1×1 conv → sigmoid, times the input."""

    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return x * self.scale_activation(gate)


class ResBottleneckBlock(nn.Module):
    """The X block (Y with squeeze-excitation): residual bottleneck with a grouped 3×3 convolution."""

    def __init__(
        self, cin: int, cout: int, stride: int, group_width: int, bottleneck_ratio: float, se_ratio: float | None
    ) -> None:
        super().__init__()
        self.proj = None
        if cin != cout or stride != 1:
            self.proj = conv_norm_act(cin, cout, 1, stride, activation=None)
        inner = int(round(cout * bottleneck_ratio))
        units: OrderedDict[str, nn.Module] = OrderedDict()
        units["a"] = conv_norm_act(cin, inner, 1)
        units["b"] = conv_norm_act(inner, inner, 3, stride, groups=inner // group_width)
        if se_ratio:
            units["se"] = SqueezeExcitation(inner, int(round(se_ratio * cin)))
        units["c"] = conv_norm_act(inner, cout, 1, activation=None)
        self.f = nn.Sequential(units)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return self.activation(shortcut + self.f(x))


class RegNet(nn.Module):
    """A RegNet from its design-space parameters (see `stage_plan`)."""

    def __init__(
        self,
        depth: int,
        w_0: int,
        w_a: float,
        w_m: float,
        group_width: int,
        se_ratio: float | None = None,
        num_classes: int = 1000,
        in_channels: int = 3,
        stem_width: int = 32,
        bottleneck_ratio: float = 1.0,
    ) -> None:
        super().__init__()
        self.stem = conv_norm_act(in_channels, stem_width, 3, 2)
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        cin = stem_width
        for k, (width, blocks, g) in enumerate(stage_plan(depth, w_0, w_a, w_m, group_width, bottleneck_ratio), 1):
            stage = nn.Sequential()
            for i in range(blocks):
                block = ResBottleneckBlock(cin, width, 2 if i == 0 else 1, g, bottleneck_ratio, se_ratio)
                stage.add_module(f"block{k}-{i}", block)
                cin = width
            stages[f"block{k}"] = stage
        self.trunk_output = nn.Sequential(stages)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)
        # normal(0, sqrt(2 / (k·k·out))) convolutions, unit BatchNorm, a small-normal classifier
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trunk_output(self.stem(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# name → (depth, w_0, w_a, w_m, group width, squeeze-excitation ratio), the paper's models (its table 4 onwards)
_CONFIGS = {
    "regnet_x_400mf": (22, 24, 24.48, 2.54, 16, None),
    "regnet_x_800mf": (16, 56, 35.73, 2.28, 16, None),
    "regnet_x_1_6gf": (18, 80, 34.01, 2.25, 24, None),
    "regnet_x_3_2gf": (25, 88, 26.31, 2.25, 48, None),
    "regnet_y_400mf": (16, 48, 27.89, 2.09, 8, 0.25),
    "regnet_y_800mf": (14, 56, 38.84, 2.4, 16, 0.25),
    "regnet_y_1_6gf": (27, 48, 20.71, 2.65, 24, 0.25),
    "regnet_y_3_2gf": (21, 80, 42.63, 2.66, 24, 0.25),
}


def _build(name: str, num_classes: int = 1000, in_channels: int = 3) -> RegNet:
    depth, w_0, w_a, w_m, g, se = _CONFIGS[name]
    return RegNet(depth, w_0, w_a, w_m, g, se, num_classes=num_classes, in_channels=in_channels)


BUILDERS = {name: partial(_build, name) for name in _CONFIGS}
