"""CPU speed of packed checkpoints against the unquantized model (issue 4, CPU path).

For each checkpoint and each CPU kernel, in one process and on the same inputs as the float32
original: prefill of one 2048-token window (the `flexquant eval` workload) and greedy decode of
64 new tokens after a 32-token prompt (the `flexquant generate` workload). Medians of --repeats
runs after one warm-up; ratios are quantized time / original time.

    python -m bench.cpu_speed bench/results/work/flexquant-gptq-w3g64 [more checkpoints]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (also fills the dense cache)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def measure(model, window: torch.Tensor, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    prefill = median_time(lambda: model(window), repeats)
    decode = median_time(lambda: model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                do_sample=False, pad_token_id=0), repeats)
    return {"prefill_s": prefill, "decode_tokens_per_s": new_tokens / decode}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--kernels", default="dense-cache,reference")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", default=str(ROOT / "bench/results/cpu_speed"))
    args = p.parse_args()

    import flexquant as fq
    from flexquant.data import eval_windows
    from flexquant.models import load_model, load_tokenizer
    from flexquant.models.builtin import smollm2_path

    base = str(smollm2_path())
    tok = load_tokenizer(base)
    window = eval_windows(tok, "pydoc", 2048, 1)[:1]
    prompt = window[:, :32]
    ref_model, _ = load_model(base)
    ref = measure(ref_model, window, prompt, args.new_tokens, args.repeats)
    del ref_model
    rows = [{"model": "float32 original", "kernel": "torch", **ref, "prefill_ratio": 1.0, "decode_ratio": 1.0}]
    for ck in args.checkpoints:
        for kernel in args.kernels.split(","):
            qm = fq.load(ck, kernel=kernel)
            r = measure(qm.model, window, prompt, args.new_tokens, args.repeats)
            rows.append({"model": f"{Path(ck).name} ({qm.bpw:.3f} bpw)", "kernel": kernel, **r,
                         "prefill_ratio": r["prefill_s"] / ref["prefill_s"],
                         "decode_ratio": ref["decode_tokens_per_s"] / r["decode_tokens_per_s"]})
            del qm
    header = (f"smollm2-135m on CPU ({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads): prefill of 1×2048 tokens, greedy decode of {args.new_tokens} "
              f"tokens after 32; medians of {args.repeats}; ratio = slowdown against the original")
    lines = [header, "", "| model | kernel | prefill (s) | × original | decode tok/s | × original (time) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['kernel']} | {r['prefill_s']:.2f} | {r['prefill_ratio']:.2f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['decode_ratio']:.2f} |")
    md = "\n".join(lines) + "\n"
    Path(args.out + ".md").write_text(md)
    Path(args.out + ".json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    print(md)


if __name__ == "__main__":
    main()
