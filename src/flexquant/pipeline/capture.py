"""Capturing the decoder blocks' inputs and running a block over stored inputs.

A block is called with keyword arguments besides its hidden states (rotary tables, the attention mask). They
can differ between blocks: interleaved sliding-window and full-attention layers (Gemma 2/3, Qwen with
``max_window_layers``) get their own mask and rotary tables. The capture records every block's arguments once
per batch, keeping one copy of an argument set that several blocks receive (the same objects), so a model whose
blocks all get the same arguments (Llama) holds one set per batch whatever its depth. Stored `BlockInputs`
carry the arguments of the block they enter; ``for_block(i)`` switches them to block ``i``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import FlexQuantError
from ..models.spec import ModelSpec
from ..tensorio import move_args

# A decoder layer's position in its model, set by the capture: how a block finds its own arguments.
BLOCK_INDEX = "flexquant_block_index"


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once what it needed has been recorded."""


@dataclass(frozen=True)
class LayerArgs:
    """One batch's keyword arguments of every block: the distinct sets, and block i's is ``sets[index[i]]``."""

    sets: tuple[dict, ...]
    index: tuple[int, ...]


class BlockKwargs(dict):
    """One batch's keyword arguments of one block, knowing every block's (``layers``)."""

    __slots__ = ("layers",)

    def __init__(self, kwargs: dict, layers: LayerArgs):
        super().__init__(kwargs)
        self.layers = layers


def kwargs_for(kwargs: dict, index: int) -> dict:
    """Block ``index``'s arguments for the batch whose (some block's) arguments are ``kwargs``."""
    layers = getattr(kwargs, "layers", None)
    return kwargs if layers is None else BlockKwargs(layers.sets[layers.index[index]], layers)


def block_kwargs(block: nn.Module, kwargs: dict) -> dict:
    """The arguments ``block`` is called with, given any block's arguments of the same batch."""
    if getattr(kwargs, "layers", None) is None:
        return kwargs
    index = getattr(block, BLOCK_INDEX, None)
    if index is None:
        raise FlexQuantError("a decoder block whose inputs were not captured with its model was given per-layer "
                             "arguments; capture the block inputs from the model it belongs to")
    return kwargs_for(kwargs, index)


@dataclass
class BlockInputs:
    """Hidden states entering a block, in batches, with the call's keyword arguments per batch."""

    hidden: list[torch.Tensor]  # each [b, L, d], on the storage device (CPU)
    kwargs: list[dict]  # position embeddings, masks, ... of the block they enter (on the compute device)

    def clone(self) -> BlockInputs:
        return BlockInputs([h.clone() for h in self.hidden], self.kwargs)

    def with_hidden(self, hidden: list[torch.Tensor]) -> BlockInputs:
        return BlockInputs(hidden, self.kwargs)

    def for_block(self, index: int) -> BlockInputs:
        """The same hidden states with block ``index``'s arguments."""
        return BlockInputs(self.hidden, [kwargs_for(kw, index) for kw in self.kwargs])


def _same(a: dict, b: dict) -> bool:
    """The same arguments: the same objects (tensors, tuples of them) or equal plain values."""
    plain = (bool, int, float, str, type(None))
    return a.keys() == b.keys() and all(a[k] is b[k] or (type(a[k]) in plain and type(a[k]) is type(b[k])
                                                          and a[k] == b[k]) for k in a)


def _one_row(obj, batch: int):
    """``obj`` with each tensor that repeats one row over the batch (a mask without padding) kept as that row:
    the arguments then serve any subset of the batch's windows (methods run blocks window by window)."""
    if isinstance(obj, tuple):
        return tuple(_one_row(o, batch) for o in obj)
    if isinstance(obj, torch.Tensor) and obj.dim() >= 2 and obj.shape[0] == batch > 1 and bool((obj == obj[:1]).all()):
        return obj[:1]
    return obj


def _batch_args(calls: list[dict], batch: int, device) -> dict:
    """Block 0's arguments of one batch from every block's (``calls``), deduplicated and on ``device``."""
    sets, index = [], []
    for kw in calls:
        k = next((j for j, s in enumerate(sets) if _same(s, kw)), None)
        if k is None:
            k = len(sets)
            sets.append(kw)
        index.append(k)
    sets = [{k: _one_row(move_args(v, device), batch) for k, v in s.items()} for s in sets]
    if len(sets) == 1:  # every block gets the same arguments: a plain dict
        return sets[0]
    return kwargs_for(BlockKwargs({}, LayerArgs(tuple(sets), tuple(index))), 0)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, spec: ModelSpec, input_ids: torch.Tensor,
                         device: torch.device, batch_size: int = 8) -> BlockInputs:
    """Run the model's embedding and its per-layer argument preparation on ``input_ids`` [N, L] and record
    block 0's inputs with every block's arguments; the blocks themselves do not run (each is replaced by a
    recording identity for the duration, the last one stops the forward)."""
    layers = model.get_submodule(spec.layers)
    base = model.get_submodule(spec.layers.rsplit(".", 1)[0])
    # the embedding and the rotary tables (the caller makes a streamed model's embedding resident); modules
    # still on the meta device (a streamed model's final norm) are not used before the last block
    others = [m for m in base.children() if m is not layers and not any(t.is_meta for t in m.state_dict().values())]
    for m in others:
        m.to(device)
    hidden, kwargs_list, calls = [], [], []

    def recorder(i):
        def forward(*args, **kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            if i == 0:
                hidden.append(h.detach().to("cpu"))
            calls.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
            if i == len(layers) - 1:
                raise _StopForward
            return h
        return forward

    own = [layer.__dict__.get("forward") for layer in layers]  # an instance-level forward (a hook) stays
    for i, layer in enumerate(layers):
        setattr(layer, BLOCK_INDEX, i)
        layer.forward = recorder(i)
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            calls.clear()
            try:
                base(input_ids=input_ids[i:i + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
            if len(calls) != len(layers):
                raise FlexQuantError(f"the {spec.family} model called {len(calls)} of its {len(layers)} decoder "
                                     "blocks; its ModelSpec does not describe it")
            kwargs_list.append(_batch_args(calls, hidden[-1].shape[0], device))
    finally:
        for layer, fwd in zip(layers, own):
            del layer.forward
            if fwd is not None:
                layer.forward = fwd
        for m in others:
            m.to("cpu")
    return BlockInputs(hidden, kwargs_list)


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, device: torch.device) -> list[torch.Tensor]:
    """The block's outputs for every stored batch (on CPU)."""
    outs = []
    for h, kw in zip(inputs.hidden, inputs.kwargs):
        out = block(h.to(device), **block_kwargs(block, kw))
        out = out[0] if isinstance(out, (tuple, list)) else out
        outs.append(out.to("cpu"))
    return outs
