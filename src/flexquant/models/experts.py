"""Mixture-of-experts blocks: the fused 3-D expert parameters of transformers 5 as one linear per expert.

transformers 5 stores the routed experts of Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 ... as one module with two
3-D parameters (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) whose forward(hidden, top_k_index,
top_k_weights) runs each expert on the tokens routed to it. `unfuse_experts` replaces each such module with a
`LinearExperts`: the same computation over an ``nn.ModuleList`` of `Expert`s, each with ``gate_proj`` /
``up_proj`` / ``down_proj`` ``nn.Linear``s. That is what the pipeline quantizes (each expert's linears get their own
Hessian from the tokens routed to it) and what a checkpoint stores (``mlp.experts.E.gate_proj``, the per-expert
layout of the hub checkpoints and of the compressed-tensors / GPTQ checkpoints vLLM serves).

Calibration (`calibration`): ``routed`` (default) gives each expert the tokens the router sends it, each token's
row weighted by its routing weight (`ROW_WEIGHTS`, read by the Hessian hook); ``all`` runs every token through
every expert for the Hessians (unweighted) while the block's output stays the routed one. The router and the
shared-expert gate stay in full precision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import FlexQuantError

ROW_WEIGHTS = "_flexquant_row_weights"  # set on an expert's linears for the duration of their call
CALIBRATION = ("routed", "all")


class Expert(nn.Module):
    """One expert: down(act(gate(x)) · up(x))."""

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, inter, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(inter, hidden, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, act) -> torch.Tensor:
        return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))


class LinearExperts(nn.Module):
    """A fused experts module's computation over per-expert linears (same routing, same outputs)."""

    def __init__(self, num_experts: int, hidden: int, inter: int, act_fn, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.num_experts = num_experts
        self.act_fn = act_fn
        for e in range(num_experts):  # children "0", "1", ...: paths mlp.experts.E.gate_proj as the hub stores them
            self.add_module(str(e), Expert(hidden, inter, dtype, device))
        self.calibrating: str | None = None  # a `CALIBRATION` mode inside `calibration`, else None (inference)

    @property
    def experts(self) -> list[Expert]:
        return [self.get_submodule(str(e)) for e in range(self.num_experts)]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(top_k_index == e)  # the (token, top-k slot) pairs routed to expert e
            if self.calibrating == "all":  # every token through the expert (its Hessians); the routed rows kept
                y = expert(hidden_states, self.act_fn)[token]
            elif token.numel() == 0:
                continue
            elif self.calibrating == "routed":
                y = self._weighted(expert, hidden_states[token], top_k_weights[token, slot].float())
            else:
                y = expert(hidden_states[token], self.act_fn)
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out

    def _weighted(self, expert: Expert, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        linears = (expert.gate_proj, expert.up_proj, expert.down_proj)
        for lin in linears:
            setattr(lin, ROW_WEIGHTS, weights)
        try:
            return expert(x, self.act_fn)
        finally:
            for lin in linears:
                lin.__dict__.pop(ROW_WEIGHTS, None)


def _fused(module: nn.Module) -> bool:
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3
            and hasattr(module, "num_experts"))


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module under ``model`` with a `LinearExperts` holding the same weights (meta
    parameters stay meta); the number replaced."""
    found = [(name, m) for name, m in model.named_modules() if _fused(m)]
    for name, m in found:
        layout = {k: getattr(m, k, d) for k, d in (("has_bias", False), ("is_transposed", False),
                                                   ("is_concatenated", True), ("has_gate", True),
                                                   ("has_post_expert_norm", False))}
        if layout != {"has_bias": False, "is_transposed": False, "is_concatenated": True, "has_gate": True,
                      "has_post_expert_norm": False}:
            raise FlexQuantError(f"the experts at {name} are stored as {layout}; flexquant quantizes experts with "
                                 "concatenated [gate; up] weights, no biases and no norms (Mixtral, Qwen-MoE, "
                                 "DeepSeek): this family's experts are not supported yet")
        gu, down = m.gate_up_proj, m.down_proj
        E, two_i, H = gu.shape
        if tuple(down.shape) != (E, H, two_i // 2) or two_i % 2:
            raise FlexQuantError(f"the experts at {name} have gate_up_proj {tuple(gu.shape)} and down_proj "
                                 f"{tuple(down.shape)}, which are not [E, 2I, H] and [E, H, I]")
        new = LinearExperts(E, H, two_i // 2, m.act_fn, gu.dtype, "meta" if gu.is_meta else gu.device)
        if not gu.is_meta:
            with torch.no_grad():
                for e, expert in enumerate(new.experts):
                    gate, up = gu[e].chunk(2, dim=0)
                    expert.gate_proj.weight.copy_(gate)
                    expert.up_proj.weight.copy_(up)
                    expert.down_proj.weight.copy_(down[e])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return len(found)


def experts_count(config) -> int:
    """Routed experts per MoE block from a config (object or dict); 0 for a dense model."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if isinstance(get(key), int) and get(key) > 0:
            return get(key)
    return 0


@contextlib.contextmanager
def calibration(model: nn.Module, mode: str) -> Iterator[None]:
    """Route calibration tokens as ``mode`` says (`CALIBRATION`) in every `LinearExperts` of ``model``."""
    if mode not in CALIBRATION:
        raise FlexQuantError(f"moe_calibration {mode!r} is not one of {', '.join(CALIBRATION)}")
    mods = [m for m in model.modules() if isinstance(m, LinearExperts)]
    for m in mods:
        m.calibrating = mode
    try:
        yield
    finally:
        for m in mods:
            m.calibrating = None



CALIB_TOKENS = "calib_tokens"  # set on an expert's linear: the calibration tokens its Hessian came from


def sparse_damped(H: torch.Tensor, tokens: int, expert: nn.Module) -> torch.Tensor:
    """An expert linear's Hessian from ``tokens`` routed tokens, recorded on each linear of ``expert``. Fewer
    tokens than inputs leave H rank-deficient: it is blended toward its mean diagonal by the missing share (no
    tokens: the identity, round-to-nearest)."""
    for lin in [expert, *expert.children()]:
        setattr(lin, CALIB_TOKENS, int(tokens))
    n = H.shape[0]
    if tokens >= n:
        return H
    mean = float(H.diagonal().mean()) if tokens else 0.0
    share = tokens / n
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    return share * H + (1 - share) * (mean if mean > 0 else 1.0) * eye


def summary(records, mode: str) -> dict:
    """The report's view of the experts: each expert linear's calibration tokens and bits, and those whose
    Hessian saw fewer tokens than it has inputs (damped, see `sparse_damped`)."""
    rows = [{"name": r.name, "tokens": r.stats[CALIB_TOKENS], "bits": round(r.mean_bits, 4), "inputs": r.shape[1]}
            for r in records if CALIB_TOKENS in r.stats]
    return {"calibration": mode, "linears": rows,
            "under_sampled": [{k: r[k] for k in ("name", "tokens", "inputs")} for r in rows
                              if r["tokens"] < r["inputs"]]}
