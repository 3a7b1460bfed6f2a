"""The meta-learning step (after arXiv 2407.14726): a U-Net T learns to transform calibration images so
that reconstructing a block on T(x) generalises to the original images.

Bi-level objective for block k with quantizer parameters θ (rounding logits and activation steps):
  inner  θ'(T) = θ − α ∇θ L_rec(θ; T(x))       (one SGD step, kept in the graph; optionally normalised)
  outer  L(T)  = τ² KL(p_fp(x)/τ ‖ p_q(x; θ')/τ) + λ_m relu(m − d(T(x), x)) + λ_f ‖F(T(x)) − F(x)‖²/‖F(x)‖²
where p_q runs the quantized blocks < k, block k with θ', and the FP blocks after k; F is the FP model's
penultimate features. ∂L/∂T flows through θ' (second order) and directly through the last two terms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .config import VisionQuantConfig
from .graph import BlockSequence
from .reconstruct import block_loss, set_block_state


class TransformNet(nn.Module):
    """A small two-level U-Net, image → image, with a residual output x + δ(x)."""

    def __init__(self, channels: int = 3, width: int = 16) -> None:
        super().__init__()

        def conv_block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU()
            )

        self.enc1 = conv_block(channels, width)
        self.enc2 = conv_block(width, 2 * width)
        self.dec1 = conv_block(3 * width, width)
        self.out = nn.Conv2d(width, channels, 1)
        # δ starts small but not zero: the margin term's gradient is zero at δ = 0 by symmetry
        nn.init.normal_(self.out.weight, std=1e-3)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.avg_pool2d(e1, 2, ceil_mode=True))
        up = F.interpolate(e2, size=e1.shape[-2:], mode="nearest")
        return x + self.out(self.dec1(torch.cat([e1, up], dim=1)))


def image_distance(x_t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean over images of the RMS pixel difference (ε keeps the sqrt differentiable at 0)."""
    return torch.sqrt((x_t - x).pow(2).flatten(1).mean(1) + 1e-12).mean()


def kl_logits(z_fp: torch.Tensor, z_q: torch.Tensor, tau: float) -> torch.Tensor:
    """τ²·KL(softmax(z_fp/τ) ‖ softmax(z_q/τ)), mean over the batch (Hinton distillation scaling)."""
    log_p = F.log_softmax(z_fp / tau, dim=-1)
    log_q = F.log_softmax(z_q / tau, dim=-1)
    return tau**2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def inner_step(theta: torch.Tensor, g: torch.Tensor, cfg: VisionQuantConfig) -> torch.Tensor:
    """The inner update Δθ: plain SGD α·g, or (meta_inner_norm) α·rms(θ)·g/rms(g).

    The gradients of rounding logits and activation steps are tiny and of unrelated scales, so a plain
    SGD step barely moves θ and the meta-gradient through it vanishes; the normalised step moves each
    tensor by a fraction α of its own size, whatever the loss scale, and stays smooth in g.
    """
    if not cfg.meta_inner_norm:
        return cfg.meta_inner_lr * g
    rms_theta = torch.sqrt(theta.detach().pow(2).mean() + 1e-24)
    rms_g = torch.sqrt(g.pow(2).mean() + 1e-24)
    return cfg.meta_inner_lr * rms_theta * g / rms_g


def learnable_params(block: nn.Module) -> dict[str, torch.Tensor]:
    """The block's quantizer parameters θ (rounding logits, activation steps) by name."""
    return {n: p for n, p in block.named_parameters() if p.requires_grad}


def meta_objective(
    T: nn.Module,
    x: torch.Tensor,
    k: int,
    q_seq: BlockSequence,
    fp_seq: BlockSequence,
    cfg: VisionQuantConfig,
    Xq_in: torch.Tensor | None = None,
    z_fp: torch.Tensor | None = None,
    feat_fp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Outer loss of the bi-level step for block k, differentiable w.r.t. T's parameters.

    q_seq's parts < k are final, part k is being reconstructed; fp_seq is the folded FP model.
    Optional caches (no gradient needed): Xq_in = q_seq(x, 0, k), z_fp = fp_seq(x), feat_fp = fp_seq(x, 0, -1).
    """
    block, n_parts = q_seq.parts[k], len(fp_seq.parts)
    theta = learnable_params(block)
    with torch.no_grad():
        Xq_in = q_seq(x, 0, k) if Xq_in is None else Xq_in
        z_fp = fp_seq(x) if z_fp is None else z_fp
        feat_fp = fp_seq(x, 0, n_parts - 1) if feat_fp is None else feat_fp

    # inner: one differentiable SGD step on the reconstruction loss over T(x), with QDrop as in reconstruction
    x_t = T(x)
    Xfp_t = fp_seq(x_t, 0, k)
    Y_t = fp_seq.parts[k](Xfp_t)
    set_block_state(block, "soft", cfg.qdrop_prob)
    out_t = functional_call(block, theta, (q_seq(x_t, 0, k),))
    L_in = block_loss(out_t, Y_t)
    grads = torch.autograd.grad(L_in, list(theta.values()), create_graph=True, allow_unused=True)
    theta_new = {n: p if g is None else p - inner_step(p, g, cfg) for (n, p), g in zip(theta.items(), grads)}

    # outer: the virtually updated quantizer judged on the original images
    set_block_state(block, "soft", 0.0)
    z_q = fp_seq(functional_call(block, theta_new, (Xq_in,)), k + 1)
    L_kl = kl_logits(z_fp, z_q, cfg.temperature)
    L_margin = torch.relu(cfg.margin - image_distance(x_t, x))
    feat_t = fp_seq(Y_t, k + 1, n_parts - 1) if k < n_parts - 1 else Xfp_t
    L_feat = (feat_t - feat_fp).pow(2).sum() / feat_fp.pow(2).sum().clamp(min=1e-12)
    loss = L_kl + cfg.margin_weight * L_margin + cfg.feature_weight * L_feat
    terms = {"kl": L_kl.item(), "margin": L_margin.item(), "feat": L_feat.item(), "inner": L_in.item()}
    return loss, terms


def meta_train_block(
    T: nn.Module,
    opt: torch.optim.Optimizer,
    images: torch.Tensor,
    Xq_in: torch.Tensor,
    z_fp: torch.Tensor,
    feat_fp: torch.Tensor,
    k: int,
    q_seq: BlockSequence,
    fp_seq: BlockSequence,
    cfg: VisionQuantConfig,
) -> dict[str, float]:
    """`cfg.meta_steps` outer Adam steps on T for block k; only T changes (θ is updated by reconstruction)."""
    params = [p for p in T.parameters() if p.requires_grad]
    terms: dict[str, float] = {}
    n = len(images)
    for _ in range(cfg.meta_steps):
        idx = torch.randint(n, (min(cfg.meta_batch_size, n),))
        loss, terms = meta_objective(T, images[idx], k, q_seq, fp_seq, cfg, Xq_in[idx], z_fp[idx], feat_fp[idx])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        opt.zero_grad(set_to_none=True)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    return terms
