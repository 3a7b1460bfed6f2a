"""The command line: one module per command, each a thin wrapper over `flexquant.api`.

`flexquant quantize` flags are generated from the config dataclasses (`cli.flags`). User errors
(`FlexQuantError`) print one line on stderr and exit 2; anything unexpected prints one line and exits 1 (the
traceback with ``--debug``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import traceback

from .._version import __version__
from ..errors import FlexQuantError
from . import eval as eval_cmd
from . import export, generate, info, methods, quantize, report, vision
from .flags import Parser

COMMANDS = (quantize, methods, eval_cmd, info, generate, export, report, vision)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="flexquant", description="Post-training quantization with honest bits.")
    parser.add_argument("--version", action="version", version=f"flexquant {__version__}")
    common = Parser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and results, no progress bars")
    common.add_argument("--debug", action="store_true", help="show the Python traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True)
    real_add = sub.add_parser
    sub.add_parser = lambda *a, **k: real_add(*a, parents=[common], **k)  # -q after any subcommand
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    with contextlib.suppress(ValueError):  # (only the main thread may set it)
        signal.signal(signal.SIGTERM, _terminate)  # a polite kill cleans up like Ctrl-C (finished work kept)
    try:
        rc = args.func(args)
        sys.stdout.flush()  # (a reader that left shows here, not in the interpreter's exit)
        return rc
    except FlexQuantError as e:
        print(f"flexquant: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flexquant: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout left (`| head -1`): nothing more to say, like other tools
        with contextlib.suppress(OSError, ValueError, AttributeError):  # (a stand-in stdout has no descriptor)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no second error at exit's flush)
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by the broken pipe
    except Exception as e:  # a bug or an environment problem: one line, the traceback only when asked for
        if args.debug:
            traceback.print_exc()
        print(f"flexquant: unexpected error: {type(e).__name__}: {one_line(e)} (this is a flexquant bug or an "
              "environment problem; rerun with --debug for the traceback and report it)", file=sys.stderr)
        return 1


def _terminate(signum, frame):
    raise KeyboardInterrupt


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (the first non-empty line, at most 500 characters)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 500 else text[:497] + "..."
