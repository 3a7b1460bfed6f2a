"""Interoperability: export to the formats serving engines load (compressed-tensors, GPTQ, GGUF) and import of
checkpoints in those formats written by other tools."""

from __future__ import annotations

from pathlib import Path

from ..errors import FlexQuantError
from ..format.checkpoint import QUANT_CONFIG
from . import ct, gguf, gptq
from .common import DTYPES, read_source
from .foreign import foreign_format, foreign_info, load_foreign

EXPORTERS = {ct.FORMAT: ct.export, gptq.FORMAT: gptq.export, gguf.FORMAT: gguf.export}
ONLINE_ROTATION = ("error", "dense")

__all__ = ["DTYPES", "EXPORTERS", "ONLINE_ROTATION", "export_checkpoint", "foreign_format", "foreign_info",
           "load_foreign"]


def export_checkpoint(path: str | Path, out: str | Path, format: str, dtype: str | None = None,
                      online_rotation: str = "error", gptq_format: str = "gptq", overwrite: bool = False,
                      gguf_pre: str | None = None, gguf_embedding: str = "q8_0") -> dict:
    """Export the flexquant checkpoint at ``path`` to ``out`` in ``format`` ("compressed-tensors", "gptq": a
    folder; "gguf": one .gguf file).

    ``dtype``: float32 / float16 / bfloat16 for the unquantized tensors (default: the checkpoint's).
    ``online_rotation``: "error" (default) refuses layers with an online input rotation; "dense" writes them
    unquantized with the rotation folded into the weight (exact). ``gguf_pre``: llama.cpp's name of the
    tokenizer's pre-tokenization (GGUF only; default: recognised from tokenizer.json); ``gguf_embedding``: q8_0
    (default), q5_0, q4_0, f16 or f32 for the token embedding and output head. For GGUF, ``path`` may also be a plain
    transformers folder of float weights: it is written all in float (``dtype``). Returns a summary dict.
    """
    if format not in EXPORTERS:
        raise FlexQuantError(f"unknown export format {format!r}; available: {', '.join(sorted(EXPORTERS))}")
    if dtype is not None and dtype not in DTYPES:
        raise FlexQuantError(f"dtype {dtype!r} must be one of {', '.join(DTYPES)}")
    if online_rotation not in ONLINE_ROTATION:
        raise FlexQuantError(f"online_rotation {online_rotation!r} must be one of {ONLINE_ROTATION}")
    if format != gptq.FORMAT and gptq_format != "gptq":
        raise FlexQuantError("--gptq-format applies to --format gptq only")
    if format != gguf.FORMAT and (gguf_pre or gguf_embedding != "q8_0"):
        raise FlexQuantError("--gguf-pre and --gguf-embedding apply to --format gguf only")
    kwargs = {gptq.FORMAT: {"checkpoint_format": gptq_format},
              gguf.FORMAT: {"tokenizer_pre": gguf_pre, "embedding": gguf_embedding}}
    kwargs = kwargs.get(format, {})
    if format == gguf.FORMAT and Path(path).is_dir() and not (Path(path) / QUANT_CONFIG).is_file():
        src = gguf.float_source(path)  # a float model: the file llama.cpp's own quantizer starts from
    else:
        src = read_source(path, format, online_rotation)
    return EXPORTERS[format](src, out, dtype=dtype, overwrite=overwrite, **kwargs)
