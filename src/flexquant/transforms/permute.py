"""Act-order without a stored permutation: fold a linear's column permutation into the linears that make its input.

A format without a per-column group index (compressed-tensors) cannot say that a layer's groups run over permuted
columns. Where a linear's input is an MLP intermediate — gate and up projections combined element by element, then
``down_proj`` — permuting the intermediate's channels is exact: the producers' output rows are permuted with the
same permutation, and the consumer's codes, already in the permuted order, need none. GPTQ's act-order then costs
nothing to store. (Residual readers share one stream across the whole model, and attention outputs mix heads:
their permutations do not fold.)
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import FlexQuantError
from ..models.spec import ModelSpec
from ..quant.result import QuantResult


def fold_sites(spec: ModelSpec) -> tuple[str, ...]:
    """Block-relative linears whose input columns are an MLP intermediate (the online-rotation sites)."""
    return tuple(spec.online_rotations)


def _producers(spec: ModelSpec, block: nn.Module, name: str) -> list[str]:
    sub = name.rpartition(".")[0] + "."
    return [n for n in spec.linears_in(block) if n.startswith(sub) and n != name]


def permute_rows(r: QuantResult, rows: torch.Tensor) -> None:
    """Reorder the output rows of ``r`` in place (row i becomes old row ``rows[i]``): exact."""
    r.codes = r.codes[rows.to(r.codes.device)]
    for field in ("scales", "zeros", "fp16_cols", "scale_base"):
        t = getattr(r, field)
        if t is not None:
            setattr(r, field, t[rows.to(t.device)])


@torch.no_grad()
def fold_permutations(block: nn.Module, spec: ModelSpec, results: dict[str, QuantResult], prefix: str) -> list[str]:
    """Fold the column permutation of every fold site of ``block`` into its producers (results and the block's
    fake-quantized weights alike); returns the folded linears' paths."""
    folded = []
    for name in fold_sites(spec):
        r = results.get(f"{prefix}.{name}")
        if r is None or r.perm is None:
            continue
        if r.rotation is not None:
            raise FlexQuantError(f"{prefix}.{name}: an act-order permutation behind an online rotation does not "
                                 "fold into the producers of its input")
        perm = r.perm.cpu()
        n = perm.numel()
        for p in _producers(spec, block, name):
            lin, pr = block.get_submodule(p), results[f"{prefix}.{p}"]
            m = lin.out_features
            if m % n:
                raise FlexQuantError(f"{prefix}.{p} has {m} output rows, not a multiple of {prefix}.{name}'s {n} "
                                     "input columns: its permutation cannot be folded")
            rows = torch.cat([perm + k * n for k in range(m // n)])  # a fused gate_up: both halves alike
            permute_rows(pr, rows)
            lin.weight.data = lin.weight.data[rows.to(lin.weight.device)]
            if lin.bias is not None:
                lin.bias.data = lin.bias.data[rows.to(lin.bias.device)]
        lin = block.get_submodule(name)
        lin.weight.data = lin.weight.data[:, perm.to(lin.weight.device)]
        r.perm = None
        folded.append(f"{prefix}.{name}")
    return folded
