"""Public entry points: quantize an image classifier block by block, and measure top-1 accuracy.

This module runs the steps and owns no algorithm: BN folding and splitting (graph), reconstruction
(reconstruct) and the meta step (meta) are called in order, one block at a time.
"""

from __future__ import annotations

import copy
import logging
import time
from functools import partial
from typing import Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import VisionQuantConfig
from .errors import VisionError
from .graph import BlockSequence, fold_batchnorm, layer_bits, quant_layers, split_model, wrap_layers
from .meta import TransformNet, meta_train_block
from .quantizers import QuantLayer
from .reconstruct import init_block_activations, reconstruct_block, set_block_state

log = logging.getLogger(__name__)


class QuantizedClassifier(nn.Module):
    """A fake-quantized classifier: a `BlockSequence` whose convs/linears are finalised `QuantLayer`s.

    ``settings`` maps each layer name to its bits and activation sign; ``arch`` (when the model was built
    by name) lets `load_quantized` rebuild the skeleton; ``report`` holds per-block errors and times.
    """

    def __init__(
        self,
        seq: BlockSequence,
        config: VisionQuantConfig,
        settings: dict[str, dict],
        input_shape: tuple[int, ...],
        arch: dict | None = None,
        report: list[dict] | None = None,
    ) -> None:
        super().__init__()
        self.seq = seq
        self.config = config
        self.settings = settings
        self.input_shape = tuple(input_shape)
        self.arch = arch
        self.report = report or []
        self.metrics: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)

    def storage_bits(self) -> dict[str, float]:
        """Weight storage per weight: bit-packed codes (``bpw_packed``) and as the file holds them
        (``bpw_in_file``: one uint8 per code, no packing yet); both include a 32-bit scale and zero per channel."""
        packed = in_file = weights = 0
        for layer in quant_layers(self):
            n, meta = layer.w_codes.numel(), 2 * 32 * layer.w_scale.numel()
            packed += n * layer.w_bits + meta
            in_file += n * 8 + meta
            weights += n
        w = max(1, weights)
        return {"weights": weights, "bpw_packed": packed / w, "bpw_in_file": in_file / w}


def collect_images(data: Any, limit: int | None = None) -> torch.Tensor:
    """Calibration images as one [N, C, H, W] tensor from a tensor, or an iterable of tensors / (x, y) pairs."""
    if isinstance(data, torch.Tensor):
        X = data
    else:
        chunks, count = [], 0
        try:
            for item in data:
                x = item[0] if isinstance(item, (tuple, list)) else item
                if not isinstance(x, torch.Tensor):
                    raise VisionError(f"calibration batches must hold image tensors, got {type(x).__name__}")
                chunks.append(x)
                count += len(x)
                if limit is not None and count >= limit:
                    break
        except TypeError:
            raise VisionError(
                f"calibration data must be a tensor or an iterable of batches, got {type(data).__name__}"
            ) from None
        if not chunks:
            raise VisionError("the calibration data is empty")
        X = torch.cat(chunks)
    if X.dim() != 4:
        raise VisionError(f"calibration images must be [N, C, H, W], got shape {tuple(X.shape)}")
    if not torch.isfinite(X).all():
        raise VisionError("calibration images contain NaN or Inf")
    return X[:limit] if limit is not None else X


def _batched(fn: Any, X: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(X[i : i + batch_size]) for i in range(0, len(X), batch_size)])


