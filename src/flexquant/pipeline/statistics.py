"""The one full-precision statistics pass (DESIGN.md, data flow steps 3-4): every method that needs more than
the block loop's own Hessians asks for it with a `StatsRequest` and never walks the blocks itself.

One forward pass over the first ``windows`` calibration windows, block by block, on the (transformed)
full-precision model gives, as requested:
* the input Hessian H = 2XXᵀ/T of every linear (one tensor per linear group, shared by its linears);
* the output Fisher of every linear (`pipeline.sensitivity.output_fisher`) over the first batches covering
  ``fisher_windows``;
* the block inputs of the first ``keep_windows`` windows of the block the block loop starts at (in float32, in
  an `ActivationStore`): the block loop carries the full-precision stream on from there, one block at a time
  (LFD's feedback targets, the learned quantizers' targets);
* a call ``on_block(index, block, inputs, outputs, device)`` with the block on the device, for per-block
  calibration on full-precision inputs (the next block still receives the outputs computed before it);
* a call ``on_hessians(index, block, {linear path: H}, fisher)`` with each block's Hessians instead of keeping
  them, for a method that reduces them to something small at once (FlexibleLLM's error tables). With a Fisher
  request the Fisher then comes first, in its own pass over its windows, so that it is known there: the
  Hessians never pile up over the blocks (a Hessian of a 70B model's down_proj is 3.3 GB).

Distributed (`pipeline.distributed`): each rank runs its share of the batches and the Hessians and the Fisher
are reduced; a request with ``on_block`` (training on the windows themselves) runs all of them on every rank.
"""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.spec import ModelSpec
from ..models.stream import residency
from .capture import BlockInputs, capture_block_inputs, run_block
from .distributed import SINGLE, Dist
from .hooks import collect_hessian
from .prenorm import MAX_CACHE_BYTES, cache_limit, prenorm_applicable, quantize_prenorm_block
from .progress import BlockProgress
from .sensitivity import output_fisher
from .store import ActivationStore, MemoryStore, TensorMap


@dataclass(frozen=True)
class StatsRequest:
    """What a method needs from the full-precision statistics pass."""

    windows: int  # the first calibration windows the pass runs on
    hessians: bool = True
    fisher_windows: int = 0  # 0 = no Fisher; else the whole batches from the start that cover this many windows
    keep_windows: int = 0  # FP stream of the block loop (the first windows); 0 = none
    batch_size: int | None = None  # windows per forward; None = the run's
    on_block: Callable | None = None
    on_hessians: Callable | None = None  # (index, block, {path: H}, fisher) per block; the Hessians are not kept


@dataclass
class FPStatistics:
    """The pass's results (CPU tensors)."""

    windows: int
    hessians: MutableMapping[str, torch.Tensor] = field(default_factory=dict)  # a `TensorMap` in the pass
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    # the FP stream by block (.get/.put/.drop): the start block's inputs, then the block loop's
    inputs: object = field(default_factory=lambda: _Keyed(MemoryStore(), "fp"))
    seconds: float = 0.0  # wall time of the pass
    store: ActivationStore = field(default_factory=MemoryStore)  # the run's store (what a plan keeps goes there)


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
                    dist: Dist = SINGLE, cap: int = MAX_CACHE_BYTES) -> list[torch.Tensor]:
    """Run ``block`` (unchanged) over ``inputs``, handing each linear group's H to ``keep``; its outputs."""
    if prenorm_applicable(spec, inputs, block, cap):
        return quantize_prenorm_block(block, spec, inputs, device, lambda group, H, D=None: keep(group, H),
                                      dist=dist)
    for group in spec.groups_in(block):
        keep(group, collect_hessian(block, group[0], inputs, device, dist))
    return run_block(block, inputs, device)


