"""Learnable group quantizers, trained by gradient through a straight-through estimator (STE).

Two families (METHODS.md §2.5 option):
- ``clip``: learnable weight clipping per row and group, OmniQuant-style (LWC): the group range is
  [β·min, γ·max] with γ, β = sigmoid(θ), trained with Adam.
- ``round``: sign-gradient rounding, AutoRound-style: a learnable offset v ∈ [−½, ½] per weight added
  before rounding, plus learnable range factors in [½, 1], trained with signed gradient descent.

Both produce scales on the stored grid (fp16, or the 8-bit logarithmic grid below an fp16 row base) and
integer zero points, so the learned result packs exactly. `learn_tails` trains them on the output error of
one block (the caller hands it the block and its inputs and targets; no model walking here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from .grid import log_scale, log_scale_codes
from .result import QuantResult

LEARNERS = ("clip", "round")
_CLIP_INIT = 4.0  # sigmoid(4) = 0.982: OmniQuant's initial clipping


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _stored_scale(scale: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """The scale as stored (fp16 or log-grid code), with the STE so gradients pass to the real value."""
    scale = scale.clamp(min=1e-6)
    stored = scale.half().float() if base is None else log_scale(base, log_scale_codes(scale, base))
    return scale + (stored - scale).detach()


@dataclass
class LearnableGroups:
    """Learnable quantization of latent weights V [m, k, g] (k groups of g columns) at ``bits``."""

    V: torch.Tensor
    bits: int
    kind: str
    base: torch.Tensor | None = None  # [m] log-grid row base (8-bit scales) or None (fp16 scales)
    sym: bool = False  # symmetric grid: range [−γ·max|w|, γ·max|w|], fixed zero 2^(b−1)

    def __post_init__(self) -> None:
        if self.kind not in LEARNERS:
            raise ValueError(f"learner {self.kind!r} is not one of {LEARNERS}")
        self.V = self.V.detach().float()
        m, k, _ = self.V.shape
        self.maxq = 2**self.bits - 1
        self._base = None if self.base is None else self.base.float().view(m, 1, 1)
        self.xmin = self.V.amin(-1, keepdim=True).clamp(max=0)
        self.xmax = self.V.amax(-1, keepdim=True).clamp(min=0)
        if self.sym:
            self.xmax = torch.maximum(-self.xmin, self.xmax)
            self.xmin = -self.xmax
        dev = self.V.device
        if self.kind == "clip":
            self.params = [torch.full((m, k, 1), _CLIP_INIT, device=dev, requires_grad=True),
                           torch.full((m, k, 1), _CLIP_INIT, device=dev, requires_grad=True)]
        else:  # rounding offsets, then the max and min range factors
            self.params = [torch.zeros_like(self.V, requires_grad=True),
                           torch.ones((m, k, 1), device=dev, requires_grad=True),
                           torch.ones((m, k, 1), device=dev, requires_grad=True)]

    def _factors(self):
        if self.kind == "clip":
            return torch.sigmoid(self.params[0]), torch.sigmoid(self.params[1]), None
        return self.params[1], self.params[2], self.params[0]

    def qparams(self):
        """(scale, zero) [m, k, 1] for the current parameters (zero with the STE)."""
        up, down, _ = self._factors()
        hi, lo = self.xmax * up, self.xmin * down
        if self.sym:  # one factor: the range stays symmetric
            lo = -hi
        scale = _stored_scale((hi - lo) / self.maxq, self._base)
        if self.sym:
            return scale, torch.full_like(scale, (self.maxq + 1) // 2)
        zero = _round_ste(-lo / scale).clamp(0, self.maxq)
        return scale, zero

    def codes(self) -> torch.Tensor:
        scale, zero = self.qparams()
        _, _, v = self._factors()
        x = self.V / scale + (0 if v is None else v)
        return torch.clamp(_round_ste(x) + zero, 0, self.maxq)

    def fake_quant(self) -> torch.Tensor:
        """Dequantized weights [m, k, g], differentiable in the parameters."""
        scale, zero = self.qparams()
        return (self.codes() - zero) * scale

    @torch.no_grad()
    def clamp_(self) -> None:
        if self.kind == "round":
            self.params[0].clamp_(-0.5, 0.5)
            self.params[1].clamp_(0.5, 1.0)
            self.params[2].clamp_(0.5, 1.0)

    @torch.no_grad()
    def export(self):
        """(integer codes uint8 [m, k, g], scales [m, k], integer zeros [m, k]) exactly as stored."""
        scale, zero = self.qparams()
        return self.codes().to(torch.uint8), scale[..., 0], zero[..., 0]


def make_optimizer(kind: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """Adam for clipping (OmniQuant); signed gradient descent, ``lr`` per step, for rounding (AutoRound)."""
    if kind == "clip":
        return torch.optim.Adam(params, lr=lr)
    return _SignSGD(params, lr=lr)


class _SignSGD(torch.optim.Optimizer):
    """p ← p − lr·sign(∂L/∂p) (AutoRound's signed gradient descent)."""

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-group["lr"])


