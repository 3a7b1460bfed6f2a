"""Probe measurements for the high-impact ratio method: KL(full precision ‖ probe model) on a small calibration
subset, for weight configurations that differ from a base configuration in a few blocks, and the cheap probe
quantizer whose weights they install.

The full-precision log-probabilities are computed once. A base configuration is run once, keeping every
block's input; a probe that changes blocks l ≤ k only reruns blocks l..end from the stored input of block l.
Blocks are read through the model's residency, as every pass reads them: a streamed model's block is read when
a probe reaches it and dropped after. A configuration's weights are installed in a block only while it runs
(the block's own weights are put back after, also on error), and they are looked up per block, so a lazy
mapping (`ProbeQuantizer.weights`) makes only that block's. The kept block inputs, the reference
log-probabilities and the probe quantizer's weights are kept in the run's activation store, exactly (no
rounding to the store's dtype), under its budget like everything else.
"""

from __future__ import annotations

import time
from collections import ChainMap
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..config import GPTQConfig, GridConfig
from ..errors import FlexQuantError
from ..models.stream import residency
from ..pipeline.capture import BlockInputs, capture_block_inputs, run_block
from ..pipeline.hooks import swapped_weights
from ..pipeline.store import ActivationStore, MemoryStore, TensorMap
from ..quant import gptq_quantize
from ..quant.impact import latent_high_columns
from .ratio import RatioPlan

ROWS = 256  # positions whose log-probabilities are taken at once


