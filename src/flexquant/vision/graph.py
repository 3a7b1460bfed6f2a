"""Model surgery: fold BatchNorm into convolutions, cut a classifier into blocks, wrap layers for quantization.

Architecture knowledge is data: an `ArchSpec` per family says which attributes identify it and how it
splits into stem → residual blocks → head. The split is checked against the original model's output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import VisionError
from .quantizers import QuantLayer

log = logging.getLogger(__name__)


class BlockSequence(nn.Module):
    """A classifier as a plain sequence of parts (stem, blocks, head); forward can run any slice."""

    def __init__(self, names: list[str], parts: list[nn.Module]) -> None:
        super().__init__()
        self.names = list(names)
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        for part in self.parts[start:stop]:
            x = part(x)
        return x


# -- BatchNorm folding -----------------------------------------------------------------------------


def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv ← bn ∘ conv (eval-mode statistics): W' = W·γ/σ, b' = (b − μ)·γ/σ + β."""
    with torch.no_grad():
        inv_std = torch.rsqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.weight is not None else torch.ones_like(inv_std)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(inv_std)
        scale = gamma * inv_std
        b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
        conv.bias = nn.Parameter((b - bn.running_mean) * scale + beta)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _conv_bn_pairs_fx(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) module names where the BN reads only that conv's output, found on the traced graph."""
    gm = torch.fx.symbolic_trace(model)
    mods = dict(model.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(mods.get(src.target), nn.Conv2d)
            and len(src.users) == 1
        ):
            pairs.append((src.target, node.target))
    return pairs


