"""One method over one model: prepare -> statistics pass -> plan -> block loop (DESIGN.md, data flow 3-6)."""

from __future__ import annotations

import torch
from torch import nn

from ..models.spec import ModelSpec
from ..quant.targets import get_target
from ..transforms.permute import fold_sites
from .blocks import quantize_blocks
from .distributed import SINGLE, Dist
from .method import Method
from .statistics import FPStatistics, fp_statistics
from .store import ActivationStore


def prepare_model(model: nn.Module, spec: ModelSpec, method: Method, calib_ids: torch.Tensor | None,
                  device: torch.device, batch_size: int = 8, progress: bool = False,
                  store: ActivationStore | None = None, dist: Dist = SINGLE, start: int = 0) -> FPStatistics | None:
    """The method's whole-model steps before the block loop: its transforms, the statistics pass it asks
    for, and its plan. Returns the statistics (their FP stream, from block ``start``, serves the block loop)."""
    if not get_target(method.config.target).permutation:
        method.fold_sites = fold_sites(spec)
    request = method.prepare(model, spec)
    stats = None
    if request is not None:
        stats = fp_statistics(model, spec, calib_ids, device, batch_size, request, progress, store, dist, start)
    method.plan(model, spec, stats, calib_ids, device)
    if stats is not None:
        stats.hessians.clear()  # the plan has used them; the block loop collects its own
        stats.fisher.clear()
    return stats


def quantize_model(model: nn.Module, spec: ModelSpec, method: Method, calib_ids: torch.Tensor | None,
                   device: torch.device, batch_size: int = 8, progress: bool = True,
                   store: ActivationStore | None = None, on_block=None, dist: Dist = SINGLE):
    """Quantize ``model`` in place with ``method``; returns quantize_blocks' (results, records, notes).
    ``store`` keeps the activations between blocks; ``on_block`` receives each finished block
    (`quantize_blocks`). ``dist``: this rank of a distributed run (`pipeline.distributed`); every rank ends
    with the same model."""
    stats = prepare_model(model, spec, method, calib_ids, device, batch_size, progress, store, dist)
    return quantize_blocks(model, spec, method, calib_ids if method.needs_calibration else None, device,
                           batch_size, progress, stats=stats, store=store, on_block=on_block, dist=dist)
