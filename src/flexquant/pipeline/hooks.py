"""Context managers for device moves and hooks; they always clean up."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..quant.hessian import HessianAccumulator
from .capture import BlockInputs, _StopForward


@contextlib.contextmanager
def onload(module: nn.Module, device: torch.device):
    """Move ``module`` to ``device`` for the duration, then back to CPU."""
    module.to(device)
    try:
        yield module
    finally:
        module.to("cpu")


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
                    device: torch.device) -> torch.Tensor:
    """H = 2XXᵀ/T of the inputs reaching ``block.<linear_name>`` over all stored batches.

    The forward of each batch stops at that linear, so only the part of the block before it runs.
    """
    linear = block.get_submodule(linear_name)
    acc = HessianAccumulator(linear.in_features, device)
    with input_hook(linear, acc.add):
        for h, kw in zip(inputs.hidden, inputs.kwargs):
            try:
                block(h.to(device), **kw)
            except _StopForward:
                pass
    return acc.H


@torch.no_grad()
def collect_feedback_stats(block: nn.Module, fp_block: nn.Module, linear_name: str, inputs: BlockInputs,
                           fp_inputs: BlockInputs, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """H = 2X_qᵀX_q/T and D = 2(X_fp − X_q)ᵀX_q/T for the inputs of ``linear_name`` in the quantized
    block (quantized stream) and the full-precision block (full-precision stream), batch by batch."""
    n = block.get_submodule(linear_name).in_features
    H = torch.zeros(n, n, device=device)
    D = torch.zeros(n, n, device=device)
    T = 0
    for (h, kw), hf in zip(zip(inputs.hidden, inputs.kwargs), fp_inputs.hidden):
        got = {}
        for key, blk, x in (("q", block, h), ("fp", fp_block, hf)):
            with input_hook(blk.get_submodule(linear_name), lambda t, key=key, got=got: got.__setitem__(key, t)):
                try:
                    blk(x.to(device), **kw)
                except _StopForward:
                    pass
        Xq = got["q"].reshape(-1, n).float()
        Xf = got["fp"].reshape(-1, n).float()
        H.addmm_(Xq.T, Xq)
        D.addmm_((Xf - Xq).T, Xq)
        T += Xq.shape[0]
    return H * (2 / T), D * (2 / T)
