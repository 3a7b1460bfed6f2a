"""Fake quantizers for convolutions and linears: AdaRound weights and LSQ activations with QDrop.

The arithmetic lives in pure tensor functions (AdaRound: Nagel et al. 2020; LSQ: Esser et al. 2020;
QDrop: Wei et al. 2022). `QuantLayer` wraps one conv/linear and only holds their parameters.

Every operation is built from differentiable torch primitives (straight-through estimators are written
as ``x + (f(x) - x).detach()``), so the bi-level meta step can differentiate twice through them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Rectified-sigmoid stretch of AdaRound: h(V) = clamp(sigmoid(V)(ζ − γ) + γ, 0, 1).
ZETA, GAMMA = 1.1, -0.1


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer code range of a `bits`-bit grid."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient (identity backward), twice differentiable."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Return x unchanged but scale its gradient by g (LSQ's step-size gradient scaling)."""
    return x * g + (x - x * g).detach()


def fake_quant_weight_rtn(W: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric round-to-nearest fake quantization of W with per-output-channel scale s and zero z."""
    qmax = 2**bits - 1
    return s * (torch.clamp(torch.round(W / s) + z, 0, qmax) - z)


def init_weight_qparams(W: torch.Tensor, bits: int, n_grid: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel asymmetric scale and zero point, with the clipping range chosen by MSE.

    Min-max ranges waste most of a 2-bit grid on the few largest weights; shrinking the range per channel
    to minimise ‖W − Q(W)‖² is the usual PTQ initialisation (BRECQ, QDrop).
    Returns s, z shaped [out, 1, ...] to broadcast against W.
    """
    qmax = 2**bits - 1
    Wf = W.detach().reshape(W.shape[0], -1)  # [out, fan_in]
    lo = Wf.min(dim=1, keepdim=True).values.clamp(max=0)
    hi = Wf.max(dim=1, keepdim=True).values.clamp(min=0)
    best_err = torch.full_like(lo, float("inf"))
    best_s, best_z = torch.ones_like(lo), torch.zeros_like(lo)
    for i in range(n_grid):
        ratio = 1.0 - 0.8 * i / n_grid  # search clipping ratios 1.0 .. 0.2
        s = ((hi - lo) * ratio / qmax).clamp(min=1e-8)
        z = torch.round(-lo * ratio / s)
        err = (fake_quant_weight_rtn(Wf, s, z, bits) - Wf).pow(2).sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    shape = (W.shape[0],) + (1,) * (W.dim() - 1)
    return best_s.reshape(shape), best_z.reshape(shape)


def rectified_sigmoid(V: torch.Tensor) -> torch.Tensor:
    """AdaRound's soft rounding offset h(V) ∈ [0, 1]."""
    return torch.clamp(torch.sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_rounding_logits(W: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """V such that h(V) equals the fractional part of W/s, i.e. soft rounding starts at W itself."""
    rest = W / s - torch.floor(W / s)
    p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))  # logit


def adaround_weight(
    W: torch.Tensor, s: torch.Tensor, z: torch.Tensor, V: torch.Tensor, bits: int, hard: bool
) -> torch.Tensor:
    """AdaRound fake-quantized weight: floor(W/s) + h(V) (soft) or + [V ≥ 0] (hard), on the asymmetric grid."""
    qmax = 2**bits - 1
    h = (V >= 0).to(W.dtype) if hard else rectified_sigmoid(V)
    return s * (torch.clamp(torch.floor(W / s) + h + z, 0, qmax) - z)


def adaround_codes(W: torch.Tensor, s: torch.Tensor, z: torch.Tensor, V: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of the hard-rounded weight (what a checkpoint stores)."""
    qmax = 2**bits - 1
    return torch.clamp(torch.floor(W / s) + (V >= 0).to(W.dtype) + z, 0, qmax)


def rounding_regulariser(V: torch.Tensor, beta: float) -> torch.Tensor:
    """Σ 1 − |2h(V) − 1|^β: pushes every h(V) to 0 or 1; β is annealed from large to small."""
    return (1 - (2 * rectified_sigmoid(V) - 1).abs().pow(beta)).sum()


def beta_schedule(it: int, iters: int, warmup: float, beta_start: float, beta_end: float) -> float | None:
    """Annealed β of the rounding regulariser; None during warm-up (regulariser off)."""
    start = int(warmup * iters)
    if it < start:
        return None
    frac = (it - start) / max(1, iters - start)
    return beta_end + 0.5 * (beta_start - beta_end) * (1 + math.cos(math.pi * frac))


def lsq_fake_quant(X: torch.Tensor, step: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """LSQ fake quantization with a learnable step: step · clamp(round(X/step), qmin, qmax)."""
    qmin, qmax = int_range(bits, signed)
    g = 1.0 / math.sqrt(X[0].numel() * qmax)  # LSQ gradient scale, per-sample element count
    s = grad_scale(step, g)
    return s * torch.clamp(round_ste(X / s), qmin, qmax)


def init_act_step(X: torch.Tensor, bits: int, signed: bool, n_grid: int = 50) -> torch.Tensor:
    """Activation step chosen by MSE over clipping ranges (a fraction of max |X|)."""
    X = X.detach().flatten()
    if X.numel() > 1_000_000:  # a strided subsample is enough to pick one scalar
        X = X[:: X.numel() // 1_000_000 + 1]
    qmin, qmax = int_range(bits, signed)
    top = X.abs().max().clamp(min=1e-8)
    best, best_err = top / qmax, float("inf")
    for i in range(n_grid):
        step = top * (1.0 - 0.95 * i / n_grid) / qmax
        err = (step * torch.clamp(torch.round(X / step), qmin, qmax) - X).pow(2).mean().item()
        if err < best_err:
            best, best_err = step, err
    return best.reshape(())


def qdrop_mix(X_q: torch.Tensor, X: torch.Tensor, p: float) -> torch.Tensor:
    """QDrop: each element keeps its full-precision value with probability p, else its quantized value."""
    if p <= 0:
        return X_q
    keep_fp = torch.rand_like(X) < p
    return torch.where(keep_fp, X, X_q)


class QuantLayer(nn.Module):
    """A Conv2d or Linear with an AdaRound weight quantizer and an LSQ quantizer on its input.

    Weight states: ``soft`` (reconstruction: h(V)), ``nearest`` (round to nearest on the same grid, the
    baseline), ``rounded`` (AdaRound's hard decision [V ≥ 0], FP weight still kept) and ``hard`` (final:
    integer codes only; the FP weight is dropped and the checkpoint stores codes, scale and zero).
    """

    def __init__(
        self, layer: nn.Module, w_bits: int, a_bits: int, a_signed: bool | None = None, calibrate: bool = True
    ) -> None:
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"QuantLayer wraps Conv2d or Linear, got {type(layer).__name__}")
        self.kind = "conv" if isinstance(layer, nn.Conv2d) else "linear"
        self.conv_args = (
            dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
            if self.kind == "conv"
            else {}
        )
        if self.kind == "conv" and layer.padding_mode != "zeros":
            raise TypeError("only zero-padded convolutions are supported")
        self.w_bits, self.a_bits = w_bits, a_bits
        W = layer.weight.detach()
        bias = layer.bias.detach().clone() if layer.bias is not None else W.new_zeros(W.shape[0])
        if calibrate:
            s, z = init_weight_qparams(W, w_bits)
        else:  # a skeleton for loading a checkpoint: the values come from the file
            shape = (W.shape[0],) + (1,) * (W.dim() - 1)
            s, z = W.new_ones(shape), W.new_zeros(shape)
        self.register_buffer("weight", W.clone())
        self.register_buffer("bias", bias)
        self.register_buffer("w_scale", s)
        self.register_buffer("w_zero", z)
        self.register_buffer("w_codes", torch.zeros(0, dtype=torch.uint8, device=W.device))
        self.V = nn.Parameter(init_rounding_logits(W, s))
        # Signedness is decided from calibration data unless given (e.g. when loading a checkpoint).
        self.a_signed = a_signed
        self.a_step = nn.Parameter(W.new_ones(()))
        self.state = "soft"
        self.act_quant = True
        self.qdrop_p = 0.0
        self._observed: list[torch.Tensor] | None = None

    # -- weight -----------------------------------------------------------------------------------
    def quant_weight(self) -> torch.Tensor:
        if self.state == "hard":
            return self.w_scale * (self.w_codes.to(self.w_scale.dtype) - self.w_zero)
        if self.state == "nearest":
            return fake_quant_weight_rtn(self.weight, self.w_scale, self.w_zero, self.w_bits)
        hard = self.state == "rounded"
        return adaround_weight(self.weight, self.w_scale, self.w_zero, self.V, self.w_bits, hard=hard)

    # -- activation -------------------------------------------------------------------------------
    def observe(self, on: bool) -> None:
        """Collect inputs (to initialise the activation step) instead of quantizing them."""
        self._observed = [] if on else None

    def init_activation(self) -> None:
        X = torch.cat([x.flatten() for x in self._observed])
        if self.a_signed is None:
            self.a_signed = bool((X < 0).any())
        with torch.no_grad():
            self.a_step.copy_(init_act_step(X, self.a_bits, self.a_signed))
        self._observed = None

    def quant_input(self, X: torch.Tensor) -> torch.Tensor:
        if self._observed is not None:
            self._observed.append(X.detach())
            return X
        if not self.act_quant:
            return X
        X_q = lsq_fake_quant(X, self.a_step, self.a_bits, bool(self.a_signed))
        # QDrop is switched on only while reconstructing (never tied to .training: heads may hold Dropout)
        return qdrop_mix(X_q, X, self.qdrop_p)

    # -- state ------------------------------------------------------------------------------------
    def finalize(self) -> None:
        """Fix the rounding, keep integer codes, drop the FP weight and the learnable logits."""
        with torch.no_grad():
            codes = adaround_codes(self.weight, self.w_scale, self.w_zero, self.V, self.w_bits)
        self.w_codes = codes.to(torch.uint8)
        del self.weight, self.V  # the checkpoint holds codes, not the FP weight
        self.a_step.requires_grad_(False)
        self.state = "hard"

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = self.quant_input(X)
        W = self.quant_weight()
        if self.kind == "conv":
            return F.conv2d(X, W, self.bias, **self.conv_args)
        return F.linear(X, W, self.bias)

    def extra_repr(self) -> str:
        return f"{self.kind}, w_bits={self.w_bits}, a_bits={self.a_bits}, state={self.state}"
