"""`flexquant export`: a checkpoint as compressed-tensors or GPTQ (for vLLM, SGLang, transformers) or GGUF (for
llama.cpp)."""

from __future__ import annotations

import json

from ..interop.common import DTYPES


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint as compressed-tensors, GPTQ (vLLM, SGLang, transformers) or GGUF (llama.cpp)",
        description="Export a flexquant checkpoint DIR to a Hugging Face folder in a serving format: "
                    "compressed-tensors (pack-quantized, as llm-compressor writes) or GPTQ (AutoGPTQ/GPTQModel "
                    "layout), or to one GGUF file for llama.cpp. Layers must be uniform integer grids (one "
                    "bit-width per layer, fp16 scales); GGUF takes the grids of --target gguf (symmetric 4/5/8 "
                    "bits, group 32: Q4_0/Q5_0/Q8_0).")
    p.add_argument("path", help="flexquant checkpoint folder (for --format gguf also a float transformers folder)")
    p.add_argument("--format", required=True, choices=("compressed-tensors", "gptq", "gguf"))
    p.add_argument("--out", required=True, help="output folder, or .gguf file for --format gguf (written atomically)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="dtype of the unquantized tensors (default: the checkpoint's)")
    p.add_argument("--online-rotation", choices=("error", "dense"), default="error",
                   help="layers with an online input rotation (FlexibleLLM DOSA's down_proj): refuse (default), "
                        "or write them unquantized with the rotation folded into the weight (exact)")
    p.add_argument("--gptq-format", choices=("gptq", "gptq_v2"), default="gptq",
                   help="GPTQ checkpoint_format: gptq (v1, zero points stored minus one; all loaders) or gptq_v2")
    p.add_argument("--gguf-pre", default=None, metavar="NAME",
                   help="GGUF only: llama.cpp's name of the tokenizer's pre-tokenization (default: recognised from "
                        "tokenizer.json; e.g. gpt-2, smollm, llama-bpe)")
    p.add_argument("--gguf-embedding", choices=("q8_0", "q5_0", "q4_0", "f16", "f32"), default="q8_0",
                   help="GGUF only: the token embedding and output head in Q8_0 (llama.cpp's choice for small "
                        "models; default), Q5_0 / Q4_0 (round-to-nearest at export: coarser, leaving more of a file "
                        "size to the linears) or float")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export at --out")
    p.set_defaults(func=run_export)


def run_export(a) -> int:
    from .. import api

    res = api.export(a.path, a.out, a.format, dtype=a.dtype, online_rotation=a.online_rotation,
                     gptq_format=a.gptq_format, overwrite=a.overwrite, gguf_pre=a.gguf_pre,
                     gguf_embedding=a.gguf_embedding)
    print(json.dumps(res))
    return 0
