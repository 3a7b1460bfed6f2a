"""Context managers for device moves and hooks; they always clean up."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..models.experts import ROW_WEIGHTS, sparse_damped
from .capture import BlockInputs, _StopForward, block_kwargs, run_block
from .distributed import SINGLE, Dist


@contextlib.contextmanager
def onload(module: nn.Module, device: torch.device):
    """Move ``module`` to ``device`` for the duration, then back to CPU."""
    module.to(device)
    try:
        yield module
    finally:
        module.to("cpu")


@contextlib.contextmanager
def swapped_weights(module: nn.Module, new):
    """The linears of ``module`` named in ``new`` ({relative name: weight}) compute with those weights, moved to
    their own device and dtype, for the duration; their own weights are put back after (also on error)."""
    own = {}
    try:
        for n in new:
            lin = module.get_submodule(n)
            own[n] = lin.weight.data
            lin.weight.data = new[n].to(own[n].device, own[n].dtype)
        yield module
    finally:
        for n, w in own.items():
            module.get_submodule(n).weight.data = w


@contextlib.contextmanager
def input_hook(module: nn.Module, fn, stop: bool = True):
    """Call ``fn(input)`` on each forward input of ``module``; stop the forward there when ``stop``."""

    def hook(_m, args):
        fn(args[0].detach())
        if stop:
            raise _StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def collect_hessian(block: nn.Module, linear_name: str, inputs: BlockInputs,
                    device: torch.device, dist: Dist = SINGLE) -> torch.Tensor:
    """H = 2XXᵀ/T of the inputs reaching ``block.<linear_name>`` over all stored batches (of all ranks).

    The forward of each batch stops at that linear, so only the part of the block before it runs.
    """
    linear = block.get_submodule(linear_name)
    acc = dist.accumulator(linear.in_features, device)

    def add(x):  # an expert's rows weighted by their routing weights (`models.experts`)
        w = getattr(linear, ROW_WEIGHTS, None)
        acc.add(x if w is None else x * w.sqrt().to(x.dtype).unsqueeze(-1))

    with input_hook(linear, add):
        for h, kw in zip(inputs.hidden, inputs.kwargs):
            try:
                block(h.to(device), **block_kwargs(block, kw))
            except _StopForward:
                pass
    dist.reduce_hessian(acc)
    if ".experts." in linear_name:  # (the expert's other linears saw the same tokens)
        return sparse_damped(acc.H, acc.tokens, block.get_submodule(linear_name.rpartition(".")[0]))
    return acc.H


@torch.no_grad()
def run_capturing(block: nn.Module, inputs: BlockInputs, device: torch.device, linear_names: tuple[str, ...],
                  outputs: bool = True) -> tuple[list[torch.Tensor] | None, dict[str, list[torch.Tensor]]]:
    """Run ``block`` over all batches; return its outputs and the inputs of ``linear_names`` (CPU).
    ``outputs=False``: stop each forward once every named linear has seen its input (outputs None)."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in linear_names}
    if not outputs and not linear_names:
        return None, seen

    def grab(_m, args, n):
        seen[n].append(args[0].detach().to("cpu"))
        if not outputs and all(len(v) == len(seen[n]) for v in seen.values()):
            raise _StopForward

    handles = [block.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: grab(m, a, n))
               for n in linear_names]
    try:
        outs = []
        for h, kw in zip(inputs.hidden, inputs.kwargs):
            try:
                out = block(h.to(device), **block_kwargs(block, kw))
            except _StopForward:
                continue
            outs.append((out[0] if isinstance(out, (tuple, list)) else out).to("cpu"))
    finally:
        for handle in handles:
            handle.remove()
    return (outs if outputs else None), seen


@torch.no_grad()
def run_blocks(layers, inputs: BlockInputs, device: torch.device, start: int = 0,
               keep: list | None = None) -> list[torch.Tensor]:
    """The outputs of blocks ``start``, ``start + 1``, ... of ``layers`` over stored inputs (of any block: each block
    gets its own arguments), each block on the device only while it runs; ``keep`` (a list) receives each block's
    input batches."""
    for i in range(start, len(layers)):
        inputs = inputs.for_block(i)
        if keep is not None:
            keep.append(inputs.hidden)
        with onload(layers[i], device):
            inputs = inputs.with_hidden(run_block(layers[i], inputs, device))
    return inputs.hidden
