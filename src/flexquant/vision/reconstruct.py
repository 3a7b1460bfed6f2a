"""Block-wise reconstruction (BRECQ) with AdaRound weights and LSQ activations under QDrop.

For one block: minimise E‖f_q(X̃) − f(X_fp)‖² over the rounding logits V and the activation steps, where
X̃ mixes the quantized-stream input X_q and the FP input X_fp element-wise (QDrop, p = 0.5), and every
activation inside the block also drops its quantization with probability p.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import VisionQuantConfig
from .graph import quant_layers
from .quantizers import beta_schedule, rounding_regulariser


def block_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BRECQ's reconstruction loss: squared error summed over channels, mean over samples and positions."""
    err = (out - target).pow(2)
    return err.sum(1).mean() if err.dim() > 1 else err.mean()


def init_block_activations(block: nn.Module, X_q: torch.Tensor, batch_size: int = 64, max_samples: int = 256) -> None:
    """Set each layer's activation step (and signedness) by MSE on its inputs from the quantized stream."""
    layers = quant_layers(block)
    for layer in layers:
        layer.observe(True)
    with torch.no_grad():
        for i in range(0, min(len(X_q), max_samples), batch_size):
            # Layers are initialised in order, so later layers see inputs quantized by earlier ones:
            # a layer's step is only fixed once every layer before it is.
            block(X_q[i : i + batch_size])
    for layer in layers:
        layer.init_activation()


def set_block_state(block: nn.Module, state: str, qdrop_prob: float = 0.0) -> None:
    """Switch every quantizer of the block to a weight state and a QDrop probability."""
    for layer in quant_layers(block):
        layer.state = state
        layer.qdrop_p = qdrop_prob


@torch.no_grad()
def block_error(block: nn.Module, X_q: torch.Tensor, Y: torch.Tensor, state: str, batch_size: int = 128) -> float:
    """Mean reconstruction loss of the block on (X_q → Y) with weights in `state`, no QDrop."""
    set_block_state(block, state)
    total = 0.0
    for i in range(0, len(X_q), batch_size):
        total += block_loss(block(X_q[i : i + batch_size]), Y[i : i + batch_size]).item() * len(X_q[i : i + batch_size])
    return total / len(X_q)


def reconstruct_block(
    block: nn.Module, X_q: torch.Tensor, X_fp: torch.Tensor, Y: torch.Tensor, cfg: VisionQuantConfig
) -> dict[str, float]:
    """Optimise the block's rounding logits and activation steps; leaves the block in the ``rounded`` state.

    X_q: inputs from the already-quantized prefix; X_fp: the FP prefix's inputs for the same images;
    Y: FP block outputs on X_fp. Returns the block error with nearest rounding and after reconstruction.
    """
    layers = quant_layers(block)
    err_nearest = block_error(block, X_q, Y, "nearest")
    V = [layer.V for layer in layers]
    steps = [layer.a_step for layer in layers]
    opt = torch.optim.Adam([{"params": V, "lr": cfg.lr_round}, {"params": steps, "lr": cfg.lr_act}])
    set_block_state(block, "soft", cfg.qdrop_prob)
    n = len(X_q)
    for it in range(cfg.iters):
        idx = torch.randint(n, (min(cfg.batch_size, n),))
        Xq, Xfp = X_q[idx], X_fp[idx]
        # QDrop on the block input too: the FP value replaces the quantized one with probability p
        X = torch.where(torch.rand_like(Xq) < cfg.qdrop_prob, Xfp, Xq)
        loss = block_loss(block(X), Y[idx])
        beta = beta_schedule(it, cfg.iters, cfg.warmup, cfg.beta_start, cfg.beta_end)
        if beta is not None:
            loss = loss + cfg.round_weight * sum(rounding_regulariser(v, beta) for v in V)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # a step must stay positive; LSQ has no other guard
            for s in steps:
                s.clamp_(min=1e-8)
    err_after = block_error(block, X_q, Y, "rounded")
    return {"err_nearest": err_nearest, "err_rounded": err_after}