def quantize_classifier(
    model: nn.Module, calib: Any, config: VisionQuantConfig | None = None, progress: bool = True
) -> QuantizedClassifier:
    """Post-training quantization of an image classifier with block reconstruction (+ the meta step).

    model: a ResNet-, MobileNetV2- or RegNet-style classifier (torchvision layout) or an nn.Sequential of
    blocks; it is copied, never modified. calib: [N, C, H, W] images (normalised as the model expects) or
    an iterable of such batches / (images, labels) pairs. Runs under `config.seed` without touching the
    global random state.
    """
    cfg = config or VisionQuantConfig()
    if not isinstance(model, nn.Module):
        raise VisionError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    first = next(iter(model.parameters()), None)
    if first is None:
        raise VisionError("the model has no parameters to quantize")
    X = collect_images(calib, cfg.calib_size).to(first.device, first.dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return _quantize(model, X, cfg, progress)


def prepare_sequences(model: nn.Module, X: torch.Tensor, cfg: VisionQuantConfig) -> tuple[BlockSequence, BlockSequence]:
    """(FP, to-be-quantized) block sequences of a BN-folded copy of `model`; the split is checked on X[:4]."""
    original = copy.deepcopy(model).eval()
    folded = fold_batchnorm(copy.deepcopy(model).eval())
    fp_seq = split_model(folded, probe=X[:4], reference=original).requires_grad_(False)
    q_seq = copy.deepcopy(fp_seq)
    wrap_layers(q_seq, layer_bits(q_seq, cfg.w_bits, cfg.a_bits, cfg.first_last_bits))
    return fp_seq, q_seq.requires_grad_(False)


def _quantize(model: nn.Module, X: torch.Tensor, cfg: VisionQuantConfig, progress: bool) -> QuantizedClassifier:
    fp_seq, q_seq = prepare_sequences(model, X, cfg)

    X_fp, X_q = X, X  # inputs of the current block along the FP and the quantized stream
    z_fp = feat_fp = None
    T = opt_T = None
    if cfg.meta:
        T = TransformNet(X.shape[1], cfg.unet_width).to(X.device, X.dtype)
        opt_T = torch.optim.Adam(T.parameters(), lr=cfg.meta_lr)
        z_fp = _batched(fp_seq, X)
        feat_fp = _batched(partial(fp_seq, start=0, stop=len(fp_seq.parts) - 1), X)

    report = []
    bar = tqdm(list(enumerate(fp_seq.names)), desc="blocks", disable=not progress, leave=False)
    for k, name in bar:
        t0 = time.perf_counter()
        block = q_seq.parts[k]
        Y = _batched(fp_seq.parts[k], X_fp)
        entry: dict[str, Any] = {"block": name}
        if quant_layers(block):
            for layer in quant_layers(block):
                layer.V.requires_grad_(True)
                layer.a_step.requires_grad_(True)
            init_block_activations(block, X_q)
            Xq_rec, Xfp_rec, Y_rec = X_q, X_fp, Y
            if cfg.meta:
                entry["meta"] = meta_train_block(T, opt_T, X, X_q, z_fp, feat_fp, k, q_seq, fp_seq, cfg)
                # reconstruct on the original and the transformed images together
                X_t = _batched(T, X)
                Xfp_t = _batched(partial(fp_seq, start=0, stop=k), X_t)
                Xq_rec = torch.cat([X_q, _batched(partial(q_seq, start=0, stop=k), X_t)])
                Xfp_rec = torch.cat([X_fp, Xfp_t])
                Y_rec = torch.cat([Y, _batched(fp_seq.parts[k], Xfp_t)])
            entry.update(reconstruct_block(block, Xq_rec, Xfp_rec, Y_rec, cfg))
            set_block_state(block, "rounded")
            for layer in quant_layers(block):
                layer.finalize()
        X_q = _batched(block, X_q)
        X_fp = Y
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        log.info("block %s: %s", name, {k2: v for k2, v in entry.items() if k2 != "block"})
        report.append(entry)

    arch = getattr(model, "_flexquant_arch", None)
    qmodel = QuantizedClassifier(q_seq, cfg, settings_from(q_seq), tuple(X.shape[1:]), arch, report)
    return qmodel.eval()


def settings_from(seq: BlockSequence) -> dict[str, dict]:
    """Per-layer bits and activation sign as stored in a checkpoint."""
    return {
        name: {"w_bits": m.w_bits, "a_bits": m.a_bits, "a_signed": bool(m.a_signed)}
        for name, m in seq.named_modules()
        if isinstance(m, QuantLayer)
    }


def evaluate_top1(model: nn.Module, data: Any, batch_size: int = 256) -> float:
    """Top-1 accuracy in [0, 1] on (images, labels) tensors or an iterable of (images, labels) batches."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        X_all, y_all = data
        batches: Iterable = [
            (X_all[i : i + batch_size], y_all[i : i + batch_size]) for i in range(0, len(X_all), batch_size)
        ]
    else:
        batches = data
    ref = next(iter(model.parameters()), next(iter(model.buffers()), torch.empty(0)))
    correct = total = 0
    model.eval()
    with torch.no_grad():
        for x, y in batches:
            correct += (model(x.to(ref.device, ref.dtype)).argmax(-1).cpu() == y.cpu()).sum().item()
            total += len(y)
    if total == 0:
        raise VisionError("the evaluation data is empty")
    return correct / total
