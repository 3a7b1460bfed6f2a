"""`flexquant export` and `flexquant report`, and the foreign-checkpoint side of `flexquant info`."""

from __future__ import annotations

import json
from pathlib import Path

from .common import DTYPES


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

    p = sub.add_parser("report", help="write a readable page (Markdown or HTML) with the run's plots and figures",
                       description="Write DIR/report.md (or --html: report.html with the plots embedded) from "
                                   "a checkpoint's report.json and quant_config.json, with plots of bits and "
                                   "error per layer and the transform choices.")
    p.add_argument("path", help="flexquant checkpoint folder (or a GPTQ / compressed-tensors folder)")
    p.add_argument("--out", default=None, help="output file (default: DIR/report.md or DIR/report.html)")
    p.add_argument("--html", action="store_true", help="one self-contained HTML file instead of Markdown + PNGs")


def cmd_export(a) -> int:
    from .. import api

    res = api.export(a.path, a.out, a.format, dtype=a.dtype, online_rotation=a.online_rotation,
                     gptq_format=a.gptq_format, overwrite=a.overwrite)
    print(json.dumps(res))
    return 0


def cmd_report(a) -> int:
    from ..report_page import write_report_page

    out = write_report_page(a.path, a.out, html_page=a.html)
    print(json.dumps({"report": str(out)}))
    return 0


def print_foreign_info(path: Path, as_json: bool) -> int:
    from .foreign import foreign_info

    info = foreign_info(path)
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{path}: {info['format']} (foreign) · {info['bpw']:.4f} bpw over {info['quantized_weights']:,} weights · "
          f"{info['file_bytes'] / 2**20:.1f} MiB on disk")
    print(f"{'module':<40} {'shape':>12} {'group':>6} {'bits':>5} {'sym':>4} {'act':>4} {'bpw':>7}")
    for n, m in info["modules"].items():
        print(f"{n:<40} {m['out_features']:>5}x{m['in_features']:<6} {m['group_size']:>6} {m['bits'][0]:>5} "
              f"{'y' if m['sym'] else 'n':>4} {'y' if m['act_order'] else 'n':>4} {m['bpw']:>7.3f}")
    return 0
