"""`flexquant export`: a checkpoint as compressed-tensors or GPTQ (for vLLM, SGLang, transformers)."""

from __future__ import annotations

import json

from ..interop.common import DTYPES


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="write a checkpoint as compressed-tensors or GPTQ (for vLLM, SGLang, transformers)",
        description="Export a flexquant checkpoint DIR to a Hugging Face folder in a serving format: "
                    "compressed-tensors (pack-quantized, as llm-compressor writes) or GPTQ (AutoGPTQ/GPTQModel "
                    "layout). Layers must be uniform integer grids (one bit-width per layer, fp16 scales).")
    p.add_argument("path", help="flexquant checkpoint folder")
    p.add_argument("--format", required=True, choices=("compressed-tensors", "gptq"))
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="dtype of the unquantized tensors (default: the checkpoint's)")
    p.add_argument("--online-rotation", choices=("error", "dense"), default="error",
                   help="layers with an online input rotation (FlexibleLLM DOSA's down_proj): refuse (default), "
                        "or write them unquantized with the rotation folded into the weight (exact)")
    p.add_argument("--gptq-format", choices=("gptq", "gptq_v2"), default="gptq",
                   help="GPTQ checkpoint_format: gptq (v1, zero points stored minus one; all loaders) or gptq_v2")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export at --out")
    p.set_defaults(func=run_export)


def run_export(a) -> int:
    from .. import api

    res = api.export(a.path, a.out, a.format, dtype=a.dtype, online_rotation=a.online_rotation,
                     gptq_format=a.gptq_format, overwrite=a.overwrite)
    print(json.dumps(res))
    return 0
