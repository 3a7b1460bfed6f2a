"""The sequential block loop every method runs through (DESIGN.md, data flow step 6)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import FlexQuantError
from ..models.experts import CALIB_TOKENS
from ..models.spec import ModelSpec
from ..models.stream import hold_quantized, residency
from ..quant.gptq import slab_errors
from ..quant.result import QuantResult
from ..tensorio import all_finite
from ..transforms.permute import fold_permutations
from .capture import BlockInputs, capture_block_inputs, run_block
from .distributed import SINGLE, Dist
from .hooks import collect_hessian, run_capturing
from .method import BlockContext, Method
from .prenorm import MAX_CACHE_BYTES, cache_limit, mlp_chunk_bytes, prenorm_applicable, quantize_prenorm_block
from .progress import BlockProgress
from .statistics import FPStatistics
from .store import ActivationStore, Batches, KeptList, MemoryStore

log = logging.getLogger(__name__)


@dataclass
class LinearRecord:
    name: str
    shape: tuple[int, int]
    mean_bits: float
    rel_error: float | None  # tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), None without calibration data
    seconds: float
    stats: dict


def _solve(method: Method, ctx, prefix: str, name: str, linear: nn.Linear, H: torch.Tensor | None):
    t0 = time.perf_counter()
    W = linear.weight.data
    if not all_finite(W):
        raise FlexQuantError(f"weight {prefix}.{name} contains NaN or inf; the model checkpoint is corrupted")
    return method.quantize_linear(ctx, name, W, H), time.perf_counter() - t0


def _write_back(prefix: str, name: str, linear: nn.Linear, H: torch.Tensor | None, r: QuantResult, seconds: float,
                results: dict, records: list, coded: bool = True) -> None:
    t0 = time.perf_counter()
    W = linear.weight.data
    err = ref = 0.0
    for s, q in r.row_slabs(W.dtype):  # (what later blocks see: the error is of the weight written back)
        if not all_finite(q):
            raise FlexQuantError(f"quantizing {prefix}.{name} gave non-finite values: its weights reach "
                                 f"{float(W.abs().max()):.3g}, beyond what the stored float16 scales can hold")
        if H is not None:
            e, f = slab_errors(W[s], q.to(W.device), H)
            err, ref = err + e, ref + f
    rel = None if H is None else (err / ref if ref > 0 else 0.0)
    shape, dtype, device = tuple(W.shape), W.dtype, W.device
    del W  # the original let go before the quantized weight is made (a float16 8192-wide weight: 32 MiB)
    linear.weight.data = torch.empty(0, dtype=dtype, device=device)
    if not (coded and hold_quantized(linear, r)):  # (a narrow-held one computes from its codes until packed)
        linear.weight.data = r.dequantize(dtype).to(device)  # later groups and blocks see the quantized weight
    full = f"{prefix}.{name}"
    results[full] = r
    tokens = getattr(linear, CALIB_TOKENS, None)  # an expert's: how many routed tokens its Hessian saw
    records.append(LinearRecord(full, shape, r.mean_bits(), rel, seconds + time.perf_counter() - t0,
                                r.stats if tokens is None else {**r.stats, CALIB_TOKENS: tokens}))


def _quantize_one(method: Method, ctx, prefix: str, name: str, linear: nn.Linear,
                  H: torch.Tensor | None, results: dict, records: list) -> None:
    _write_back(prefix, name, linear, H, *_solve(method, ctx, prefix, name, linear, H), results, records,
                not method.fold_sites)


def _quantize_group(method: Method, ctx: BlockContext, group, H, results: dict, records: list) -> None:
    """Quantize the linears of one group (they share H and write nothing another one reads): linear k is
    solved by rank ``ctx.dist.owner(k)`` and its result broadcast, so every rank writes the same weights back."""
    dist = ctx.dist
    solved = {k: _solve(method, ctx, ctx.prefix, name, ctx.block.get_submodule(name), H)
              for k, name in enumerate(group) if dist.owner(k) == dist.rank}
    for k, name in enumerate(group):
        r, seconds = dist.broadcast_result(solved.get(k), dist.owner(k), ctx.device)
        _write_back(ctx.prefix, name, ctx.block.get_submodule(name), H, r, seconds, results, records,
                    not method.fold_sites)


@torch.no_grad()
def quantize_blocks(model: nn.Module, spec: ModelSpec, method: Method, calib_ids: torch.Tensor | None,
                    device: torch.device, batch_size: int = 8, progress: bool = True, fast: bool = True,
                    stats: FPStatistics | None = None, store: ActivationStore | None = None,
                    on_block=None, start: int = 0, inputs: BlockInputs | None = None,
                    records: list | None = None, notes: list | None = None, dist: Dist = SINGLE):
    """Quantize every linear of every decoder block in place (fake-quant weights written back).

    ``fast`` uses the cached-activation path for pre-norm residual blocks (same result, fewer FLOPs).
    ``stats`` (from the statistics pass): when it kept the start block's full-precision inputs, the loop carries
    that FP stream on (`_fp_stream_on`) and offers it as ``ctx.fp_inputs``; with ``method.feedback_groups`` the
    inputs of those linears on it give the GPTAQ cross terms. The block's FP outputs reach ``after_block``.
    ``store`` keeps the quantized stream between blocks. ``on_block(i, block, results)``, when given, receives
    each finished block (still resident, its fake-quant weights in place) with its {path: QuantResult}, and the
    results are not kept here. ``start``/``inputs``: resume at block ``start`` whose quantized-stream inputs
    are ``inputs``. ``records``/``notes``: lists to extend (a resumed run's earlier blocks are in them).
    ``dist``: this rank runs its share of the calibration batches; Hessians are reduced and the solves of each
    group divided among the ranks (`pipeline.distributed`).

    Returns ({module path: QuantResult}, [LinearRecord], [per-block notes]).
    """
    res, layers = residency(model, spec), model.get_submodule(spec.layers)
    store = store if store is not None else MemoryStore()
    results: dict[str, QuantResult] = {}
    records = records if records is not None else []
    notes = notes if notes is not None else []
    bar = BlockProgress(len(layers), f"{method.name} blocks", progress, start, store)

    def finish(i, block, mine):
        if on_block is not None:
            on_block(i, block, mine)
        else:
            results.update(mine)

    if not method.needs_calibration:
        for i in bar:
            with res.block(i, device) as block:
                mine: dict[str, QuantResult] = {}
                for name in spec.linears_in(block):
                    _quantize_one(method, None, f"{spec.layers}.{i}", name, block.get_submodule(name),
                                  None, mine, records)
                finish(i, block, mine)
        return results, records, notes

    reserve_working_set(store, layers, res.block_weights_dtype(), _batch_bytes(model, calib_ids, batch_size))
    if inputs is None:
        with res.ends(device, (spec.embed,)):
            inputs = capture_block_inputs(model, spec, dist.shard(calib_ids, batch_size), device, batch_size)
    store.put("stream", inputs)
    del inputs
    for i in bar:
        # batches read as they are used (no full working copy), with this block's arguments
        inputs = store.get("stream", lazy=True).for_block(i)
        fp_exact = stats.inputs.get(i, lazy=True) if stats is not None else None  # read batch by batch
        fp_inputs = store.as_kept(fp_exact).for_block(i) if fp_exact is not None else None
        feedback = method.feedback_groups if fp_inputs is not None else ()
        if method.feedback_groups and fp_inputs is None:
            raise FlexQuantError(f"method {method.name} asks for feedback but its statistics kept no "
                                 f"full-precision inputs of block {i}")
        mine, volume = {}, dist.volume()
        with res.block(i, device) as block:
            out_fp = None if fp_exact is None else _fp_stream_on(stats, store, block, i, len(layers), device)
            ctx = BlockContext(i, f"{spec.layers}.{i}", block, inputs, fp_inputs, device, dist=dist)
            out_q = _quantize_block(method, spec, block, ctx, inputs, fp_inputs, feedback, out_fp,
                                    fast, mine, records, store)
            if method.fold_sites:  # act-order for a target without g_idx: into the producers' rows
                ctx.notes["act_order_folded"] = fold_permutations(block, spec, mine, ctx.prefix)
            if dist.active:  # bytes this rank all-reduced and broadcast (or received) for this block
                ctx.notes.update({k: v - volume[k] for k, v in dist.volume().items()})
            notes.append({"block": i, **ctx.notes})
            finish(i, block, mine)
        if fp_exact is not None:  # (its lazy views read it until now)
            stats.inputs.drop(i)
        kwargs = inputs.kwargs
        del inputs, fp_inputs, fp_exact, ctx, out_fp
        store.put("stream", BlockInputs(out_q.drain() if isinstance(out_q, KeptList) else out_q, kwargs))
        del out_q
    store.drop("stream")
    if stats is not None:
        stats.inputs.drop(len(layers))
    return results, records, notes


def _fp_stream_on(stats: FPStatistics, store: ActivationStore, block: nn.Module, i: int, nblocks: int,
                  device) -> Batches:
    """The FP stream one block on: block ``i`` (not quantized yet) run on it, the next block's inputs kept exact in
    the store (a block's stream and the next one's at a time); the block's FP outputs as the method reads them,
    batch by batch (rounded to the store's dtype, as kept activations are; the last block's exact)."""
    fp = stats.inputs.get(i, lazy=True)
    stats.inputs.put(i + 1, fp.with_hidden(run_block(block, fp.for_block(i), device)), exact=True)
    nxt = stats.inputs.get(i + 1, lazy=True)
    return (nxt if i + 1 == nblocks else store.as_kept(nxt)).hidden


def batch_bytes(windows: int, seqlen: int, hidden: int) -> int:
    """One batch of a block's inputs in float32: ``windows`` × ``seqlen`` tokens × ``hidden``."""
    return windows * seqlen * hidden * 4


def _batch_bytes(model: nn.Module, calib_ids: torch.Tensor | None, batch_size: int) -> int:
    """One batch of this run's block inputs (0 without calibration)."""
    if calib_ids is None:
        return 0
    return batch_bytes(min(batch_size, len(calib_ids)), calib_ids.shape[1], model.config.hidden_size)


def reserve_working_set(store: ActivationStore, layers, weights_dtype: str, batch_bytes: int = 0) -> int:
    """Hold the largest block's working set out of the store's budget: its weights as held, its largest Hessian
    (float32, n²), the solve's float32 copy of its largest weight (shapes from the skeleton: nothing is read) and
    ``batch_bytes``, the batch of inputs being computed on. Under a budget smaller than that everything kept spills,
    and a warning says the peak will pass the budget. Nothing without a budget."""
    if store.max_bytes is None:
        return 0
    held = getattr(torch, weights_dtype).itemsize
    block = 0
    for blk in layers:
        params = list(blk.parameters())
        mats = [p.shape[-2:] for p in params if p.dim() >= 2]
        if mats:
            block = max(block, sum(p.numel() for p in params) * held + 4 * max(n * n for _, n in mats)
                        + 4 * max(m * n for m, n in mats))
    need = block + batch_bytes
    if not store.reserve(need):
        log.warning("--max-memory (%.0f MiB) is below one block's working set (%.0f MiB: its weights, largest "
                    "Hessian and solve, a batch): every kept activation goes to disk, and the peak will pass the "
                    "budget",
                    store.max_bytes / 2**20, need / 2**20)
    return need


def _quantize_block(method, spec, block, ctx, inputs, fp_inputs, feedback, out_fp, fast, results, records,
                    store: ActivationStore | None = None):
    """One block's linear groups, then the method's after-block step (given the block's FP outputs ``out_fp``);
    the block's quantized-stream outputs.
    A ``store`` with a memory budget bounds the cached activations (kept in it, spilled past the budget) and the
    MLP's row chunks."""
    max_bytes = None if store is None else store.max_bytes
    device, cap = ctx.device, cache_limit(max_bytes)

    def quantize_group(group, H, D=None):
        ctx.cross = D
        _quantize_group(method, ctx, group, H, results, records)
        ctx.cross = None

    x_fp = None
    if feedback:  # the block (not quantized yet) runs on the FP stream up to its last feedback input
        _, x_fp = run_capturing(block, fp_inputs, device, feedback, outputs=False)
    # feedback needs the cached path whatever the cap; otherwise past the cap the block is recomputed per group
    if (fast or feedback) and prenorm_applicable(spec, inputs, block, MAX_CACHE_BYTES if feedback else cap):
        out_q = quantize_prenorm_block(block, spec, inputs, device, quantize_group, x_fp, ctx.dist,
                                       mlp_chunk_bytes(max_bytes), store if max_bytes is not None else None)
    elif feedback:
        raise FlexQuantError(f"this method's feedback needs residual blocks of two sub-layers; {spec.family} "
                             "is not declared so in its ModelSpec")
    else:
        for group in spec.groups_in(block):
            quantize_group(group, collect_hessian(block, group[0], inputs, device, ctx.dist))
        out_q = run_block(block, inputs, device)
    return method.after_block(ctx, out_q, out_fp)
