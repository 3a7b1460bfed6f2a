"""`ModelSpec`: what the pipeline needs to know about an architecture family, as data."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace

import torch

from ..errors import FlexQuantError


@dataclass(frozen=True)
class ModelSpec:
    """Paths are attribute paths relative to the CausalLM (model level) or the decoder layer (block level);
    names of config attributes are read from ``model.config``."""

    family: str
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    # Linear groups in forward order; the linears of a group read the same input.
    linear_groups: tuple[tuple[str, ...], ...] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )
    # RMSNorm whose scale can be folded into the linears that read its output.
    norm_linear_pairs: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    )
    residual_readers: tuple[str, ...] = (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj",
    )
    residual_writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    # Linears whose input space is rotated at run time (the MLP intermediate has no norm to fold into).
    online_rotations: tuple[str, ...] = ("mlp.down_proj",)
    # Norms applied to the q/k projections' outputs (per head: Qwen3, Gemma3; over the whole projection: OLMo2);
    # they constrain transforms of those outputs.
    qk_norms: tuple[str, ...] = ()
    # Every norm computes x̂·(norm_offset + w): 0 for x̂·w, 1 for Gemma's x̂·(1 + w). Folding moves
    # (norm_offset + w) into the readers and leaves the norm computing x̂.
    norm_offset: float = 0.0
    # Residual block of two sub-layers, which the cached fast path (`pipeline.prenorm`) and LFD's feedback need:
    #   h' = h + m·attn_output_norm(o_proj(attention(...)));  out = h' + m·mlp_output_norm(mlp(mlp_norm(h')))
    # where a norm left unset is the identity and m is the block's ``residual_multiplier`` attribute (1 unset).
    prenorm: bool = True
    mlp_norm: str | None = "post_attention_layernorm"
    mlp: str = "mlp"
    attn_output_norm: str | None = None  # OLMo2, Gemma: the sub-layer output is normed before the residual add
    mlp_output_norm: str | None = None
    residual_multiplier: str | None = None  # Granite: a block attribute scaling each sub-layer output
    # Residual-stream rotations (DOSA, hiratio/adaptive transforms that fold norms) are exact: every residual
    # reader reads through a folded norm of ``norm_linear_pairs`` and every writer's output reaches the residual
    # stream through no norm. Checked against the structure above.
    rotatable: bool = True
    # How the head's outputs become logits: divided by the config's ``logits_divisor`` (Granite), then soft-capped
    # as cap·tanh(x/cap) by the config's ``logits_softcap`` when it is set (Gemma 2/3).
    logits_divisor: str | None = None
    logits_softcap: str | None = None
    # The attention implementation the model is built with (Gemma 2's attention soft-capping is eager only).
    attn_implementation: str = "sdpa"
    # Built at load time by `models.discover` for a family without a tested spec: linear groups only (the generic
    # per-group recompute path); methods that need more of the structure refuse it.
    discovered: bool = False
    # Mixture of experts: the path (in a block) of the routed experts, unfused into one linear per expert
    # (`models.experts`). A ``*`` in a linear's path stands for the expert index: `expanded` gives each expert its
    # own groups (its own Hessian, from the tokens routed to it). Routers and shared-expert gates are not linears of
    # the spec: they stay in full precision.
    experts: str | None = None
    # Tensor names of the family's hub checkpoints where they differ from the model's own modules (transformers
    # renames them when it loads a checkpoint whole): pairs of block-relative paths, the model's then the hub's,
    # a ``*`` standing for the expert index. Exports write the hub's names; streamed loads and imports read them.
    checkpoint_names: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        read = {r for _, readers in self.norm_linear_pairs for r in readers}
        if self.rotatable and (self.attn_output_norm or self.mlp_output_norm or not set(self.residual_readers) <= read):
            raise ValueError(f"ModelSpec {self.family}: rotatable, but a residual reader reads no folded norm or a "
                             "sub-layer output is normed")

    def expanded(self, num_experts: int) -> ModelSpec:
        """The spec of a model with ``num_experts`` routed experts per block: each group naming ``*`` repeated
        once per expert (the other fields likewise)."""
        def each(names_: tuple[str, ...]) -> list[tuple[str, ...]]:
            if not any("*" in n for n in names_):
                return [names_]
            return [tuple(n.replace("*", str(e)) for n in names_) for e in range(num_experts)]

        def groups(gs):
            return tuple(out for g in gs for out in each(g))

        def names(ns):
            return tuple(m for n in ns for m in each((n,)))

        return replace(self, linear_groups=groups(self.linear_groups), residual_readers=names(self.residual_readers),
                       residual_writers=names(self.residual_writers), online_rotations=names(self.online_rotations),
                       norm_linear_pairs=tuple((norm, names(rs)) for norm, rs in self.norm_linear_pairs))

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.linear_groups for name in group)

    def groups_in(self, block: torch.nn.Module) -> tuple[tuple[str, ...], ...]:
        """The linear groups ``block`` has. A mixture-of-experts spec lists the groups of its dense and its expert
        blocks (DeepSeek's first layers, Qwen-MoE's ``mlp_only_layers``) and of its attention variants; a block has
        the groups whose every linear it holds. Any other spec's blocks have all of them."""
        if self.experts is None:
            return self.linear_groups
        return tuple(g for g in self.linear_groups if all(_has(block, n) for n in g))

    def linears_in(self, block: torch.nn.Module) -> tuple[str, ...]:
        return tuple(name for group in self.groups_in(block) for name in group)

    @property
    def direct_writers(self) -> bool:
        """Each residual writer's output is added to the residual stream as it is (no norm, no multiplier)."""
        return not self.attn_output_norm and not self.mlp_output_norm and self.residual_multiplier is None

    def logits(self, config, head_out: torch.Tensor) -> torch.Tensor:
        """The model's logits from the head's outputs ``head_out`` (itself for a family without logit transforms)."""
        if self.logits_divisor is not None:
            head_out = head_out / getattr(config, self.logits_divisor)
        cap = getattr(config, self.logits_softcap, None) if self.logits_softcap is not None else None
        if cap:
            head_out = torch.tanh(head_out / cap) * cap
        return head_out

    def to_checkpoint(self, name: str) -> str:
        """A tensor's (or module's) name in the family's hub checkpoints (``checkpoint_names``)."""
        return _rename(name, self.layers, self.checkpoint_names, False)

    def from_checkpoint(self, name: str) -> str:
        """The model's own name of a tensor named as the family's hub checkpoints name it."""
        return _rename(name, self.layers, self.checkpoint_names, True)

    def head_logits(self, model: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits of the last block's output ``h`` through the final norm and the head (both already placed
        where they compute; ``h`` is moved there, in the head's dtype)."""
        head = model.get_submodule(self.lm_head)
        h = h.to(head.weight.device, head.weight.dtype)
        return self.logits(model.config, head(model.get_submodule(self.final_norm)(h))).float()


@functools.lru_cache(maxsize=None)
def _renames(layers: str, pairs: tuple[tuple[str, str], ...], reverse: bool) -> tuple:
    out = []
    for ours, hub in pairs:
        src, dst = (hub, ours) if reverse else (ours, hub)
        body = re.escape(src).replace(r"\*", r"(\d+)")
        out.append((re.compile(rf"^({re.escape(layers)}\.\d+\.){body}(?=\.|$)"), dst))
    return tuple(out)


def _rename(name: str, layers: str, pairs: tuple[tuple[str, str], ...], reverse: bool) -> str:
    for pattern, dst in _renames(layers, pairs, reverse):
        m = pattern.match(name)
        if m:
            star = dst.replace("*", m.group(2)) if m.lastindex and m.lastindex > 1 else dst
            return m.group(1) + star + name[m.end():]
    return name


def _has(module: torch.nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
# Gemma 2/3: sandwich norms around both sub-layers, x̂·(1 + w) norms, soft-capped logits.
_GEMMA = dict(
    norm_offset=1.0, rotatable=False, norm_linear_pairs=(("input_layernorm", _QKV), ("pre_feedforward_layernorm",
                                                                                       _GATE_UP)),
    mlp_norm="pre_feedforward_layernorm", attn_output_norm="post_attention_layernorm",
    mlp_output_norm="post_feedforward_layernorm", logits_softcap="final_logit_softcapping",
)

# Mixture of experts (blocks whose MLP is a router over experts, each expert a gated MLP): attention as Llama's,
# then each routed expert's gate/up and down (the router reads the normed input too, so nothing is rotated).
_EXPERTS = (("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"), ("mlp.experts.*.down_proj",))
_MOE = dict(norm_linear_pairs=(("input_layernorm", _QKV),), residual_readers=_QKV, residual_writers=(
    "self_attn.o_proj",), online_rotations=(), rotatable=False, prenorm=False, experts="mlp.experts")
_SHARED = (("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"), ("mlp.shared_expert.down_proj",))
_DENSE = (_GATE_UP, ("mlp.down_proj",))  # the MLP of a MoE model's dense blocks
# DeepSeek's multi-head latent attention: q (or its low-rank q_a) and the kv latent read the normed input; q_b
# and kv_b read their latents through the q_a / kv_a norms (inside the attention, so nothing there folds)
_MLA = (("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"), ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"),
        ("self_attn.q_b_proj",), ("self_attn.kv_b_proj",), ("self_attn.o_proj",))

SPECS: dict[str, ModelSpec] = {
    "llama": ModelSpec("llama"),
    "mistral": ModelSpec("mistral"),
    "qwen2": ModelSpec("qwen2"),
    "qwen3": ModelSpec("qwen3", qk_norms=("self_attn.q_norm", "self_attn.k_norm")),
    # fused q/k/v and gate/up linears, quantized as they are stored
    "phi3": ModelSpec(
        "phi3",
        linear_groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
        norm_linear_pairs=(("input_layernorm", ("self_attn.qkv_proj",)),
                           ("post_attention_layernorm", ("mlp.gate_up_proj",))),
        residual_readers=("self_attn.qkv_proj", "mlp.gate_up_proj"),
    ),
    # no norm before the sub-layers; their outputs are normed before the residual add
    "olmo2": ModelSpec(
        "olmo2", norm_linear_pairs=(), qk_norms=("self_attn.q_norm", "self_attn.k_norm"), rotatable=False,
        mlp_norm=None, attn_output_norm="post_attention_layernorm", mlp_output_norm="post_feedforward_layernorm",
    ),
    # Llama-shaped; scalar multipliers on the embedding, the sub-layer outputs, the attention scores and the logits
    "granite": ModelSpec("granite", residual_multiplier="residual_multiplier", logits_divisor="logits_scaling"),
    "gemma2": ModelSpec("gemma2", **_GEMMA, attn_implementation="eager"),
    "gemma3_text": ModelSpec("gemma3_text", qk_norms=("self_attn.q_norm", "self_attn.k_norm"), **_GEMMA),
    # hub checkpoints name the experts block_sparse_moe.experts.E.w1 / w3 / w2 (gate / up / down)
    "mixtral": ModelSpec("mixtral", linear_groups=(_QKV, ("self_attn.o_proj",)) + _EXPERTS, **_MOE, checkpoint_names=(
        ("mlp.experts.*.gate_proj", "block_sparse_moe.experts.*.w1"), ("mlp.experts.*.up_proj",
                                                                       "block_sparse_moe.experts.*.w3"),
        ("mlp.experts.*.down_proj", "block_sparse_moe.experts.*.w2"), ("mlp.gate", "block_sparse_moe.gate"))),
    "qwen3_moe": ModelSpec("qwen3_moe", linear_groups=(_QKV, ("self_attn.o_proj",)) + _DENSE + _EXPERTS,
                           qk_norms=("self_attn.q_norm", "self_attn.k_norm"), **_MOE),
    # a shared expert beside the routed ones (its sigmoid gate stays in full precision)
    "qwen2_moe": ModelSpec("qwen2_moe", linear_groups=(_QKV, ("self_attn.o_proj",)) + _DENSE + _SHARED + _EXPERTS,
                           **_MOE),
    # dense first blocks, then shared + routed experts (the router's score-correction bias stays as it is)
    "deepseek_v3": ModelSpec(
        "deepseek_v3", linear_groups=_MLA + _DENSE + (("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"),
                                                      ("mlp.shared_experts.down_proj",)) + _EXPERTS,
        **{**_MOE, "norm_linear_pairs": (), "residual_readers": ()}),
}


# Specs discovered for families without one in SPECS (`models.discover`), by model type; the latest load wins.
DISCOVERED: dict[str, ModelSpec] = {}


def register_discovered(spec: ModelSpec) -> None:
    """Make a discovered spec what `get_spec` answers for its family (never one of SPECS)."""
    if spec.family in SPECS or not spec.discovered:
        raise ValueError(f"ModelSpec {spec.family}: only a discovered spec of a family without one is registered")
    DISCOVERED[spec.family] = spec


def find_spec(model_type: str) -> ModelSpec | None:
    """The family's registered spec (built in, else discovered), unexpanded; None for a family without one."""
    return SPECS.get(model_type) or DISCOVERED.get(model_type)


def get_spec(model_type: str, config=None) -> ModelSpec:
    """The family's spec; a mixture-of-experts family's expanded to the experts ``config`` (object or dict)
    declares."""
    spec = find_spec(model_type)
    if spec is None:
        raise FlexQuantError(
            f"model family {model_type!r} is not supported; supported families: {', '.join(sorted(SPECS))}"
        )
    if spec.experts is None or config is None:
        return spec
    from .experts import experts_count

    return _expanded(spec, experts_count(config))


@functools.lru_cache(maxsize=16)
def _expanded(spec: ModelSpec, num_experts: int) -> ModelSpec:
    if num_experts < 1:
        raise FlexQuantError(f"the {spec.family} config declares no experts (num_experts / num_local_experts)")
    return spec.expanded(num_experts)
