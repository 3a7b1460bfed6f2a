"""Algorithm tests: quantizers, BN folding and splitting, block reconstruction, the bi-level meta step."""

from __future__ import annotations

import copy

import pytest
import torch

from flexquant.vision import VisionError, VisionQuantConfig, quantize_classifier
from flexquant.vision.api import prepare_sequences
from flexquant.vision.graph import fold_batchnorm, quant_layers, split_model
from flexquant.vision.meta import TransformNet, meta_objective, meta_train_block
from flexquant.vision.quantizers import (
    adaround_weight,
    fake_quant_weight_rtn,
    init_rounding_logits,
    init_weight_qparams,
    lsq_fake_quant,
)
from flexquant.vision.reconstruct import block_error, init_block_activations, reconstruct_block, set_block_state


def test_adaround_starts_at_the_weight_and_hard_rounding_is_nearest():
    W = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    s, z = init_weight_qparams(W, 3)
    V = init_rounding_logits(W, s)
    soft = adaround_weight(W, s, z, V, 3, hard=False)
    clipped = s * (torch.clamp(W / s + z, 0, 7) - z)  # W itself, up to the clipping range
    assert torch.allclose(soft, clipped, atol=1e-9)
    assert torch.equal(adaround_weight(W, s, z, V, 3, hard=True), fake_quant_weight_rtn(W, s, z, 3))


def test_mse_clipping_beats_min_max_at_two_bits():
    W = torch.randn(16, 64)
    s, z = init_weight_qparams(W, 2)
    lo, hi = W.min(1, keepdim=True).values, W.max(1, keepdim=True).values
    s_mm = (hi - lo) / 3
    err_mse = (fake_quant_weight_rtn(W, s, z, 2) - W).pow(2).sum()
    err_mm = (fake_quant_weight_rtn(W, s_mm, torch.round(-lo / s_mm), 2) - W).pow(2).sum()
    assert err_mse < 0.8 * err_mm


def test_lsq_grid_and_step_gradient():
    X = torch.linspace(-3, 3, 101)
    step = torch.tensor(0.5, requires_grad=True)
    Xq = lsq_fake_quant(X, step, 3, signed=True)
    assert set((Xq / 0.5).round().tolist()) <= set(range(-4, 4))
    Xq.sum().backward()
    assert step.grad is not None and step.grad.abs() > 0


def test_fold_and_split_keep_the_function_float64(make_model):
    for name in ("tiny_resnet", "tiny_mobilenet_v2"):
        model = make_model(name, torch.float64)
        x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
        folded = fold_batchnorm(copy.deepcopy(model))
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        seq = split_model(folded)
        assert seq.names[0] == "stem" and seq.names[-1] == "head" and len(seq.names) >= 5
        assert torch.allclose(seq(x), model(x), atol=1e-10, rtol=1e-10)


