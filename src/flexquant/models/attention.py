"""Attention with K/V-cache fake quantization, as a transformers attention function.

Keys (after RoPE) and values reach the attention function per head, [batch, kv_heads, tokens, head_dim];
an attention module that carries a K/V quantizer (``module._fq_kv``, set by `flexquant.actquant`) has
them replaced by their quantized values before SDPA runs. Quantization is per token and head, so
quantizing the whole (cached) key/value sequence at every step equals quantizing each token once when
it is written to the cache: ``generate`` with the KV cache on sees exactly the quantized cache.
"""

from __future__ import annotations

from torch import nn

KV_ATTENTION = "flexquant_kvq"
_registered = False


def _kv_quant_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kv = module.__dict__.get("_fq_kv")
    if kv is not None:
        key, value = kv.key(key), kv.value(value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(KV_ATTENTION, _kv_quant_attention)
    AttentionMaskInterface.register(KV_ATTENTION, sdpa_mask)
    _registered = True


def use_kv_attention(model: nn.Module, on: bool = True) -> None:
    """Route ``model``'s attention through the K/V-quantizing function (``on``), or back to SDPA."""
    _register()
    model.config._attn_implementation = KV_ATTENTION if on else "sdpa"
