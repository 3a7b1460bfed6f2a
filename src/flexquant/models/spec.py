"""`ModelSpec`: what the pipeline needs to know about an architecture family, as data."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FlexQuantError


@dataclass(frozen=True)
class ModelSpec:
    """Paths are attribute paths relative to the CausalLM (model level) or the decoder layer (block level)."""

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
    # Per-head norms applied after q/k projections (Qwen3); they constrain head-dim rotations.
    qk_norms: tuple[str, ...] = ()
    # Pre-norm residual block: out = h' + mlp(mlp_norm(h')), h' = h + attn(...). When set, the
    # pipeline reuses sub-layer inputs instead of re-running the block front for every linear group.
    prenorm: bool = True
    mlp_norm: str = "post_attention_layernorm"
    mlp: str = "mlp"

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.linear_groups for name in group)


SPECS: dict[str, ModelSpec] = {
    "llama": ModelSpec("llama"),
    "mistral": ModelSpec("mistral"),
    "qwen2": ModelSpec("qwen2"),
    "qwen3": ModelSpec("qwen3", qk_norms=("self_attn.q_norm", "self_attn.k_norm")),
}


def get_spec(model_type: str) -> ModelSpec:
    if model_type not in SPECS:
        raise FlexQuantError(
            f"model family {model_type!r} is not supported; supported families: {', '.join(sorted(SPECS))}"
        )
    return SPECS[model_type]
