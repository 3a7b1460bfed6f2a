"""Norms folded or not under `--method adaptive` (the ``fold_norms`` option): one quick quantization per model and
setting, perplexity on the first held-out window's first 1024 tokens, with the float model on the same tokens.

    python -m bench.adaptive_fold --models gemma3-270m,smollm2-135m --out bench/results/adaptive_fold.json

Each row: W16A4KV16 (float16 weights, so only the activation transforms and quantizers differ), all-rotation,
16 × 512 calibration tokens, the method's other defaults, with ``fold_norms`` on and off.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="gemma3-270m,smollm2-135m")
    p.add_argument("--options", default='{"w_bits": 16, "a_bits": 4, "k_bits": 16, "v_bits": 16, '
                                        '"transform": "rotation"}', help="adaptive options (JSON) besides fold_norms")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--tokens", type=int, default=1024, help="evaluated tokens of the first held-out window")
    p.add_argument("--out", default="bench/results/adaptive_fold.json")
    args = p.parse_args()

    import flexquant as fq
    from flexquant.data import eval_windows
    from flexquant.eval import evaluate_windows
    from flexquant.models.loader import load_model

    rows = []
    for name in filter(None, args.models.split(",")):
        model, tok = load_model(name)
        window = eval_windows(tok, "pydoc", 2048, 1)[:, : args.tokens]
        fp_ppl = evaluate_windows(model, window, None, progress=False)["perplexity"]
        del model
        for fold in ("off", "on"):
            opts = {**json.loads(args.options), "fold_norms": fold}
            t0 = time.perf_counter()
            qm = fq.quantize(name, method="adaptive", bits=4, group_size=64, nsamples=args.nsamples, seqlen=512,
                             progress=False, options=opts)
            seconds = time.perf_counter() - t0
            ppl = evaluate_windows(qm.model, window, None, progress=False)["perplexity"]
            rows.append({"model": name, "options": opts, "fp_perplexity": fp_ppl, "perplexity": ppl,
                         "quant_seconds": seconds, "nsamples": args.nsamples, "tokens": args.tokens})
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.with_suffix(".tmp").write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    out.with_suffix(".tmp").replace(out)


if __name__ == "__main__":
    main()
