"""A lean load (`flexquant.load(..., lean=True)`): a checkpoint held for inference in about its packed size.

Every `QuantLinear` keeps only its kernel's own layout (`QuantLinear.release_packed`, called as the load installs
each layer: the checkpoint's packed buffers are dropped once the layout is made), and the large full-precision
ends — the embedding and an untied head — are held in float16 (read so from the file,
`format.checkpoint.read_tensors`) and computed in the model's dtype: the embedding's rows are converted after the
lookup, the head's weight ``HEAD_ROWS`` rows at a time (decode-sized batches: converted as read, `half_matmul`). The
cost is the ends' float16 rounding (a relative 2⁻¹¹ of each weight); a tensor whose values overflow float16 stays
as stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.cpu_packed import GEMV_MAX_BATCH, extension

HEAD_ROWS = 1024  # rows of a float16-held head converted per matmul (two buffers: 1024 × hidden, tokens × 1024)


class HalfStoredLinear(nn.Linear):
    """A full-precision linear (the head) whose weight is held in float16 and computed in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = self.weight
        if W.dtype == x.dtype:
            return F.linear(x, W, self.bias)
        x2 = x.reshape(-1, x.shape[-1])
        ext = extension() if x2.shape[0] <= GEMV_MAX_BATCH and (x.dtype, W.dtype) == (torch.float32,
                                                                                      torch.float16) else None
        if ext is not None:  # decode: the float16 rows meet x as they are read
            out = ext.half_matmul(x2.contiguous(), W.contiguous())
        else:
            out = x2.new_empty(x2.shape[0], self.out_features)
            rows = min(HEAD_ROWS, self.out_features)
            w, y = x2.new_empty(rows, W.shape[1]), x2.new_empty(x2.shape[0], rows)  # reused for every chunk
            for s in range(0, self.out_features, rows):
                e = min(s + rows, self.out_features)
                w[: e - s].copy_(W[s:e])
                torch.mm(x2, w[: e - s].T, out=y[:, : e - s])
                out[:, s:e] = y[:, : e - s]
        if self.bias is not None:
            out += self.bias.to(x.dtype)
        return out.view(*x.shape[:-1], self.out_features)


def make_lean(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Make modules whose weights were read narrower than ``dtype`` (the model's compute dtype) compute in it (the
    `QuantLinear`s were released as the load installed them). Returns ``model``."""
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.weight.dtype != dtype:
            module.register_forward_hook(lambda _m, _args, out: out.to(dtype))
        elif type(module) is nn.Linear and module.weight.dtype != dtype:
            module.__class__ = HalfStoredLinear
    return model