class ProbeEngine:
    """KL of weight configurations ({linear path: weight}) to the full-precision model on ``ids`` [P, L]."""

    def __init__(self, model, spec, ids: torch.Tensor, device: torch.device, batch_size: int = 8,
                 store: ActivationStore | None = None):
        self.model, self.spec, self.device = model, spec, device
        self.res = residency(model, spec)
        self.store = store if store is not None else MemoryStore()
        self.layers = model.get_submodule(spec.layers)
        self.names = [{f"{spec.layers}.{i}.{n}": n for n in spec.linears_in(blk)} for i, blk in enumerate(self.layers)]
        self.forwards = 0  # block forward passes run (the probe cost, in blocks)
        self.probes = 0
        self.seconds = 0.0
        t0 = time.perf_counter()
        with self.res.ends(device, (spec.embed,)):
            self._block0 = capture_block_inputs(model, spec, ids, device, batch_size)
        self.tokens = int(ids.numel())
        self.ref = TensorMap(self.store, "probe-ref")  # "batch.chunk": log-probabilities [ROWS positions, vocab]
        hidden = self._run(self._block0.hidden, 0, {})
        with self._head(), torch.no_grad():  # (read after the blocks: a streamed model holds one or the other)
            for b, h in enumerate(hidden):
                for c, lp in enumerate(self._chunks(h)):
                    self.ref[f"{b}.{c}"] = lp.cpu()
        self.base: Mapping[str, torch.Tensor] = {}
        self.seconds += time.perf_counter() - t0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Drop what the engine keeps in the store (the model's own weights are never left replaced)."""
        self.ref.clear()
        for i in range(len(self.layers)):
            self.store.drop(("probe-in", i))

    def _run(self, hidden: list[torch.Tensor], start: int, config: Mapping[str, torch.Tensor],
             keep: bool = False) -> list[torch.Tensor]:
        """Blocks ``start``.. on ``hidden`` with ``config``'s weights installed; ``keep``: each block's inputs
        into the store (the base configuration's, which the probes start from)."""
        self.forwards += len(self.layers) - start
        inputs = self._block0.with_hidden(hidden)
        for i in range(start, len(self.layers)):
            inputs = inputs.for_block(i)
            if keep:
                self.store.put(("probe-in", i), inputs, exact=True)
            mine = {rel: config[full] for full, rel in self.names[i].items() if full in config}  # (made here)
            with self.res.block(i, self.device) as blk, swapped_weights(blk, mine):
                inputs = inputs.with_hidden(run_block(blk, inputs, self.device))
        return inputs.hidden

    def _head(self):
        """The final norm and head on the device (a streamed model's read for the duration)."""
        return self.res.ends(self.device, (self.spec.final_norm, self.spec.lm_head))

    def _chunks(self, h: torch.Tensor):
        """Log-probabilities of the last block's output ``h``, `ROWS` positions at a time (with a 262k vocabulary
        one batch of them, and each temporary of the KL, would be GBs); within `_head`."""
        h = h.reshape(-1, h.shape[-1])
        for s in range(0, h.shape[0], ROWS):
            yield F.log_softmax(self.spec.head_logits(self.model, h[s:s + ROWS]), -1)

    @torch.no_grad()
    def _kl(self, hidden: list[torch.Tensor]) -> float:
        """KL to the reference, `ROWS` positions at a time."""
        total = 0.0
        with self._head():
            for b, h in enumerate(hidden):
                for c, lp in enumerate(self._chunks(h)):
                    r = self.ref[f"{b}.{c}"].to(lp.device)  # (one chunk read back at a time)
                    total += float((r.exp() * (r - lp)).sum())
        return total / self.tokens

    def set_base(self, weights: Mapping[str, torch.Tensor]) -> float:
        """The base configuration (every probed linear) and its KL (L0)."""
        t0 = time.perf_counter()
        self.base = weights
        loss = self._kl(self._run(self._block0.hidden, 0, self.base, keep=True))
        self.probes += 1
        self.seconds += time.perf_counter() - t0
        return loss

    def loss(self, changes: Mapping[str, torch.Tensor], first_block: int) -> float:
        """KL with the base configuration changed by ``changes`` (linears of blocks ≥ ``first_block``)."""
        kept: BlockInputs | None = self.store.get(("probe-in", first_block))
        if kept is None:
            raise RuntimeError("ProbeEngine.set_base must run before loss()")
        t0 = time.perf_counter()
        loss = self._kl(self._run(kept.hidden, first_block, ChainMap(changes, self.base)))
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
    (`latent_high_columns`) quantized by GPTQ at b_hi on their own Hessian block (fp16 for b_hi = 16).
    ``weights`` and ``hessians`` are mappings read one linear at a time (the run's store holds them); the
    cached weights go to ``store`` too."""

    def __init__(self, plan: RatioPlan, weights: Mapping[str, torch.Tensor], hessians: Mapping[str, torch.Tensor],
                 grid: GridConfig, gptq: GPTQConfig, store: ActivationStore | None = None):
        self.plan, self.fp, self.H, self.grid, self.gptq = plan, weights, hessians, grid, gptq
        self._cache = TensorMap(store if store is not None else MemoryStore(), "probe-w")  # "name|k", "name|q0"
        self._perm: dict[str, tuple[torch.Tensor, float]] = {}  # the order and the damping of each linear's pass

    def clear(self) -> None:
        """Drop the cached weights (they are recomputed on demand)."""
        self._cache.clear()
        self._perm.clear()

    def weight(self, name: str, k: int) -> torch.Tensor:
        """The probe weight of linear ``name`` with ``k`` high-impact groups (put together from the cached b_lo
        pass and the cached high-impact tail: only the tail's k groups are kept per k)."""
        lin = self.plan.lins[name]
        if k > lin.kmax:
            raise FlexQuantError(f"{name}: {k} high-impact groups exceed the {lin.kmax} that r_max allows")
        if name not in self._perm:
            W, H = self.fp[name].float(), self.H[name]  # (kept in 16 bits where that is exact)
            perm = self.plan.order(name, torch.diag(H))
            r = gptq_quantize(W, H, self.grid, self.gptq, group_bits=self.plan.group_bits(name, 0), order=perm)
            self._perm[name] = perm, r.stats["damp"]
            self._cache[f"{name}|q0"] = r.dequantize(torch.float32)[:, perm]
        perm, Q0 = self._perm[name][0], self._cache[f"{name}|q0"]
        Qp = Q0
        if k:
            kc = k * self.grid.group_size
            if f"{name}|{k}" not in self._cache:
                self._cache[f"{name}|{k}"] = self._tail(name, k, Q0)
            Qp = torch.cat([Q0[:, : lin.n - kc], self._cache[f"{name}|{k}"]], 1)
        out = torch.empty_like(Qp)
        out[:, perm] = Qp
        return out

    def _tail(self, name: str, k: int, Q0: torch.Tensor) -> torch.Tensor:
        """The last k groups (in the linear's order) after GPTQ has compensated the others, at b_hi."""
        W, H = self.fp[name].float(), self.H[name]
        (perm, damp), n, kc = self._perm[name], self.plan.lins[name].n, k * self.grid.group_size
        V = latent_high_columns(W, H, Q0[:, : n - kc], perm, kc, damp)
        if self.plan.fp16_retention:
            return V.half().float()
        Ht = H.float()[perm][:, perm][n - kc:, n - kc:]
        return gptq_quantize(V, Ht, self.grid, self.gptq,
                             group_bits=torch.full((k,), self.plan.grid.b_hi, dtype=torch.uint8),
                             order=torch.arange(kc)).dequantize(torch.float32)

    def weights(self, steps: list[int]) -> Mapping[str, torch.Tensor]:
        """Probe weights of every linear for an allocation (steps per layer), each made when it is looked up."""
        return _Lazy(self, {n: k for i, s in enumerate(steps) for n, k in self.plan.layer_groups(i, s).items()})

    def changes(self, steps: list[int], base: list[int], only: tuple[int, ...] | None = None) -> Mapping:
        """Probe weights of the linears whose k differs between allocation ``steps`` and ``base`` (lazy)."""
        out = {}
        for i in (range(len(steps)) if only is None else only):
            old = self.plan.layer_groups(i, base[i])
            out.update({n: k for n, k in self.plan.layer_groups(i, steps[i]).items() if k != old[n]})
        return _Lazy(self, out)


class _Lazy(Mapping):
    """{linear: probe weight} for {linear: k}, each weight made (or read back) when it is looked up."""

    def __init__(self, prober: ProbeQuantizer, ks: dict[str, int]):
        self.prober, self.ks = prober, ks

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.prober.weight(name, self.ks[name])

    def __contains__(self, name) -> bool:
        return name in self.ks

    def __iter__(self):
        return iter(self.ks)

    def __len__(self) -> int:
        return len(self.ks)

