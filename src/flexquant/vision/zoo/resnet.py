"""ResNet family (He et al. 2016, "Deep Residual Learning"; torchvision's "v1.5": the stride of a
bottleneck sits on its 3×3 convolution), with torchvision's module names so its state dicts load strictly.

Layout: ``conv1`` (7×7/2) ``bn1`` ``relu`` ``maxpool`` (3×3/2) → ``layer1..layer4`` (stages of blocks,
strides 1, 2, 2, 2; widths 64, 128, 256, 512 × the block's expansion) → ``avgpool`` → ``fc``.
A block whose input and output shapes differ gets ``downsample = Sequential(1×1 conv, BatchNorm)``.
ResNeXt and Wide ResNet are bottleneck ResNets with grouped or wider 3×3 convolutions.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn


def _projection(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    """The shortcut's 1×1 projection when the residual branch changes shape, else None (identity)."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Two 3×3 convolutions (the first may stride) plus the shortcut, then ReLU."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, groups: int = 1, base_width: int = 64) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("the basic block has no grouped or widened variant")
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _projection(cin, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + shortcut)


class Bottleneck(nn.Module):
    """1×1 reduce → 3×3 (strided, possibly grouped) → 1×1 expand (×4), plus the shortcut, then ReLU."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, groups: int = 1, base_width: int = 64) -> None:
        super().__init__()
        inner = int(planes * base_width / 64) * groups
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, inner, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = nn.Conv2d(inner, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + shortcut)


class ResNet(nn.Module):
    """An ImageNet ResNet: `depths` blocks of type `block` in each of the four stages."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        depths: tuple[int, int, int, int],
        num_classes: int = 1000,
        groups: int = 1,
        width_per_group: int = 64,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for index, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths), start=1):
            blocks = []
            for i in range(depth):
                stride = 2 if (i == 0 and index > 1) else 1
                blocks.append(block(cin, planes, stride, groups, width_per_group))
                cin = planes * block.expansion
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)
        # He-normal convolutions (fan-out), unit BatchNorm; the classifier keeps PyTorch's default init
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# name → (block, blocks per stage, groups, width per group)
_CONFIGS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 1, 64),
    "resnet34": (BasicBlock, (3, 4, 6, 3), 1, 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 1, 64),
    "resnet101": (Bottleneck, (3, 4, 23, 3), 1, 64),
    "resnet152": (Bottleneck, (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": (Bottleneck, (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": (Bottleneck, (3, 4, 23, 3), 32, 8),
    "resnext101_64x4d": (Bottleneck, (3, 4, 23, 3), 64, 4),
    "wide_resnet50_2": (Bottleneck, (3, 4, 6, 3), 1, 128),
    "wide_resnet101_2": (Bottleneck, (3, 4, 23, 3), 1, 128),
}


def _build(name: str, num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    block, depths, groups, width = _CONFIGS[name]
    return ResNet(block, depths, num_classes, groups, width, in_channels)


BUILDERS = {name: partial(_build, name) for name in _CONFIGS}
