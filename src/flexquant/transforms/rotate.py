"""Hadamard rotation of a model (DOSA step 1, QuaRot-style), computed in float64 and exact.

With an orthogonal Q, W̃x̃ = Wx when x̃ = xQ, readers of x take W̃ = WQ and writers take W̃ = QᵀW.
RMSNorm commutes with Q once its scale γ is folded into the linears that read it, so:
  1. fold every norm's γ into the following linears (and the final norm's into lm_head);
  2. untie lm_head from the embedding when they are tied (they now differ);
  3. rotate the residual stream: embedding rows, residual readers (q,k,v,gate,up,lm_head) by Q,
     residual writers (o,down) by Qᵀ;
  4. rotate the MLP intermediate online: down_proj's weight by Q_m offline, and its input by Q_m
     at run time (fast Walsh–Hadamard transform, recorded so that `flexquant.load` re-applies it).
Q = diag(s)·(F_a ⊗ H_(2^k)) with random signs s (seeded): a randomized Hadamard matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import FlexQuantError
from ..models.spec import ModelSpec
from ..models.stream import residency
from .hadamard import factorize, hadamard_transform, small_factor


@dataclass
class Rotation:
    """x ↦ (x ⊙ s)·(F ⊗ H_b)/√n: sign vector s [n] (±1) and small factor F [a, a] (see `hadamard_transform`)."""

    signs: torch.Tensor
    factor: torch.Tensor

    @classmethod
    def random(cls, n: int, seed: int) -> Rotation:
        g = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
        return cls(signs, small_factor(factorize(n), seed))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x·Q along the last dim, in x's dtype (float64 math for float64 inputs); plain torch (the packed
        model's layers run it through `flexquant.kernels.rotate`, which has a fused GPU path)."""
        return hadamard_transform(x * self.signs.to(x.dtype), self.factor.to(x.dtype))


ROWS = 4096  # rows transformed at a time in float64 (an embedding at once would need vocab × d × 8 bytes)


