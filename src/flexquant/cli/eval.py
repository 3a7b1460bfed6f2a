"""`flexquant eval`: perplexity (and KL to a reference) on held-out windows, or lm-evaluation-harness tasks."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import FlexQuantError
from .flags import at_least, positive_float


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity (and KL to a reference) on held-out windows, or lm-eval tasks")
    p.add_argument("model", help="a flexquant checkpoint folder, a GPTQ / compressed-tensors folder, or a model "
                                 "name/folder/hub id")
    p.add_argument("--text", default="pydoc", help="pydoc (held-out split) | wikitext2 | c4 | a file or folder")
    p.add_argument("--seqlen", type=at_least(2), default=2048, help="tokens per window (at most the model's context)")
    p.add_argument("--windows", type=at_least(1), default=None, help="at most this many windows (default: all)")
    p.add_argument("--reference", default=None, help="full-precision model for the KL divergence")
    p.add_argument("--device", default="cpu")
    p.add_argument("--kernel", default=None, help="force a kernel (reference, dense-cache, ...)")
    p.add_argument("--lean", action="store_true", help="load a flexquant checkpoint in about its packed size "
                                                       "(packed-cpu kernel, float16 embedding/head)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    g = p.add_argument_group("lm-evaluation-harness (instead of perplexity)")
    g.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks, e.g. hellaswag,arc_easy")
    g.add_argument("--include-path", default=None, help="folder of extra lm-eval task YAML files (local tasks)")
    g.add_argument("--num-fewshot", type=at_least(0), default=None)
    g.add_argument("--limit", type=positive_float, default=None, help="examples per task (a fraction if < 1)")
    g.add_argument("--lm-batch-size", type=at_least(1), default=1, help="lm-eval batch size")
    g.add_argument("--output", default=None, help="also write the results as JSON to this file")
    p.set_defaults(func=run_eval)


def run_eval(a) -> int:
    from .. import api

    if a.kernel:
        os.environ["FLEXQUANT_KERNEL"] = a.kernel
    if a.tasks is not None and a.lean:
        raise FlexQuantError("--lean applies to perplexity, not to lm-eval tasks: drop it")
    if a.tasks is not None:  # lm-evaluation-harness tasks instead of perplexity
        return run_tasks(a)
    given = [f for f, v in (("--include-path", a.include_path), ("--num-fewshot", a.num_fewshot),
                            ("--limit", a.limit), ("--output", a.output)) if v is not None]
    if given:
        raise FlexQuantError(f"{', '.join(given)} apply to lm-eval tasks only; add --tasks (or drop them)")
    model = api.load(a.model, kernel=a.kernel, device=a.device, lean=True) if a.lean else a.model
    res = api.evaluate(model, text=a.text, seqlen=a.seqlen, windows=a.windows, reference=a.reference,
                       device=a.device, progress=not a.quiet)
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>14}: {v}")
    return 0


def run_tasks(a) -> int:
    """`flexquant eval MODEL --tasks ...`."""
    from .. import api
    from ..eval.lmeval import import_lm_eval, run_tasks

    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    if not tasks:
        raise FlexQuantError("--tasks is empty; name at least one lm-eval task")
    if a.include_path is not None and not Path(a.include_path).is_dir():
        raise FlexQuantError(f"--include-path {a.include_path} is not a folder of task YAML files")
    import_lm_eval()  # fail before the model is loaded
    model, tok, bpw = api.as_model(a.model, api.resolve_device(a.device))
    res = run_tasks(model, tok, tasks, a.include_path, a.num_fewshot, a.limit, a.lm_batch_size, a.device)
    res.update({"model": str(a.model), "bpw": bpw})
    if a.output:
        Path(a.output).write_text(json.dumps(res, indent=2))
    if a.json:
        print(json.dumps(res))
    else:
        for task, metrics in res["results"].items():
            shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
            print(f"{task:>20}: {shown}")
    return 0
