"""Faster block quantization for residual blocks of two sub-layers (the Llama family and its relatives).

The generic loop re-runs the block from its input for each linear group (4 partial forwards plus
one full forward per block). For blocks of the form (`ModelSpec.prenorm`)
    h' = h + m·post1(o_proj(attention(...)));  out = h' + m·post2(mlp(norm2(h')))
(Llama: m = 1 and post1, post2 the identity; OLMo2 and Gemma norm the sub-layer outputs, Granite scales them)
the inputs of later groups follow from cached ones: the o_proj input is captured once, h' and the
MLP input are rebuilt from it with the quantized o_proj, and the block output is rebuilt from h' with the
quantized MLP. Same arithmetic, fewer FLOPs; the cache holds two tokens × hidden tensors (o_proj's inputs, h').
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.spec import ModelSpec
from ..models.stream import wide_linear
from ..quant.hessian import HessianAccumulator
from .capture import BlockInputs, _StopForward, block_kwargs
from .distributed import SINGLE, Dist
from .hooks import input_hook
from .store import ActivationStore, KeptList, itemsize, shapes

# Cached activations beyond this many bytes make the pipeline fall back to recomputation.
MAX_CACHE_BYTES = 6 * 2**30
# The MLP runs on at most this many bytes of its widest activations (≈ 3 · tokens · d_ff float32: gate, up and
# their product) at a time; a batch above it is run in row chunks (a 2048 × 8192 MLP at 8 × 512 tokens: 384 MiB).
MLP_CHUNK_BYTES = 128 * 2**20


def mlp_chunk_bytes(max_bytes: int | None) -> int:
    """The MLP chunk size: MLP_CHUNK_BYTES, or under a memory budget a sixteenth of it (8 MiB at least)."""
    return MLP_CHUNK_BYTES if max_bytes is None else min(MLP_CHUNK_BYTES, max(8 * 2**20, max_bytes // 16))


def mlp_chunks(h: torch.Tensor, d_ff: int, *others: torch.Tensor | None, chunk_bytes: int | None = None):
    """(h, *others) split into row chunks of ``h`` [..., d] (and the tensors matching it token for token) so
    that the MLP's activations stay under ``chunk_bytes`` (default MLP_CHUNK_BYTES); one chunk — the tensors
    themselves — when they fit. Chunks are views shaped [1, rows, width] (MoE blocks read batch and sequence from
    the shape)."""
    rows = h.numel() // h.shape[-1]
    step = max(1, (chunk_bytes or MLP_CHUNK_BYTES) // (3 * d_ff * 4))
    if rows <= step:
        yield (h, *others)
        return
    flat = [None if t is None else t.reshape(1, rows, t.shape[-1]) for t in (h, *others)]
    for a in range(0, rows, step):
        yield tuple(None if t is None else t[:, a:a + step] for t in flat)


def cache_limit(max_bytes: int | None) -> int:
    """The bytes of cached activations allowed: a memory budget for kept activations bounds them too."""
    return MAX_CACHE_BYTES if max_bytes is None else min(MAX_CACHE_BYTES, max_bytes)


def prenorm_applicable(spec: ModelSpec, inputs: BlockInputs, block: nn.Module, limit: int = MAX_CACHE_BYTES) -> bool:
    if not spec.prenorm or len(spec.linear_groups) != 4:
        return False
    sizes = shapes(inputs.hidden)
    tokens = sum(s[0] * s[1] for s in sizes)
    widths = 2 * sizes[0][-1]  # the o_proj inputs and the mid-block residual, tokens × d each
    return tokens * widths * itemsize(inputs.hidden) <= limit


def _stop_at(block: nn.Module, call, linear: nn.Module, acc: HessianAccumulator, keep: list | None,
             x_fp: torch.Tensor | None = None):
    """Run ``call()``, stopping at ``linear``'s input: accumulate it into ``acc`` (with the matching
    full-precision-stream input ``x_fp`` for the feedback term) and keep it (CPU)."""

    def grab(x):
        acc.add(x, None if x_fp is None else x_fp.to(x.device))
        if keep is not None:
            keep.append(x.to("cpu"))

    with input_hook(linear, grab):
        try:
            call()
        except _StopForward:
            pass


@torch.no_grad()
def quantize_prenorm_block(block: nn.Module, spec: ModelSpec, inputs: BlockInputs, device,
                           quantize_group, fp_inputs: dict[str, list[torch.Tensor]] | None = None,
                           dist: Dist = SINGLE, chunk_bytes: int | None = None,
                           kept: ActivationStore | None = None) -> list[torch.Tensor] | KeptList:
    """Quantize a pre-norm block group by group; ``quantize_group(group, H, D)`` quantizes in place.

    ``fp_inputs`` maps a group's first linear to its full-precision-stream inputs for the first batches
    (all of them, or a prefix); for those groups the feedback term D is accumulated next to H over
    the batches that have them (else D is None).
    Returns the block's outputs (quantized weights) for every stored batch. H and D are all-reduced over ``dist``.
    The MLP runs in row chunks of at most ``chunk_bytes`` of activations (`mlp_chunk_bytes`). ``kept``: a store
    for the block's cached activations (o_proj's inputs, h', the outputs built in h''s place), so that they spill
    to disk past its budget; the outputs are then a `KeptList` of that store (plain lists without it)."""
    qkv, o, gate_up, down = spec.linear_groups
    get = block.get_submodule
    nbatches = len(inputs.hidden)
    fp_inputs = fp_inputs or {}

    def fp_for(linear_name):
        fps = list(fp_inputs.get(linear_name, []))
        return fps + [None] * (nbatches - len(fps))

    kwargs = [block_kwargs(block, kw) for kw in inputs.kwargs]

    def calls():  # one call per batch; a kept (lazy) batch is read only when its call is made
        return ((lambda h=h, kw=kw: block(h.to(device), **kw)) for h, kw in zip(inputs.hidden, kwargs))

    def hessian(linear_name, calls, keep=None):
        lin = get(linear_name)
        acc = dist.accumulator(lin.in_features, device)
        for call, x_fp in zip(calls, fp_for(linear_name)):
            _stop_at(block, call, lin, acc, keep, x_fp)
        dist.reduce_hessian(acc)
        return acc.H, acc.D

    def cache(name):  # kept through the store when one is given (spilled past its budget), else a list
        return [] if kept is None else KeptList(kept, (name, id(block)))

    quantize_group(qkv, *hessian(qkv[0], calls()))
    x_o = cache("o_proj inputs")
    quantize_group(o, *hessian(o[0], calls(), keep=x_o))

    o_proj, sub = get(o[0]), _Sublayers(block, spec)
    # Captured inputs are what the linear's matmul sees (after any input pre-hook such as an online
    # rotation), so outputs are rebuilt with the bare matmul, not by calling the module again.
    h_mid = cache("h'")
    for k, h in enumerate(inputs.hidden):  # each o_proj input freed once used
        h_mid.append(h.to(device) + sub.attn_out(wide_linear(o_proj, x_o[k].to(device))))
        _free(x_o, k)
    # (each loop's last batch is let go before the solve: a loop variable would hold a batch read back from the
    # store, tokens × d floats, through the widest solve of the block)
    h = None
    acc = dist.accumulator(get(gate_up[0]).in_features, device)
    seen = getattr(get(gate_up[0]), "online_rotation", None) or (lambda x: x)  # what the matmul sees
    for hm, x_fp in zip(h_mid, fp_for(gate_up[0])):
        hm = hm.to(device)
        acc.add(seen(sub.mlp_in(hm)), None if x_fp is None else x_fp.to(device))
    hm = x_fp = None
    dist.reduce_hessian(acc)
    quantize_group(gate_up, acc.H, acc.D)
    d_ff = get(down[0]).in_features
    acc = dist.accumulator(d_ff, device)
    for hm, x_fp in zip(h_mid, fp_for(down[0])):
        hm = hm.to(device)
        acc.begin_batch()
        for part, part_fp in mlp_chunks(hm, d_ff, x_fp, chunk_bytes=chunk_bytes):
            _stop_at(block, lambda part=part: sub.mlp(sub.mlp_in(part)), get(down[0]), acc, None, part_fp)
        acc.end_batch()
    hm = x_fp = part = part_fp = None
    dist.reduce_hessian(acc)
    quantize_group(down, acc.H, acc.D)
    del acc
    # the MLP runs again rather than keeping down_proj's inputs (tokens × d_ff floats, the largest cache): the
    # same operations on the same values, so the same outputs; each output takes its h' buffer's place
    for k in range(len(h_mid)):
        hm = h_mid[k].to(device).contiguous()  # (it is: a fresh sum) the chunks are views written in place
        for (part,) in mlp_chunks(hm, d_ff, chunk_bytes=chunk_bytes):
            part.add_(sub.mlp_out(part))
        h_mid[k] = hm.to("cpu")
    return h_mid


def _free(cached: list | KeptList, k: int) -> None:
    if isinstance(cached, KeptList):
        cached.free(k)
    else:
        cached[k] = None


class _Sublayers:
    """The block's sub-layer ends as `ModelSpec` declares them: what o_proj's and the MLP's outputs go through
    before the residual add, and the MLP's input norm."""

    def __init__(self, block: nn.Module, spec: ModelSpec):
        get = block.get_submodule
        self.norm2 = get(spec.mlp_norm) if spec.mlp_norm else None
        self.mlp = get(spec.mlp)
        self.post1 = get(spec.attn_output_norm) if spec.attn_output_norm else None
        self.post2 = get(spec.mlp_output_norm) if spec.mlp_output_norm else None
        self.scale = getattr(block, spec.residual_multiplier) if spec.residual_multiplier else None

    def _out(self, y: torch.Tensor, post) -> torch.Tensor:
        if post is not None:
            y = post(y)
        return y if self.scale is None else y * self.scale

    def attn_out(self, y: torch.Tensor) -> torch.Tensor:
        return self._out(y, self.post1)

    def mlp_in(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.norm2 is None else self.norm2(h)

    def mlp_out(self, h: torch.Tensor) -> torch.Tensor:
        """The MLP's contribution to the residual stream at h'."""
        return self._out(self.mlp(self.mlp_in(h)), self.post2)