def _by_rows(fn, X: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fn applied to float64 chunks of X's rows, in ``dtype`` (fn acts on each row alone: the same result), each
    chunk written into the result (one copy of X beside it, not a list of chunks and their concatenation)."""
    out = torch.empty(X.shape, dtype=dtype, device=X.device)
    for a in range(0, X.shape[0], ROWS):
        out[a:a + ROWS] = fn(X[a:a + ROWS].double())
    return out


def _rotate_in(lin: nn.Linear, R: Rotation) -> None:
    """Reader of the rotated space: W̃ = W·Q."""
    W = lin.weight.data
    lin.weight.data = _by_rows(R.apply, W, W.dtype)


def _rotate_out(lin: nn.Linear, R: Rotation) -> None:
    """Writer into the rotated space: W̃ = Qᵀ·W (and b̃ = b·Q)."""
    W = lin.weight.data
    lin.weight.data = _by_rows(R.apply, W.T, W.dtype).T.contiguous()
    if lin.bias is not None:
        lin.bias.data = R.apply(lin.bias.data.double()).to(lin.bias.dtype)


def fold_norm(norm: nn.Module, linears: list[nn.Linear], offset: float = 0.0) -> None:
    """Move an RMSNorm's scale γ = offset + w (`ModelSpec.norm_offset`: 0 for x̂·w, 1 for Gemma's x̂·(1 + w)) into
    the linears reading its output; γ becomes 1."""
    gamma = norm.weight.data.double()
    if offset:
        gamma = gamma + offset
    for lin in linears:
        lin.weight.data = _by_rows(lambda w: w * gamma[None, :], lin.weight.data, lin.weight.dtype)
    norm.weight.data = torch.full_like(norm.weight.data, 1.0 - offset) if offset else torch.ones_like(norm.weight.data)


def untie_lm_head(model: nn.Module, spec: ModelSpec) -> None:
    head = model.get_submodule(spec.lm_head)
    emb = model.get_submodule(spec.embed)
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(emb.weight.data.clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = None


class OnlineRotation(nn.Module):
    """Applies a `Rotation` to a module's input at run time (as a forward pre-hook holder)."""

    def __init__(self, R: Rotation):
        super().__init__()
        # not persistent: the packed layer stores its own copy, and a streamed block's reload keeps these
        self.register_buffer("signs", R.signs.float(), persistent=False)
        self.register_buffer("factor", R.factor.float(), persistent=False)

    def rotation(self) -> Rotation:
        return Rotation(self.signs, self.factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Rotation(self.signs, self.factor).apply(x)


def attach_online_rotation(lin: nn.Module, R: Rotation) -> None:
    """Make ``lin`` rotate its input by R before its matmul while the model is being quantized (the rotation
    is a submodule so that it follows the layer's device moves; the packed layer stores its own copy). Attaching
    twice is a no-op (a streamed block is transformed again each time it is read)."""
    if isinstance(getattr(lin, "online_rotation", None), OnlineRotation):
        return
    lin.online_rotation = OnlineRotation(R).to(lin.weight.device if hasattr(lin, "weight") else "cpu")
    lin.register_forward_pre_hook(lambda m, args: (m.online_rotation(args[0]),) + args[1:])


@dataclass
class RotatedModel:
    """What `rotate_model` did: facts for the report, and the online rotation of each layer that has one
    (the packed layer stores it: `QuantResult.rotation`)."""

    facts: dict
    online: dict[str, Rotation]


@torch.no_grad()
def _rotate_ends(model: nn.Module, spec: ModelSpec, R: Rotation, paths: set) -> None:
    """The ends at ``paths``: untie the head, fold the final norm into it, rotate the embedding rows and the
    head's input space (the norm and the head go together; the embedding alone where it is not tied)."""
    if spec.lm_head in paths:
        untie_lm_head(model, spec)
        fold_norm(model.get_submodule(spec.final_norm), [model.get_submodule(spec.lm_head)], spec.norm_offset)
    if spec.embed in paths:
        emb = model.get_submodule(spec.embed)
        emb.weight.data = _by_rows(R.apply, emb.weight.data, emb.weight.dtype)
    if spec.lm_head in paths:
        _rotate_in(model.get_submodule(spec.lm_head), R)


@torch.no_grad()
def _rotate_block(block: nn.Module, spec: ModelSpec, R: Rotation, online: dict[str, Rotation]) -> None:
    """Fold the block's norms, rotate its residual readers and writers, and its online-rotated inputs."""
    for norm_name, readers in spec.norm_linear_pairs:
        fold_norm(block.get_submodule(norm_name), [block.get_submodule(r) for r in readers], spec.norm_offset)
    for name in spec.residual_readers:
        _rotate_in(block.get_submodule(name), R)
    for name in spec.residual_writers:
        _rotate_out(block.get_submodule(name), R)
    _rotate_online(block, online)


def _rotate_online(block: nn.Module, online: dict[str, Rotation]) -> None:
    """Each named linear of ``block`` reads its input through its rotation: weight rotated, rotation attached."""
    for name, Rm in online.items():
        lin = block.get_submodule(name)
        _rotate_in(lin, Rm)
        attach_online_rotation(lin, Rm)


@torch.no_grad()
def rotate_model(model: nn.Module, spec: ModelSpec, seed: int = 0, online: bool = True) -> RotatedModel:
    """Rotate ``model`` (exactly equivalent): in place for a model held in memory; for a streamed one the
    rotation is applied to each block and to the ends whenever they are read (`models.stream`). ``online``
    False: the residual stream only (no online input rotations, for formats that cannot express them)."""
    if not spec.rotatable:
        raise FlexQuantError(f"a rotation of the residual stream is not exact for {spec.family}: its ModelSpec "
                             "declares norms on the sub-layer outputs or residual readers without a foldable norm")
    res = residency(model, spec)
    layers = model.get_submodule(spec.layers)
    d = model.config.hidden_size
    Rres = Rotation.random(d, seed)
    res.transform_ends(lambda m, paths: _rotate_ends(m, spec, Rres, paths),
                       groups=((spec.embed,), (spec.final_norm, spec.lm_head)))
    model.config.tie_word_embeddings = False
    facts = {"residual": {"n": d, "small_factor": Rres.factor.shape[0], "hadamard": factorize(d).exact}}
    sites: dict[str, Rotation] = {}
    per_block: list[dict[str, Rotation]] = []
    for i, block in enumerate(layers):
        mine = {}
        for name in spec.online_rotations if online else ():
            n = block.get_submodule(name).in_features
            mine[name] = sites[f"{spec.layers}.{i}.{name}"] = Rotation.random(n, seed + 1 + i)
            facts.setdefault("online", {"n": n, "small_factor": mine[name].factor.shape[0],
                                        "hadamard": factorize(n).exact, "sites": []})
            facts["online"]["sites"].append(f"{spec.layers}.{i}.{name}")
        per_block.append(mine)
    res.transform_blocks(lambda i, block: _rotate_block(block, spec, Rres, per_block[i]))
    return RotatedModel(facts, sites)


@torch.no_grad()
def rotate_inputs_online(model: nn.Module, spec: ModelSpec, seed: int = 0) -> RotatedModel:
    """Rotate the input of every linear at run time (W ↦ W·Q offline, x ↦ x·Q online), one randomized Hadamard
    per group of linears that read the same input: incoherence without folding anything, for families whose
    residual stream cannot be rotated exactly (Gemma's sandwich norms). Exact; costs one transform per group."""
    if spec.experts is not None:
        raise FlexQuantError(f"online input rotations of {spec.family}'s experts are not supported; pass --no-dosa")
    res = residency(model, spec)
    sites: dict[str, Rotation] = {}
    per_block: list[dict[str, Rotation]] = []
    for i, block in enumerate(model.get_submodule(spec.layers)):
        mine = {}
        for k, group in enumerate(spec.groups_in(block)):
            R = Rotation.random(block.get_submodule(group[0]).in_features, seed + 1 + 8 * i + k)
            for name in group:
                mine[name] = sites[f"{spec.layers}.{i}.{name}"] = R
        per_block.append(mine)
    res.transform_blocks(lambda i, block: _rotate_online(block, per_block[i]))
    sizes = sorted({R.signs.shape[0] for R in sites.values()})
    return RotatedModel({"online": {"n": sizes, "sites": list(sites), "every_linear": True}}, sites)


def incoherence(W: torch.Tensor) -> float:
    """μ(W) = √(mn)·max|W_ij| / ‖W‖_F (1 for a flat matrix, √(mn) for a single spike)."""
    W = W.detach().double()
    return float(W.abs().max() * (W.numel() ** 0.5) / W.norm())
