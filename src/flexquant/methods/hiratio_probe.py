"""Probe measurements for the high-impact ratio method: KL(full precision ‖ probe model) on a small
calibration subset, for weight configurations that differ from a base configuration in a few blocks.

The full-precision log-probabilities are computed once. A base configuration (every linear at its
r = 0 weights) is run once, keeping every block's input; a probe that changes blocks l ≤ k only reruns
blocks l..end from the stored input of block l. Weights are swapped by reference and the model's own
weights are always restored (`ProbeEngine.close`, also on error through the context manager).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..pipeline.capture import BlockInputs, capture_block_inputs
from ..pipeline.hooks import onload


def _out(o):
    return o[0] if isinstance(o, (tuple, list)) else o


class ProbeEngine:
    """KL of weight configurations to the full-precision model on ``ids`` [P, L]."""

    def __init__(self, model, spec, ids: torch.Tensor, device: torch.device, batch_size: int = 8):
        self.model, self.spec, self.device = model, spec, device
        self.layers = model.get_submodule(spec.layers)
        self.norm, self.head = model.get_submodule(spec.final_norm), model.get_submodule(spec.lm_head)
        self.fp = {f"{spec.layers}.{i}.{n}": blk.get_submodule(n).weight.data
                   for i, blk in enumerate(self.layers) for n in spec.linears}
        self.forwards = 0  # block forward passes run (the probe cost, in blocks)
        self.probes = 0
        self.seconds = 0.0
        t0 = time.perf_counter()
        inputs = capture_block_inputs(model, spec, ids, device, batch_size)
        self.kwargs = inputs.kwargs
        self.tokens = int(ids.numel())
        hidden = self._run(inputs.hidden, 0)
        self.ref = [self._logprobs(h) for h in hidden]
        self.base_inputs: list[list[torch.Tensor]] = []  # per block, under the base configuration
        self.base: dict[str, torch.Tensor] = {}
        self._block0 = inputs.hidden
        self.seconds += time.perf_counter() - t0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Put the model's own (full-precision) weights back."""
        for name, w in self.fp.items():
            self.model.get_submodule(name).weight.data = w

    @torch.no_grad()
    def _run(self, hidden: list[torch.Tensor], start: int, keep: list | None = None) -> list[torch.Tensor]:
        for i in range(start, len(self.layers)):
            if keep is not None:
                keep.append(hidden)
            block = self.layers[i]
            with onload(block, self.device):
                hidden = [_out(block(h.to(self.device), **kw)).to("cpu") for h, kw in zip(hidden, self.kwargs)]
            self.forwards += 1
        return hidden

    @torch.no_grad()
    def _logprobs(self, h: torch.Tensor) -> torch.Tensor:
        with onload(self.norm, self.device), onload(self.head, self.device):
            return F.log_softmax(self.head(self.norm(h.to(self.device))).float(), -1).cpu()

    @torch.no_grad()
    def _kl(self, hidden: list[torch.Tensor]) -> float:
        total = 0.0
        for h, ref in zip(hidden, self.ref):
            lp = self._logprobs(h)
            total += float((ref.exp() * (ref - lp)).sum())
        return total / self.tokens

    def _install(self, weights: dict[str, torch.Tensor]) -> None:
        for name, w in weights.items():
            self.model.get_submodule(name).weight.data = w

    def set_base(self, weights: dict[str, torch.Tensor]) -> float:
        """Install the base configuration (every probed linear) and return its KL (L0)."""
        t0 = time.perf_counter()
        self.base = dict(weights)
        self._install(self.base)
        keep: list = []
        hidden = self._run(self._block0, 0, keep)
        self.base_inputs = keep
        loss = self._kl(hidden)
        self.probes += 1
        self.seconds += time.perf_counter() - t0
        return loss

    def loss(self, changes: dict[str, torch.Tensor], first_block: int) -> float:
        """KL with the base configuration changed by ``changes`` (linears of blocks ≥ ``first_block``)."""
        if not self.base_inputs:
            raise RuntimeError("ProbeEngine.set_base must run before loss()")
        t0 = time.perf_counter()
        self._install(changes)
        try:
            loss = self._kl(self._run(self.base_inputs[first_block], first_block))
        finally:
            self._install({n: self.base[n] for n in changes})
        self.probes += 1
        self.seconds += time.perf_counter() - t0
        return loss

    def cost(self) -> dict:
        return {"probes": self.probes, "block_forwards": self.forwards, "tokens": self.tokens,
                "seconds": self.seconds,
                "full_forward_equivalents": self.forwards / max(1, len(self.layers))}


def slice_inputs(inputs: BlockInputs, n: int) -> list[torch.Tensor]:
    """The first ``n`` windows of stored block inputs, as one tensor list of the stored batches."""
    out, left = [], n
    for h in inputs.hidden:
        if left <= 0:
            break
        out.append(h[:left])
        left -= h.shape[0]
    return out
