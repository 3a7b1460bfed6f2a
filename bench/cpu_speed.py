#!/usr/bin/env python
"""CPU memory and speed (issues 4 and 24): what a loaded model adds to its process, a 512-token prefill and batch-1
decode tokens/s, for the float32 model, a ~3.4-bpw flexquant checkpoint under each CPU kernel (and the packed one
loaded with ``lean=True``: one layout per linear, float16 ends), and llama.cpp on GGUF files.

    python -m bench.cpu_speed                      # -> bench/results/cpu_speed.{md,json}
    (llama.cpp rows need bash bench/llama_env.sh; GGUF files from python -m bench.gguf)

Each measurement runs in a fresh process: VmHWM after the imports (transformers' llama modelling code included: about
220 MB of modules, the same for every row and not part of any model), then after loading and one 512-token forward
(the memory the model adds = the difference), the time of a second 512-token forward, then greedy decoding of
--new tokens after a 16-token prompt with the KV cache, timed per token (median). llama.cpp's decode speed is
llama-bench's ``tg`` figure at the same thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench/results/work-cpu"


def vmhwm_mb() -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) / 1024


def measure(args) -> None:
    """Subprocess entry: one model, one kernel; prints a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    import transformers.models.llama.modeling_llama  # noqa: F401  (the code, ~220 MB of modules: not the model)

    import flexquant as fq  # noqa: F401  (imports counted before the baseline)
    from flexquant.models.loader import load_model

    base = vmhwm_mb()
    if args.kernel == "float32":
        model, _ = load_model(args.path)
    elif args.kernel == "packed-cpu-lean":
        model = fq.load(args.path, lean=True).model
    else:
        model = fq.load(args.path, kernel=args.kernel).model
    model.eval()
    ids = torch.randint(0, 1000, (1, 512), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
        added = vmhwm_mb() - base
        t0 = time.perf_counter()
        model(ids)
        prefill = time.perf_counter() - t0
    times = []
    with torch.no_grad():
        out = model(ids[:, :16], use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(args.new):
            t0 = time.perf_counter()
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t0)
    print(json.dumps({"added_mb": added, "baseline_mb": base, "prefill_s": prefill,
                      "decode_tok_s": 1 / statistics.median(times)}))


def run_one(path: str, kernel: str, args) -> dict:
    cmd = [sys.executable, "-m", "bench.cpu_speed", "_measure", path, kernel, "--threads", str(args.threads),
           "--new", str(args.new)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if res.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def llama_bench(gguf: Path, threads: int, new: int) -> float | None:
    exe = ROOT / ".llama/bin/llama-bench"
    if not exe.is_file() or not gguf.is_file():
        return None
    res = subprocess.run([str(exe), "-m", str(gguf), "-p", "0", "-n", str(new), "-t", str(threads), "-o", "json"],
                         capture_output=True, text=True,
                         env={**os.environ, "LD_LIBRARY_PATH": str(ROOT / ".llama/lib")})
    if res.returncode:
        print(res.stderr[-2000:], file=sys.stderr)
        return None
    return float(json.loads(res.stdout)[0]["avg_ts"])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_measure":
        p = argparse.ArgumentParser()
        p.add_argument("path")
        p.add_argument("kernel")
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--new", type=int, default=64)
        measure(p.parse_args(sys.argv[2:]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--checkpoint", default=None,
                   help="a flexquant checkpoint (default: GPTQ w3 g64 of --model, quantized once into work-cpu/)")
    p.add_argument("--gguf", nargs="*", default=[str(ROOT / "bench/results/work-gguf/gptq-q4_0.gguf"),
                                                 str(ROOT / "bench/results/work-gguf/llama-Q4_0.gguf")])
    args = p.parse_args()
    import flexquant as fq
    from flexquant.models.builtin import builtin_path

    model_dir = str(builtin_path(args.model) or args.model)
    ckpt = Path(args.checkpoint) if args.checkpoint else WORK / "gptq-w3g64"
    if not (ckpt / "quant_config.json").is_file():
        qm = fq.quantize(model_dir, method="gptq", bits=3, group_size=64, progress=False)
        fq.save(qm, ckpt, overwrite=True, plot=False)
    loaded = fq.load(ckpt)
    bpw, method = loaded.bpw, (loaded.report.get("config") or {}).get("method", "checkpoint")
    del loaded
    rows = [{"model": "float32", "kernel": "—", "bpw": 32.0, **run_one(model_dir, "float32", args)}]
    for kernel in ("dense-cache", "packed-cpu", "packed-cpu-lean"):
        rows.append({"model": f"flexquant {method} ({ckpt.name})", "kernel": kernel, "bpw": bpw,
                     **run_one(str(ckpt), kernel, args)})
    for g in args.gguf:
        ts = llama_bench(Path(g), args.threads, args.new)
        if ts is not None:
            rows.append({"model": f"llama.cpp {Path(g).name}", "kernel": "llama.cpp CPU", "bpw": None,
                         "decode_tok_s": ts, "added_mb": None})
    fp = rows[0]
    lines = [f"{args.model}, batch-1 greedy decode of {args.new} tokens after a 16-token prompt, {args.threads} "
             f"threads; memory = VmHWM after load + one 512-token forward minus VmHWM before loading; "
             f"{time.strftime('%Y-%m-%d')}", "",
             "| model | kernel | bpw | memory added (MiB) | × float32 | prefill 512 (s) | decode tok/s | × float32 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = f"{r['added_mb']:.0f} | {r['added_mb'] / fp['added_mb']:.2f}" if r.get("added_mb") else "— | —"
        bpw = f"{r['bpw']:.3f}" if r.get("bpw") else "—"
        pre = f"{r['prefill_s']:.3f}" if r.get("prefill_s") else "—"
        lines.append(f"| {r['model']} | {r['kernel']} | {bpw} | {mem} | {pre} | {r['decode_tok_s']:.1f} | "
                     f"{r['decode_tok_s'] / fp['decode_tok_s']:.2f} |")
    out = ROOT / "bench/results"
    (out / "cpu_speed.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "cpu_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