@dataclass
class HighTail:
    """One linear's high-precision tail to learn: its quantized result (whose last ``k`` groups in quantization
    order are the tail), the latent weights of the tail [m, k·g] and the dequantized rest [m, n − k·g], both
    in quantization order."""

    name: str  # path of the linear inside the block
    result: QuantResult
    latent: torch.Tensor
    low: torch.Tensor


def _output(o):
    return o[0] if isinstance(o, (tuple, list)) else o


def learn_tails(block: nn.Module, tails: list[HighTail], X: torch.Tensor, T: torch.Tensor, kwargs: dict,
                bits: int, kind: str, steps: int, batch: int, lr: float) -> dict:
    """Train a learnable quantizer (``kind``: clip | round) of every tail at ``bits`` on the MSE between the
    block's outputs on inputs X [N, L, d] and the targets T, ``batch`` windows per step, for ``steps`` steps.

    Where the trained quantizers lower the MSE over all windows, their codes, scales and zeros replace the
    tails' in each `QuantResult` (in place); the block's own weights are left to the caller. Returns the facts:
    MSE before and after, and which was kept."""
    dev = X.device
    learners = []
    for t in tails:
        m, kc = t.latent.shape
        g = t.result.group_size
        r = t.result
        lg = LearnableGroups(t.latent.view(m, kc // g, g).to(dev), bits, kind,
                             None if r.scale_base is None else r.scale_base.to(dev), r.sym)
        learners.append((t.name, r, lg, t.low.to(dev), torch.argsort(r.perm).to(dev)))
    dtype = block.get_submodule(tails[0].name).weight.dtype

    def weights():
        return {f"{n}.weight": torch.cat([low, lg.fake_quant().reshape(low.shape[0], -1)], 1)[:, inv].to(dtype)
                for n, _, lg, low, inv in learners}

    def mse(ws, idx) -> torch.Tensor:
        return ((_output(functional_call(block, ws, (X[idx],), kwargs)) - T[idx]) ** 2).mean()

    chunks = [slice(i, i + batch) for i in range(0, X.shape[0], batch)]
    with torch.no_grad():
        init = sum(float(mse({}, c)) for c in chunks) / len(chunks)
    opt = make_optimizer(kind, [p for _, _, lg, _, _ in learners for p in lg.params], lr)
    frozen = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for step in range(steps):
                loss = mse(weights(), chunks[step % len(chunks)])
                opt.zero_grad()
                loss.backward()
                opt.step()
                for _, _, lg, _, _ in learners:
                    lg.clamp_()
    finally:
        for p, req in frozen:
            p.requires_grad_(req)
    with torch.no_grad():
        learned = sum(float(mse(weights(), c)) for c in chunks) / len(chunks)
    facts = {"learner": kind, "gptq_mse": init, "learned_mse": learned,
             "kept": "learned" if learned < init else "gptq", "linears": [t.name for t in tails]}
    if learned < init:
        for _, r, lg, _, _ in learners:
            codes, scales, zeros = lg.export()
            m, k, g = codes.shape
            r.codes[:, -k * g:] = codes.reshape(m, -1).to(r.codes.device)
            r.scales[:, -k:] = scales.to(r.scales.device)
            if r.zeros is not None:
                r.zeros[:, -k:] = zeros.to(r.zeros.dtype).to(r.zeros.device)
    return facts
