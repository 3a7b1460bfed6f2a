"""The one full-precision statistics pass (DESIGN.md, data flow steps 3-4): every method that needs more than
the block loop's own Hessians asks for it with a `StatsRequest` and never walks the blocks itself.

One forward pass over the first ``windows`` calibration windows, block by block, on the (transformed)
full-precision model gives, as requested:
* the input Hessian H = 2XXᵀ/T of every linear (one tensor per linear group, shared by its linears);
* the output Fisher of every linear (`pipeline.sensitivity.output_fisher`) over the first batches covering
  ``fisher_windows``;
* the block inputs of the first ``keep_windows`` windows of every block, in an `ActivationStore`, with the
  last block's outputs: the block loop offers them as the full-precision stream (LFD's feedback targets,
  the learned quantizers' targets);
* a call ``on_block(index, block, inputs, outputs, device)`` with the block on the device, for per-block
  calibration on full-precision inputs (the next block still receives the outputs computed before it).

Distributed (`pipeline.distributed`): each rank runs its share of the batches and the Hessians and the Fisher
are all-reduced; a request with ``on_block`` (training on the windows themselves) runs all of them on every rank.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.spec import ModelSpec
from .capture import BlockInputs, capture_block_inputs, run_block
from .distributed import SINGLE, Dist
from .hooks import collect_hessian, onload
from .prenorm import prenorm_applicable, quantize_prenorm_block
from .sensitivity import output_fisher
from .store import ActivationStore, MemoryStore


@dataclass(frozen=True)
class StatsRequest:
    """What a method needs from the full-precision statistics pass."""

    windows: int  # the first calibration windows the pass runs on
    hessians: bool = True
    fisher_windows: int = 0  # 0 = no Fisher; else the whole batches from the start that cover this many windows
    keep_windows: int = 0  # FP block inputs kept for the block loop (the first windows); 0 = none
    batch_size: int | None = None  # windows per forward; None = the run's
    on_block: Callable | None = None


@dataclass
class FPStatistics:
    """The pass's results (CPU tensors)."""

    windows: int
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: ActivationStore = field(default_factory=MemoryStore)
    last_output: list[torch.Tensor] = field(default_factory=list)  # the last block's outputs, kept windows
    seconds: float = 0.0  # wall time of the pass

    def fp_outputs(self, index: int, blocks: int) -> list[torch.Tensor] | None:
        """Block ``index``'s FP outputs for the kept windows: the next block's kept inputs."""
        nxt = self.inputs.get(index + 1) if index + 1 < blocks else None
        return nxt.hidden if nxt is not None else (self.last_output or None)


def batches_covering(sizes: list[int], windows: int) -> int:
    """How many of the first batches (of ``sizes`` windows) hold at least ``windows`` windows (at least one)."""
    have = 0
    for count, size in enumerate(sizes, 1):
        have += size
        if have >= windows:
            return count
    return len(sizes)


def first_windows(inputs: BlockInputs, windows: int) -> BlockInputs:
    """The first ``windows`` windows of stored block inputs (a partial last batch is cut)."""
    hidden, left = [], windows
    for h in inputs.hidden:
        if left <= 0:
            break
        hidden.append(h[:left])
        left -= h.shape[0]
    return BlockInputs(hidden, inputs.kwargs[: len(hidden)])


def _block_hessians(block: nn.Module, spec: ModelSpec, inputs: BlockInputs, device, keep,
                    dist: Dist = SINGLE) -> list[torch.Tensor]:
    """Run ``block`` (unchanged) over ``inputs``, handing each linear group's H to ``keep``; its outputs."""
    if prenorm_applicable(spec, inputs, block):
        return quantize_prenorm_block(block, spec, inputs, device, lambda group, H, D=None: keep(group, H),
                                      dist=dist)
    for group in spec.linear_groups:
        keep(group, collect_hessian(block, group[0], inputs, device, dist))
    return run_block(block, inputs, device)


@torch.no_grad()
def fp_statistics(model: nn.Module, spec: ModelSpec, calib_ids: torch.Tensor, device: torch.device,
                  batch_size: int, request: StatsRequest, progress: bool = False, dist: Dist = SINGLE) -> FPStatistics:
    """Run the statistics pass of ``request`` over ``calib_ids[:request.windows]`` (this rank's batches of them)."""
    t0 = time.perf_counter()
    layers = model.get_submodule(spec.layers)
    calib = calib_ids[: max(1, min(calib_ids.shape[0], request.windows))]
    bs = request.batch_size or batch_size
    dist = dist if request.on_block is None else SINGLE
    local = dist.shard(calib, bs)
    inputs = capture_block_inputs(model, spec, local, device, bs)
    stats = FPStatistics(windows=calib.shape[0])
    sizes = [min(bs, calib.shape[0] - s) for s in range(0, calib.shape[0], bs)]  # all ranks' batches
    nb = dist.local_batches(batches_covering(sizes, request.fisher_windows))
    keep_windows = dist.local_windows(calib.shape[0], bs, request.keep_windows)
    fisher_inputs: list[BlockInputs] = []
    for i, block in enumerate(tqdm(layers, desc="full-precision statistics", disable=not progress)):
        with onload(block, device):
            if request.hessians:
                def keep(group, H, i=i):
                    for n in group:
                        stats.hessians[f"{spec.layers}.{i}.{n}"] = H.cpu()
                out = _block_hessians(block, spec, inputs, device, keep, dist)
            else:
                out = run_block(block, inputs, device)
            if request.on_block is not None:
                request.on_block(i, block, inputs, out, device)
        if request.fisher_windows:
            fisher_inputs.append(BlockInputs(inputs.hidden[:nb], inputs.kwargs[:nb]))
        if request.keep_windows:
            stats.inputs.put(i, first_windows(inputs, keep_windows))
        inputs = inputs.with_hidden(out)
    if request.fisher_windows:
        ids = local[: sum(h.shape[0] for h in fisher_inputs[0].hidden)]
        stats.fisher = output_fisher(model, spec, fisher_inputs, inputs.hidden[:nb], ids, device, progress=False,
                                     dist=dist)
    if request.keep_windows:
        stats.last_output = first_windows(inputs, keep_windows).hidden
    stats.seconds = time.perf_counter() - t0
    return stats
