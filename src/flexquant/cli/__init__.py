"""The command line: one module per command, each a thin wrapper over `flexquant.api`.

`flexquant quantize` flags are generated from the config dataclasses (`cli.flags`). User errors
(`FlexQuantError`) print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .._version import __version__
from ..errors import FlexQuantError
from . import eval as eval_cmd
from . import export, generate, info, methods, quantize, report, vision

COMMANDS = (quantize, methods, eval_cmd, info, generate, export, report, vision)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexquant", description="Post-training quantization with honest bits.")
    parser.add_argument("--version", action="version", version=f"flexquant {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and results, no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    real_add = sub.add_parser
    sub.add_parser = lambda *a, **k: real_add(*a, parents=[common], **k)  # -q after any subcommand
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except FlexQuantError as e:
        print(f"flexquant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flexquant: interrupted", file=sys.stderr)
        return 130
