"""Capturing decoder block 0's inputs and running a block over stored inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models.spec import ModelSpec


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once what it needed has been recorded."""


@dataclass
class BlockInputs:
    """Hidden states entering a block, in batches, with the call's keyword arguments per batch."""

    hidden: list[torch.Tensor]  # each [b, L, d], on the storage device (CPU)
    kwargs: list[dict]  # position embeddings, masks, ... (on the compute device)

    def clone(self) -> BlockInputs:
        return BlockInputs([h.clone() for h in self.hidden], self.kwargs)

    def with_hidden(self, hidden: list[torch.Tensor]) -> BlockInputs:
        return BlockInputs(hidden, self.kwargs)


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(model: nn.Module, spec: ModelSpec, input_ids: torch.Tensor,
                         device: torch.device, batch_size: int = 8) -> BlockInputs:
    """Run the model up to decoder block 0 on ``input_ids`` [N, L] and record that block's inputs."""
    layers = model.get_submodule(spec.layers)
    base = model.get_submodule(spec.layers.rsplit(".", 1)[0])
    # the embedding and the rotary tables (the caller makes a streamed model's embedding resident); modules
    # still on the meta device (a streamed model's final norm) are not used before block 0
    others = [m for m in base.children() if m is not layers and not any(t.is_meta for t in m.state_dict().values())]
    for m in others:
        m.to(device)
    hidden, kwargs_list = [], []

    def grab(_module, args, kwargs):
        hidden.append(args[0].detach().to("cpu") if args else kwargs.pop("hidden_states").to("cpu"))
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        kwargs_list.append(_to(kwargs, device))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            try:
                base(input_ids=input_ids[i:i + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        for m in others:
            m.to("cpu")
    return BlockInputs(hidden, kwargs_list)


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, device: torch.device) -> list[torch.Tensor]:
    """The block's outputs for every stored batch (on CPU)."""
    outs = []
    for h, kw in zip(inputs.hidden, inputs.kwargs):
        out = block(h.to(device), **kw)
        out = out[0] if isinstance(out, (tuple, list)) else out
        outs.append(out.to("cpu"))
    return outs

