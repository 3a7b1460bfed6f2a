"""Building blocks shared by the torchvision-compatible definitions.

A "conv-norm-act" unit is a plain `nn.Sequential` whose children are named ``0`` (the convolution),
``1`` (BatchNorm) and ``2`` (the activation, when there is one): that is how torchvision lays out its
conv units in a state dict, so checkpoints written by torchvision load into these models unchanged.
"""

from __future__ import annotations

from typing import Callable

from torch import nn


def round_to_multiple(value: float, divisor: int, min_value: int | None = None) -> int:
    """`value` rounded to the nearest multiple of `divisor` (at least `min_value`, by default `divisor`),
    moved up one step when rounding down would lose more than 10% (the MobileNet/RegNet channel rule)."""
    floor = divisor if min_value is None else min_value
    rounded = max(floor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_norm_act(
    cin: int,
    cout: int,
    kernel_size: int = 3,
    stride: int = 1,
    groups: int = 1,
    activation: Callable[..., nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    """Conv (no bias, 'same' padding for odd kernels) → BatchNorm → optional activation (in place)."""
    units: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel_size, stride, padding=(kernel_size - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if activation is not None:
        units.append(activation(inplace=True))
    return nn.Sequential(*units)
