"""`flexquant generate`: greedy (or sampled) text from a checkpoint."""

from __future__ import annotations

from .flags import at_least, text


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a checkpoint")
    p.add_argument("path", help="a checkpoint folder (flexquant, GPTQ or compressed-tensors)")
    p.add_argument("--prompt", required=True, type=text, help="the text to continue (not empty)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--lean", action="store_true", help="hold the model in about its packed size (packed-cpu kernel, "
                                                       "float16 embedding/head; flexquant checkpoints, CPU)")
    p.set_defaults(func=run_generate)


def run_generate(a) -> int:
    from .. import api

    qm = api.load(a.path, lean=a.lean)
    print(api.generate(qm, a.prompt, a.max_new_tokens, do_sample=a.sample))
    return 0
