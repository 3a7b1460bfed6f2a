"""Probe measurements for the high-impact ratio method: KL(full precision ‖ probe model) on a small calibration
subset, for weight configurations that differ from a base configuration in a few blocks, and the cheap probe
quantizer whose weights they install.

The full-precision log-probabilities are computed once. A base configuration is run once, keeping every
block's input; a probe that changes blocks l ≤ k only reruns blocks l..end from the stored input of block l.
Weights are swapped by reference and the model's own weights are always restored (`ProbeEngine.close`, also on
error through the context manager).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..config import GPTQConfig, GridConfig
from ..errors import FlexQuantError
from ..pipeline.capture import capture_block_inputs
from ..pipeline.hooks import onload, run_blocks
from ..quant import gptq_quantize
from ..quant.impact import latent_high_columns
from .ratio import RatioPlan

ROWS = 256  # positions whose log-probabilities are taken at once


class ProbeEngine:
    """KL of weight configurations to the full-precision model on ``ids`` [P, L]."""

    def __init__(self, model, spec, ids: torch.Tensor, device: torch.device, batch_size: int = 8):
        self.model, self.spec, self.device = model, spec, device
        self.layers = model.get_submodule(spec.layers)
        self.norm, self.head = model.get_submodule(spec.final_norm), model.get_submodule(spec.lm_head)
        self.fp = {f"{spec.layers}.{i}.{n}": blk.get_submodule(n).weight.data
                   for i, blk in enumerate(self.layers) for n in spec.linears_in(blk)}
        self.forwards = 0  # block forward passes run (the probe cost, in blocks)
        self.probes = 0
        self.seconds = 0.0
        t0 = time.perf_counter()
        self._block0 = capture_block_inputs(model, spec, ids, device, batch_size)
        self.tokens = int(ids.numel())
        self.ref = [self._logprobs(h) for h in self._run(self._block0.hidden, 0)]
        self.base_inputs: list[list[torch.Tensor]] = []  # per block, under the base configuration
        self.base: dict[str, torch.Tensor] = {}
        self.seconds += time.perf_counter() - t0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Put the model's own (full-precision) weights back."""
        for name, w in self.fp.items():
            self.model.get_submodule(name).weight.data = w

    def _run(self, hidden: list[torch.Tensor], start: int, keep: list | None = None) -> list[torch.Tensor]:
        self.forwards += len(self.layers) - start
        return run_blocks(self.layers, self._block0.with_hidden(hidden), self.device, start, keep)

    def _chunks(self, h: torch.Tensor):
        """Log-probabilities of the last block's output ``h``, `ROWS` positions at a time (with a 262k vocabulary
        one batch of them, and each temporary of the KL, would be GBs); norm and head onloaded meanwhile."""
        h = h.reshape(-1, h.shape[-1])
        with onload(self.norm, self.device), onload(self.head, self.device):
            for s in range(0, h.shape[0], ROWS):
                yield F.log_softmax(self.spec.head_logits(self.model, h[s:s + ROWS]), -1)

    @torch.no_grad()
    def _logprobs(self, h: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [tokens, vocab] of the last block's output ``h``, on the CPU."""
        return torch.cat([lp.cpu() for lp in self._chunks(h)])

    @torch.no_grad()
    def _kl(self, hidden: list[torch.Tensor]) -> float:
        """KL to the reference, `ROWS` positions at a time."""
        total = 0.0
        for h, ref in zip(hidden, self.ref):
            for lp, r in zip(self._chunks(h), ref.split(ROWS)):  # the generator first: it ends (offloads) itself
                r = r.to(lp.device)
                total += float((r.exp() * (r - lp)).sum())
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
        hidden = self._run(self._block0.hidden, 0, keep)
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


class ProbeQuantizer:
    """The probe quantizer: GPTQ against the full-precision Hessian, without sequential propagation, so that
    results can be cached per (linear, k) and mixed freely. One GPTQ pass at b_lo (k = 0) per linear; for
    k > 0 its prefix is kept and only the last k groups are redone: the compensated latent columns
    (`latent_high_columns`) quantized by GPTQ at b_hi on their own Hessian block (fp16 for b_hi = 16)."""

    def __init__(self, plan: RatioPlan, weights: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor],
                 grid: GridConfig, gptq: GPTQConfig):
        self.plan, self.fp, self.H, self.grid, self.gptq = plan, weights, hessians, grid, gptq
        self._cache: dict[tuple, object] = {}

    def clear(self) -> None:
        """Drop the cached weights (they are recomputed on demand)."""
        self._cache.clear()

    def weight(self, name: str, k: int) -> torch.Tensor:
        """The probe weight of linear ``name`` with ``k`` high-impact groups."""
        key = (name, k)
        if key in self._cache:
            return self._cache[key]
        lin, g = self.plan.lins[name], self.grid.group_size
        if k > lin.kmax:
            raise FlexQuantError(f"{name}: {k} high-impact groups exceed the {lin.kmax} that r_max allows")
        W, H = self.fp[name], self.H[name]
        if (name, "perm") not in self._cache:
            perm = self.plan.order(name, torch.diag(H))
            r = gptq_quantize(W, H, self.grid, self.gptq, group_bits=self.plan.group_bits(name, 0), order=perm)
            self._cache[(name, "perm")] = perm
            self._cache[(name, "q0")] = r.dequantize(torch.float32)[:, perm]
            self._cache[(name, "damp")] = r.stats["damp"]
        perm, Q0 = self._cache[(name, "perm")], self._cache[(name, "q0")]
        Qp = Q0
        if k:
            kc = k * g
            V = latent_high_columns(W, H, Q0[:, : lin.n - kc], perm, kc, self._cache[(name, "damp")])
            if self.plan.fp16_retention:
                tail = V.half().float()
            else:
                Ht = H.float()[perm][:, perm][lin.n - kc:, lin.n - kc:]
                tail = gptq_quantize(V, Ht, self.grid, self.gptq,
                                     group_bits=torch.full((k,), self.plan.grid.b_hi, dtype=torch.uint8),
                                     order=torch.arange(kc)).dequantize(torch.float32)
            Qp = torch.cat([Q0[:, : lin.n - kc], tail], 1)
        out = torch.empty_like(Qp)
        out[:, perm] = Qp
        self._cache[key] = out.to(W.dtype)
        return self._cache[key]

    def weights(self, steps: list[int]) -> dict[str, torch.Tensor]:
        """Probe weights of every linear for an allocation (steps per layer)."""
        return {n: self.weight(n, k) for i, s in enumerate(steps) for n, k in self.plan.layer_groups(i, s).items()}

    def changes(self, steps: list[int], base: list[int], only: tuple[int, ...] | None = None) -> dict:
        """Probe weights of the linears whose k differs between allocation ``steps`` and ``base``."""
        out = {}
        for i in (range(len(steps)) if only is None else only):
            old = self.plan.layer_groups(i, base[i])
            out.update({n: self.weight(n, k) for n, k in self.plan.layer_groups(i, steps[i]).items() if k != old[n]})
        return out