def _conv_bn_pairs_sequential(model: nn.Module) -> list[tuple[str, str]]:
    """Fallback for untraceable models: a Conv2d directly followed by a BatchNorm2d inside a Sequential."""
    pairs = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Sequential):
            kids = list(mod.named_children())
            for (a, m1), (b, m2) in zip(kids, kids[1:]):
                if isinstance(m1, nn.Conv2d) and isinstance(m2, nn.BatchNorm2d):
                    prefix = f"{name}." if name else ""
                    pairs.append((prefix + a, prefix + b))
    return pairs


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every conv→BN pair in place (BN replaced by Identity); returns the model. Model must be in eval."""
    try:
        pairs = _conv_bn_pairs_fx(model)
    except Exception as exc:  # noqa: BLE001 - tracing fails on data-dependent control flow; fall back
        log.warning("fx tracing failed (%s); folding only Conv2d→BatchNorm2d inside nn.Sequential", exc)
        pairs = _conv_bn_pairs_sequential(model)
    for conv_name, bn_name in pairs:
        _fold_into(model.get_submodule(conv_name), model.get_submodule(bn_name))
        _set_submodule(model, bn_name, nn.Identity())
    left = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        log.warning("%d BatchNorm layers could not be folded and stay in full precision: %s", len(left), left[:5])
    return model


# -- architecture specs ----------------------------------------------------------------------------


def _pool_head(pool: nn.Module, fc: nn.Module) -> nn.Module:
    return nn.Sequential(pool, nn.Flatten(1), fc)


def _split_resnet(m: nn.Module) -> list[tuple[str, nn.Module]]:
    parts = [("stem", nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool))]
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        if hasattr(m, layer):
            parts += [(f"{layer}.{i}", block) for i, block in enumerate(getattr(m, layer))]
    return parts + [("head", _pool_head(m.avgpool, m.fc))]


def _split_mobilenet_v2(m: nn.Module) -> list[tuple[str, nn.Module]]:
    feats = list(m.features)
    parts = [("stem", feats[0])] + [(f"features.{i}", f) for i, f in enumerate(feats[1:], start=1)]
    # torchvision's MobileNetV2.forward pools with adaptive_avg_pool2d(x, (1, 1)) then flattens
    return parts + [("head", _pool_head(nn.AdaptiveAvgPool2d((1, 1)), m.classifier))]


def _split_regnet(m: nn.Module) -> list[tuple[str, nn.Module]]:
    parts = [("stem", m.stem)]
    for stage_name, stage in m.trunk_output.named_children():
        parts += [(f"{stage_name}.{name}", block) for name, block in stage.named_children()]
    return parts + [("head", _pool_head(m.avgpool, m.fc))]


def _split_sequential(m: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, child) for name, child in m.named_children()]


@dataclass(frozen=True)
class ArchSpec:
    """How one family of classifiers splits into stem, residual blocks and head."""

    name: str
    matches: Callable[[nn.Module], bool]
    split: Callable[[nn.Module], list[tuple[str, nn.Module]]]


def _has(*attrs: str) -> Callable[[nn.Module], bool]:
    return lambda m: all(hasattr(m, a) for a in attrs)


ARCH_SPECS: list[ArchSpec] = [
    ArchSpec("resnet", _has("conv1", "bn1", "relu", "maxpool", "layer1", "avgpool", "fc"), _split_resnet),
    ArchSpec("mobilenet_v2", _has("features", "classifier"), _split_mobilenet_v2),
    ArchSpec("regnet", _has("stem", "trunk_output", "avgpool", "fc"), _split_regnet),
    ArchSpec("sequential", lambda m: isinstance(m, nn.Sequential), _split_sequential),
]


def split_model(
    model: nn.Module, probe: torch.Tensor | None = None, reference: nn.Module | None = None
) -> BlockSequence:
    """Cut `model` into a `BlockSequence` sharing its modules.

    With `probe`, the sequence's output is compared with `reference` (default: `model`) so an
    unsupported forward (extra ops between blocks) is an error instead of silently wrong quantization.
    """
    spec = next((s for s in ARCH_SPECS if s.matches(model)), None)
    if spec is None:
        raise VisionError(
            f"cannot split {type(model).__name__} into blocks: supported are ResNet-, MobileNetV2- and "
            "RegNet-style classifiers (torchvision attribute names) and nn.Sequential"
        )
    names, parts = zip(*spec.split(model))
    seq = BlockSequence(list(names), list(parts))
    if probe is not None:
        with torch.no_grad():
            want = (reference or model)(probe)
            got = seq(probe)
        if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-3, atol=1e-4 * want.abs().max().item()):
            raise VisionError(
                f"{type(model).__name__} looks like a {spec.name} but its forward does more than run the blocks "
                "in sequence; wrap it as an nn.Sequential of blocks"
            )
    return seq


# -- wrapping --------------------------------------------------------------------------------------


def quantizable_layers(seq: BlockSequence) -> list[str]:
    """Qualified names of every Conv2d/Linear in forward (registration) order."""
    return [n for n, m in seq.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def layer_bits(seq: BlockSequence, w_bits: int, a_bits: int, first_last_bits: int) -> dict[str, dict]:
    """Per-layer settings: first and last layers at `first_last_bits` (weights and their input)."""
    names = quantizable_layers(seq)
    if not names:
        raise VisionError("the model has no Conv2d or Linear layer to quantize")
    first, last = names[0], names[-1]
    return {
        n: {
            "w_bits": first_last_bits if n in (first, last) else w_bits,
            "a_bits": first_last_bits if n in (first, last) else a_bits,
            "a_signed": None,
        }
        for n in names
    }


def wrap_layers(seq: BlockSequence, settings: dict[str, dict], calibrate: bool = True) -> None:
    """Replace each listed Conv2d/Linear by a `QuantLayer` in place."""
    present = set(quantizable_layers(seq))
    if present != set(settings):
        missing, extra = sorted(set(settings) - present), sorted(present - set(settings))
        raise VisionError(
            f"layer mismatch with the quantization settings: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for name, s in settings.items():
        layer = seq.get_submodule(name)
        _set_submodule(seq, name, QuantLayer(layer, s["w_bits"], s["a_bits"], s["a_signed"], calibrate=calibrate))


def quant_layers(module: nn.Module) -> list[QuantLayer]:
    """The `QuantLayer`s inside a module, in order."""
    return [m for m in module.modules() if isinstance(m, QuantLayer)]