@torch.no_grad()
def fp_statistics(model: nn.Module, spec: ModelSpec, calib_ids: torch.Tensor, device: torch.device,
                  batch_size: int, request: StatsRequest, progress: bool = False,
                  store: ActivationStore | None = None, dist: Dist = SINGLE, start: int = 0) -> FPStatistics:
    """Run the statistics pass of ``request`` over ``calib_ids[:request.windows]`` (this rank's batches of them);
    what it keeps goes to ``store`` (an unbounded float32 one by default). ``start``: the block the block loop
    starts at (a resumed run's), whose inputs are the FP stream's beginning."""
    t0 = time.perf_counter()
    res = residency(model, spec)
    nblocks = len(model.get_submodule(spec.layers))
    store = store if store is not None else MemoryStore()
    calib = calib_ids[: max(1, min(calib_ids.shape[0], request.windows))]
    bs = request.batch_size or batch_size
    dist = dist if request.on_block is None else SINGLE
    local = dist.shard(calib, bs)
    with res.ends(device, (spec.embed,)):
        inputs = capture_block_inputs(model, spec, local, device, bs)
    stats = FPStatistics(windows=calib.shape[0], inputs=_Keyed(store, "fp"), hessians=TensorMap(store, "H"),
                         store=store)
    sizes = [min(bs, calib.shape[0] - s) for s in range(0, calib.shape[0], bs)]  # all ranks' batches
    nb = dist.local_batches(batches_covering(sizes, request.fisher_windows))
    keep_windows = dist.local_windows(calib.shape[0], bs, request.keep_windows)
    ids = local[: sum(h.shape[0] for h in inputs.hidden[:nb])]  # the Fisher pass's windows
    fisher_first = bool(request.fisher_windows and request.on_hessians)
    if fisher_first:  # its own pass first, so that on_hessians has it
        stats.fisher = _fisher_pass(model, spec, BlockInputs(inputs.hidden[:nb], inputs.kwargs[:nb]), ids, device,
                                    store, dist, progress)
    fisher_inputs = None if fisher_first or not request.fisher_windows else _Keyed(store, "fisher")
    for i in BlockProgress(nblocks, "full-precision statistics", progress, store=store):
        inputs = inputs.for_block(i)  # block i's arguments (masks and rotary tables may differ per block)
        with res.block(i, device) as block:
            out = _block_statistics(i, block, spec, inputs, device, request, stats, store, dist)
        if fisher_inputs is not None:
            fisher_inputs.put(i, BlockInputs(inputs.hidden[:nb], inputs.kwargs[:nb]))
        if request.keep_windows and i == start:
            stats.inputs.put(i, first_windows(inputs, keep_windows), exact=True)
        inputs = inputs.with_hidden(out)
        del out
    if fisher_inputs is not None:
        stats.fisher = output_fisher(model, spec, fisher_inputs, inputs.hidden[:nb], ids, device, progress=False,
                                     dist=dist)
        for i in range(nblocks):
            fisher_inputs.drop(i)
    stats.seconds = time.perf_counter() - t0
    return stats


def _block_statistics(i: int, block: nn.Module, spec: ModelSpec, inputs: BlockInputs, device, request: StatsRequest,
                      stats: FPStatistics, store: ActivationStore, dist: Dist) -> list[torch.Tensor]:
    """Block ``i``'s part of the pass (the block resident): its Hessians kept or handed to ``on_hessians``, then
    ``on_block``; its outputs."""
    if not request.hessians:
        out = run_block(block, inputs, device)
    else:
        mine = {} if request.on_hessians is not None else stats.hessians

        def keep(group, H):
            H = H.cpu()
            for n in group:  # one entry for the group
                mine[f"{spec.layers}.{i}.{n}"] = H

        out = _block_hessians(block, spec, inputs, device, keep, dist, cache_limit(store.max_bytes))
        if request.on_hessians is not None:
            request.on_hessians(i, block, mine, stats.fisher)
    if request.on_block is not None:
        request.on_block(i, block, inputs, out, device)
    return out


def _fisher_pass(model: nn.Module, spec: ModelSpec, inputs: BlockInputs, ids: torch.Tensor, device, store, dist,
                 progress: bool) -> dict[str, torch.Tensor]:
    """The output Fisher on its own: a forward pass over the Fisher batches keeping every block's inputs (in
    ``store``), then `output_fisher` backwards; the kept inputs are dropped."""
    res, nblocks, kept = residency(model, spec), len(model.get_submodule(spec.layers)), _Keyed(store, "fisher")
    for i in BlockProgress(nblocks, "output sensitivity (forward)", progress, store=store):
        inputs = inputs.for_block(i)
        kept.put(i, inputs)
        with res.block(i, device) as block:
            inputs = inputs.with_hidden(run_block(block, inputs, device))
    try:
        return output_fisher(model, spec, kept, inputs.hidden, ids, device, progress=False, dist=dist)
    finally:
        for i in range(nblocks):
            kept.drop(i)


class _Keyed:
    """A view of a store under one key prefix, indexed by block (what `FPStatistics.inputs` and the Fisher
    pass read)."""

    def __init__(self, store: ActivationStore, prefix: str):
        self.store, self.prefix = store, prefix

    def put(self, index: int, inputs: BlockInputs, exact: bool = False) -> None:
        self.store.put((self.prefix, index), inputs, exact)

    def get(self, index: int, lazy: bool = False) -> BlockInputs | None:
        return self.store.get((self.prefix, index), lazy)

    def __getitem__(self, index: int) -> BlockInputs:
        return self.get(index)

    def drop(self, index: int) -> None:
        self.store.drop((self.prefix, index))
