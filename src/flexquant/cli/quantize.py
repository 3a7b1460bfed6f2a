"""`flexquant quantize`: run a method (flags generated from the configs, or a recipe file) and save."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from ..config import GPTQConfig, GridConfig, QuantConfig
from ..errors import FlexQuantError
from ..pipeline.distributed import close_process_group, env_rank
from .flags import add_field, add_method_flags, at_least, flag

RUN_FIELDS = ("method", "target", "calib", "nsamples", "seqlen", "seed", "batch_size", "device", "moe_calibration")
MEMORY_FIELDS = ("stream", "store_dtype", "max_memory", "offload_dir", "block_weights")
NOT_CONFIG = {"command", "quiet", "debug", "recipe", "out", "overwrite", "resume", "eval_windows", "func"}


def register(sub) -> None:
    p = sub.add_parser(
        "quantize", help="quantize a model and write a packed checkpoint",
        usage="flexquant quantize [MODEL] --out DIR [--recipe FILE] [--method NAME] [option flags]",
        description="Quantize MODEL (built-in name, local folder or hub id) and save a packed checkpoint into "
                    "--out with its recipe (recipe.yaml), a JSON run report (report.json) and plots. Settings "
                    "come from the flags, or from a recipe file (--recipe) that the flags then override. "
                    "`flexquant methods` lists every method's options.")
    fields = {f.name: f for f in dataclasses.fields(QuantConfig)}
    p.add_argument("model", nargs="?", default=argparse.SUPPRESS,
                   help=fields["model"].metadata["help"] + f" (default: {fields['model'].default}, or the recipe's)")
    p.add_argument("--recipe", help="a recipe file (YAML or JSON: every checkpoint folder has its recipe.yaml, "
                                    "and the folder itself works too) to run again")
    p.add_argument("--out", required=True, help="output folder (written block by block into a temporary folder "
                                                "that is renamed into place at the end)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    p.add_argument("--resume", action="store_true",
                   help="continue a run that stopped part-way from its finished blocks (kept beside --out in "
                        ".<out>.partial); the same command and config")
    p.add_argument("--eval-windows", type=at_least(0), default=0,
                   help="after saving, evaluate perplexity/KL on this many held-out 2048-token windows")
    run = p.add_argument_group("run settings")
    for name in RUN_FIELDS:
        add_field(run, fields[name])
    memory = p.add_argument_group("memory (models bigger than memory: docs/scale.md)")
    for name in MEMORY_FIELDS:
        add_field(memory, fields[name])
    grid = p.add_argument_group("grid")
    for f in dataclasses.fields(GridConfig):
        add_field(grid, f)
    gptq = p.add_argument_group("GPTQ solver")
    for f in dataclasses.fields(GPTQConfig):
        add_field(gptq, f)
    p.set_defaults(owners=add_method_flags(p), func=run_quantize)


def config_from_args(a: argparse.Namespace) -> QuantConfig:
    """The run's config: the recipe (or the defaults), then every given flag; method flags are checked
    against the method they belong to."""
    from ..recipe import read_recipe

    given = {k: v for k, v in vars(a).items() if k not in NOT_CONFIG and k != "owners"}
    base = read_recipe(a.recipe) if a.recipe else QuantConfig()
    method = given.pop("method", base.method)
    options = dataclasses.asdict(base.options) if method == base.method else {}
    for name in [k for k in given if k in a.owners]:
        if method not in a.owners[name]:
            raise FlexQuantError(f"{flag(name)} applies to --method {' or '.join(a.owners[name])} only "
                                 f"(this run is --method {method}); `flexquant methods` lists each method's options")
        options[name] = given.pop(name)
    return base.replace(method=method, options=options, **given)


def run_quantize(a: argparse.Namespace) -> int:
    from .. import api

    config = config_from_args(a)  # validated before the (long) run
    out = Path(a.out)
    main_rank = env_rank() == 0  # under torchrun only rank 0 logs, shows progress and writes (docs/scale.md)
    if not main_rank:
        logging.getLogger().setLevel(logging.WARNING)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the model loader's bars
    # the checkpoint is written as the blocks finish (a streamed model is never held whole)
    qm = api.quantize(config=config, progress=not a.quiet and main_rank, out=out, overwrite=a.overwrite,
                      resume=a.resume)
    close_process_group()
    if not main_rank:
        return 0
    if a.eval_windows:
        qm.report["eval"] = api.evaluate(out, windows=a.eval_windows, reference=config.model, progress=not a.quiet)
        api.update_report(out, qm.report)
    s = qm.report["summary"]
    summary = {"out": str(out), "bpw": round(s["bpw"], 4), "quant_seconds": round(s["quant_seconds"], 1),
               "peak_rss_mb": round(s["peak_rss_mb"])}
    if a.eval_windows:
        summary["eval"] = qm.report["eval"]
    print(json.dumps(summary))
    return 0
