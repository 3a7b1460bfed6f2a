"""`flexquant quantize | eval | info | generate`: thin wrappers over `flexquant.api`.

Flags are named like the config fields they set. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import CLIP_MODES, SUPPORTED_BITS, GPTQConfig, GridConfig, QuantConfig
from .errors import FlexQuantError

log = logging.getLogger("flexquant")
_DEFAULT = QuantConfig()


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model and write a packed checkpoint",
                       description="Quantize MODEL (built-in name, local folder or hub id) and save a packed "
                                   "checkpoint with a JSON run report (report.json) and plot into --out.")
    p.add_argument("model", nargs="?", default=_DEFAULT.model,
                   help="smollm2-135m (offline demo), tiny-llama (random, for tries), a folder or a hub id")
    p.add_argument("--method", default=_DEFAULT.method,
                   help="rtn | gptq | flexible | hiratio | adaptive (default: %(default)s)")
    p.add_argument("--bits", type=int, default=GridConfig.bits, choices=SUPPORTED_BITS)
    p.add_argument("--group-size", type=int, default=GridConfig.group_size,
                   help="input columns per scale/zero group; must divide every linear's input size")
    p.add_argument("--sym", action="store_true", help="symmetric grid (no stored zero points)")
    p.add_argument("--clip", default=GridConfig.clip, choices=CLIP_MODES,
                   help="per-group range: min-max, or shrunk to minimise the rounding error (default)")
    p.add_argument("--scale-bits", type=int, choices=(16, 8), default=None,
                   help="per-group scales: 16 = fp16, 8 = 8-bit log-coded with an fp16 row base "
                        "(default: the method's; fp16 for rtn/gptq)")
    p.add_argument("--zero-bits", type=int, choices=(8, 4), default=None,
                   help="asymmetric zero points: 8 = bytes, 4 = nibbles (bits <= 4) (default: the method's)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=GPTQConfig.act_order,
                   help="GPTQ: quantize columns by descending Hessian diagonal (permutation stored)")
    p.add_argument("--damp", type=float, default=GPTQConfig.damp, help="GPTQ Hessian damping, × mean diag")
    p.add_argument("--calib", default=_DEFAULT.calib, help="pydoc (embedded) | wikitext2 | c4 | a file or folder")
    p.add_argument("--nsamples", type=int, default=_DEFAULT.nsamples)
    p.add_argument("--seqlen", type=int, default=_DEFAULT.seqlen)
    p.add_argument("--seed", type=int, default=_DEFAULT.seed)
    p.add_argument("--batch-size", type=int, default=_DEFAULT.batch_size, help="calibration windows per forward")
    p.add_argument("--device", default=_DEFAULT.device, help="auto | cpu | cuda[:N]")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    f = p.add_argument_group("flexible (FlexibleLLM) options")
    f.add_argument("--bpw", type=float, help="honest bits-per-weight budget, metadata included (e.g. 2.5)")
    for flag, what in (("dosa", "Hadamard rotation (default: on for 3 <= bpw < 4)"),
                       ("sbgbs", "greedy fractional bit search"),
                       ("lfd", "feedback toward full-precision targets + denoising")):
        f.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=None, help=what)
    f.add_argument("--protect", choices=("columns", "groups", "none"),
                   help="attribute-outlier handling (default groups)")
    f.add_argument("--protect-groups", type=int, help="salient column groups kept per linear (--protect columns)")
    f.add_argument("--protect-bits", type=int, help="bits of the protected columns (2..8, or 16 = fp16)")
    f.add_argument("--candidates", type=int, nargs="+",
                   help="bit-widths SBGBS may choose (default: 2 3 4 below 4 bpw, else 2 3 4 5 6 8)")
    f.add_argument("--sensitivity", choices=("fisher", "none"),
                   help="weight the allocation's errors by the loss Fisher of each output (default fisher)")
    f.add_argument("--proxy", choices=("block", "gptq"),
                   help="SBGBS error proxy: the group's Hessian block, or GPTQ's compensated cost (default gptq)")
    f.add_argument("--alloc-nsamples", type=int,
                   help="calibration windows of the statistics pass (allocation, Fisher, LFD's FP stream)")
    f.add_argument("--fisher-nsamples", type=int,
                   help="windows of the Fisher backward pass, a prefix of --alloc-nsamples (default 16; 0 = all)")
    f.add_argument("--feedback-alpha", type=float, help="LFD feedback weight (default 0.25)")
    f.add_argument("--denoise", choices=("bias", "off"), help="LFD denoising after each block")
    f.add_argument("--denoise-threshold", type=float, help="LFD: relative block noise that triggers denoising")
    from .methods.hiratio import add_cli_arguments as add_hiratio_arguments

    add_hiratio_arguments(p)
    from .methods.adaptive import add_cli_arguments as add_adaptive_arguments

    add_adaptive_arguments(p)
    p.add_argument("--eval-windows", type=int, default=0,
                   help="after saving, evaluate perplexity/KL on this many held-out 2048-token windows")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity (and KL to a reference) on held-out windows")
    p.add_argument("model", help="a flexquant checkpoint folder, or a model name/folder/hub id")
    p.add_argument("--text", default="pydoc", help="pydoc (held-out split) | wikitext2 | c4 | a file or folder")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=None, help="at most this many windows (default: all)")
    p.add_argument("--reference", default=None, help="full-precision model for the KL divergence")
    p.add_argument("--device", default="cpu")
    p.add_argument("--kernel", default=None, help="force a kernel (reference, dense-cache, ...)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    from .eval.lmeval import add_arguments as add_lmeval_arguments

    add_lmeval_arguments(p)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="bpw, file size and per-layer settings of a checkpoint")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a checkpoint")
    p.add_argument("path")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="flexquant", description="Post-training quantization with honest bits.")
    parser.add_argument("--version", action="version", version=f"flexquant {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and results, no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    real_add = sub.add_parser
    sub.add_parser = lambda *a, **k: real_add(*a, parents=[common], **k)  # -q after any subcommand
    for add in (_add_quantize, _add_eval, _add_info, _add_generate):
        add(sub)
    from .vision.cli import register as register_vision

    register_vision(sub)
    from .interop.cli import register as register_interop

    register_interop(sub)
    return parser


FLEXIBLE_FLAGS = ("bpw", "dosa", "sbgbs", "lfd", "protect", "protect_groups", "protect_bits", "candidates",
                  "sensitivity", "proxy", "alloc_nsamples", "fisher_nsamples",
                  "feedback_alpha", "denoise", "denoise_threshold")


def cmd_quantize(a) -> int:
    from . import api

    options = {k: getattr(a, k) for k in FLEXIBLE_FLAGS if getattr(a, k) is not None}
    from .methods.hiratio import cli_options as hiratio_options

    options = hiratio_options(a, options)  # --method hiratio takes --bpw and its own flags
    if options and a.method not in ("flexible", "hiratio"):
        flag = next(iter(options))
        raise FlexQuantError(f"--{flag.replace('_', '-')} applies to --method flexible only"
                             + (" (or hiratio)" if flag == "bpw" else ""))
    if a.method == "flexible":
        from .methods.flexible import FlexibleConfig

        FlexibleConfig(**options)  # validate before the model is loaded
    from .methods.adaptive import cli_options as adaptive_options

    options = adaptive_options(a, options)
    config = QuantConfig().replace(options=options,
        model=a.model, method=a.method, bits=a.bits, group_size=a.group_size, sym=a.sym, clip=a.clip,
        scale_bits=a.scale_bits, zero_bits=a.zero_bits, act_order=a.act_order, damp=a.damp, calib=a.calib,
        nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed, batch_size=a.batch_size, device=a.device,
    )
    out = Path(a.out)
    if out.exists() and not a.overwrite:  # fail before the (long) run, not after it
        raise FlexQuantError(f"output folder {out} already exists; remove it or pass --overwrite")
    qm = api.quantize(config=config, progress=not a.quiet)
    if a.eval_windows:
        qm.report["eval"] = api.evaluate(qm, windows=a.eval_windows, reference=config.model, progress=not a.quiet)
    api.save(qm, out, overwrite=a.overwrite)
    s = qm.report["summary"]
    summary = {"out": str(out), "bpw": round(s["bpw"], 4), "quant_seconds": round(s["quant_seconds"], 1),
               "peak_rss_mb": round(s["peak_rss_mb"])}
    if a.eval_windows:
        summary["eval"] = qm.report["eval"]
    print(json.dumps(summary))
    return 0


def cmd_eval(a) -> int:
    from . import api

    if a.kernel:
        import os

        os.environ["FLEXQUANT_KERNEL"] = a.kernel
    if a.tasks:  # lm-evaluation-harness tasks instead of perplexity
        from .eval.lmeval import run_cli

        return run_cli(a)
    res = api.evaluate(a.model, text=a.text, seqlen=a.seqlen, windows=a.windows, reference=a.reference,
                       device=a.device, progress=not a.quiet)
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>14}: {v}")
    return 0


def cmd_info(a) -> int:
    from .format.checkpoint import TENSORS, read_quant_config

    path = Path(a.path)
    from .interop import foreign_format

    if not (path / "quant_config.json").is_file() and foreign_format(path):
        from .interop.cli import print_foreign_info

        return print_foreign_info(path, a.json)
    qc = read_quant_config(path)
    mods = qc["modules"]
    weights = {n: m["in_features"] * m["out_features"] for n, m in mods.items()}
    total_w = sum(weights.values())
    info = {
        "path": str(path),
        "format_version": qc["format_version"],
        "library_version": qc.get("library_version"),
        "method": (qc.get("quant_config") or {}).get("method"),
        "bpw": sum(m["bpw"] * weights[n] for n, m in mods.items()) / total_w if total_w else None,
        "quantized_weights": total_w,
        "file_bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        "tensor_file_bytes": (path / TENSORS).stat().st_size if (path / TENSORS).is_file() else None,
        "modules": mods,
    }
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{path}: {info['method']} · {info['bpw']:.4f} bpw over {total_w:,} weights · "
          f"{info['file_bytes'] / 2**20:.1f} MiB on disk (format v{info['format_version']})")
    print(f"{'module':<40} {'shape':>12} {'group':>6} {'bits':>10} {'bpw':>7}")
    for n, m in mods.items():
        print(f"{n:<40} {m['out_features']:>5}x{m['in_features']:<6} {m['group_size']:>6} "
              f"{','.join(map(str, m['bits'])):>10} {m['bpw']:>7.3f}")
    return 0


def cmd_generate(a) -> int:
    from . import api

    qm = api.load(a.path)
    print(api.generate(qm, a.prompt, a.max_new_tokens, do_sample=a.sample))
    return 0


def cmd_export(a) -> int:
    from .interop.cli import cmd_export as run

    return run(a)


def cmd_report(a) -> int:
    from .interop.cli import cmd_report as run

    return run(a)


def cmd_vision(a) -> int:
    from .vision.cli import run

    return run(a)


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "info": cmd_info, "generate": cmd_generate,
            "vision": cmd_vision, "export": cmd_export, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except FlexQuantError as e:
        print(f"flexquant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flexquant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