def test_split_rejects_a_forward_that_is_not_a_sequence():
    class Odd(torch.nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 2

    model = Odd(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(1), torch.nn.LazyLinear(3))
    x = torch.randn(2, 3, 8, 8)
    model(x)
    with pytest.raises(VisionError, match="wrap it as an nn.Sequential"):
        split_model(model, probe=x)


def test_first_and_last_layers_are_eight_bit(images, make_model):
    q = quantize_classifier(make_model(), images, VisionQuantConfig(w_bits=2, a_bits=3, iters=2), progress=False)
    bits = list(q.settings.values())
    assert (bits[0]["w_bits"], bits[0]["a_bits"]) == (8, 8) and (bits[-1]["w_bits"], bits[-1]["a_bits"]) == (8, 8)
    assert {(b["w_bits"], b["a_bits"]) for b in bits[1:-1]} == {(2, 3)}
    codes = [layer.w_codes for layer in quant_layers(q)]
    assert int(codes[1].max()) <= 3 and int(codes[0].max()) > 3


def _sequences_at_block(k: int, X: torch.Tensor, cfg: VisionQuantConfig, model: torch.nn.Module):
    """FP/quantized sequences with the blocks before k finalised (nearest rounding), and block k's inputs."""
    fp_seq, q_seq = prepare_sequences(model, X, cfg)
    for j in range(k):
        init_block_activations(q_seq.parts[j], q_seq(X, 0, j))
        set_block_state(q_seq.parts[j], "rounded")
        for layer in quant_layers(q_seq.parts[j]):
            layer.finalize()
    block = q_seq.parts[k]
    for layer in quant_layers(block):
        layer.V.requires_grad_(True)
        layer.a_step.requires_grad_(True)
    with torch.no_grad():
        X_q, X_fp = q_seq(X, 0, k), fp_seq(X, 0, k)
    init_block_activations(block, X_q)
    return fp_seq, q_seq, X_q, X_fp


def test_reconstruction_lowers_block_error_also_on_held_out_images(images, make_model):
    cfg = VisionQuantConfig(w_bits=2, a_bits=4, iters=80, seed=0)
    torch.manual_seed(0)
    calib, held = images[:32], images[32:]
    fp_seq, q_seq, X_q, X_fp = _sequences_at_block(1, calib, cfg, make_model())
    block = q_seq.parts[1]
    with torch.no_grad():
        Y = fp_seq.parts[1](X_fp)
        Xq_held, Y_held = q_seq(held, 0, 1), fp_seq(held, 0, 2)
    held_nearest = block_error(block, Xq_held, Y_held, "nearest")
    res = reconstruct_block(block, X_q, X_fp, Y, cfg)
    assert res["err_rounded"] < 0.7 * res["err_nearest"]
    assert block_error(block, Xq_held, Y_held, "rounded") < 0.8 * held_nearest


def test_meta_step_changes_the_transform_network(images, make_model):
    cfg = VisionQuantConfig(w_bits=2, a_bits=4, meta=True, meta_steps=2, meta_batch_size=8)
    torch.manual_seed(0)
    fp_seq, q_seq, X_q, _ = _sequences_at_block(1, images, cfg, make_model())
    T = TransformNet(3, 4)
    before = copy.deepcopy(T.state_dict())
    with torch.no_grad():
        z_fp, feat = fp_seq(images), fp_seq(images, 0, len(fp_seq.parts) - 1)
    terms = meta_train_block(T, torch.optim.Adam(T.parameters(), 1e-3), images, X_q, z_fp, feat, 1, q_seq, fp_seq, cfg)
    assert set(terms) == {"kl", "margin", "feat", "inner"}
    changed = [k for k, v in T.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)
    # only T learns here: the block's quantizer parameters are left to reconstruction
    assert all(layer.V.grad is None for layer in quant_layers(q_seq.parts[1]))


def test_bilevel_gradient_matches_finite_differences_float64(make_model):
    # Activation quantization off and QDrop 0 make the objective smooth (rounding of activations has a
    # straight-through gradient that no finite difference can see); margin and feature terms off, so
    # the whole gradient flows through the inner step: d KL(θ'(T)) / dT. Sharper logits (fc × 30) lift
    # the KL well above float64 round-off.
    torch.manual_seed(0)
    X = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    model = make_model(dtype=torch.float64)
    with torch.no_grad():
        model.fc.weight.mul_(30)

    def gradient_and_fd(inner_lr: float) -> tuple[float, float]:
        cfg = VisionQuantConfig(
            w_bits=2, a_bits=4, qdrop_prob=0.0, meta_inner_lr=inner_lr, margin_weight=0.0, feature_weight=0.0
        )
        fp_seq, q_seq, _, _ = _sequences_at_block(1, X, cfg, model)
        for layer in quant_layers(q_seq):
            layer.act_quant = False
        torch.manual_seed(1)
        T = TransformNet(3, 4).double()
        with torch.no_grad():
            T.out.weight.normal_(std=0.3)
        p, idx, eps = T.enc1[0].weight, (0, 0, 1, 1), 1e-5

        def f() -> torch.Tensor:
            return meta_objective(T, X, 1, q_seq, fp_seq, cfg)[0]

        g = torch.autograd.grad(f(), p)[0][idx].item()
        values = []
        for shift in (eps, -eps):
            with torch.no_grad():
                p[idx] += shift
            values.append(f().item())  # the objective itself needs autograd: it takes an inner gradient step
            with torch.no_grad():
                p[idx] -= shift
        return g, (values[0] - values[1]) / (2 * eps)

    g, fd = gradient_and_fd(0.2)
    assert abs(g) > 1e-8, "the meta-gradient should not vanish"
    assert g == pytest.approx(fd, rel=1e-4)
    # without an inner step there is no path from T to the outer KL at all
    g0, fd0 = gradient_and_fd(0.0)
    assert g0 == 0.0 and abs(fd0) < 1e-9


def test_quantize_is_deterministic_and_leaves_the_model_alone(images, make_model):
    model = make_model()
    state = copy.deepcopy(model.state_dict())
    cfg = VisionQuantConfig(w_bits=2, a_bits=4, iters=5, meta=True, meta_steps=1, seed=3)
    a = quantize_classifier(model, images, cfg, progress=False)
    b = quantize_classifier(model, images, cfg, progress=False)
    assert torch.equal(a(images), b(images))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
