"""Fake quantization of activations, K/V vectors and (for calibration) weights, with learnable clipping.

Rounding uses the straight-through estimator (gradient 1 through ``round``), so clipping ratios and
transforms upstream can be trained on a block's output error; without gradients these are plain
quantize-dequantize maps. ``clip`` multiplies the range (a ratio in (0, 1]; broadcastable to the
reduced shape [..., 1]); None = min-max.
"""

from __future__ import annotations

import torch

# Quantizing at this many bits or more is the identity (the values stay in the model's float dtype).
FULL_BITS = 16


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass, the identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def fake_quant_sym(x: torch.Tensor, bits: int, clip: torch.Tensor | float | None = None) -> torch.Tensor:
    """Symmetric per-vector (last dim) quantization: levels −2^(b−1) … 2^(b−1)−1, scale max|x|·clip/(2^(b−1)−1)."""
    if bits >= FULL_BITS:
        return x
    qmax = 2 ** (bits - 1) - 1
    amax = x.abs().amax(-1, keepdim=True)
    if clip is not None:
        amax = amax * clip
    scale = (amax / qmax).clamp(min=1e-8)
    return torch.clamp(round_ste(x / scale), -qmax - 1, qmax) * scale


def fake_quant_asym(x: torch.Tensor, bits: int, clip: torch.Tensor | float | None = None) -> torch.Tensor:
    """Asymmetric per-vector (last dim) quantization on 2^b levels; the range [min, max] (shrunk by ``clip``)
    always contains 0, so the zero point is an integer code."""
    if bits >= FULL_BITS:
        return x
    maxq = 2**bits - 1
    xmin = x.amin(-1, keepdim=True).clamp(max=0)
    xmax = x.amax(-1, keepdim=True).clamp(min=0)
    if clip is not None:
        xmin, xmax = xmin * clip, xmax * clip
    scale = ((xmax - xmin) / maxq).clamp(min=1e-8)
    zero = round_ste(-xmin / scale)
    return (torch.clamp(round_ste(x / scale) + zero, 0, maxq) - zero) * scale


def fake_quant_weight(W: torch.Tensor, bits: int, group_size: int,
                      clip: torch.Tensor | None = None) -> torch.Tensor:
    """Asymmetric per-row, per-group (``group_size`` input columns) quantization of W [m, n]; ``clip`` [m]
    is a learnable range ratio per output row (calibration-time weight quantizer)."""
    if bits >= FULL_BITS:
        return W
    m, n = W.shape
    Wg = W.reshape(m, n // group_size, group_size)
    c = None if clip is None else clip.reshape(m, 1, 1)
    return fake_quant_asym(Wg, bits, c).reshape(m, n)


# Learnable clipping ratios are trained directly (Adam moves them by about the learning rate per step)
# and used clamped to [CLIP_MIN, 1]; 1 is the min-max range.
CLIP_MIN = 0.3


def clip_ratio(param: torch.Tensor) -> torch.Tensor:
    """The clipping ratio a learnable parameter stands for."""
    return param.clamp(CLIP_MIN, 1.0)
