#!/usr/bin/env python
"""Serving targets (issue 25) on smollm2-135m: what `--target vllm|gptqmodel` costs, and whether the real loaders
read the exports. Two steps, both on the windows of bench/foundation.py:

1. the quantizations, by bench/foundation.py (its rows are cached and resumable); a ``target=`` row is exported
   to its format in float16 and reloaded by flexquant's importer inside its job (``-export.json``):

       python -m bench.foundation --bits 4 --methods "" --peers llmc-gptq --name serve \\
           --flexible 2.5 3.5 4.25 4.5 2.5:target=gptqmodel 3.5:target=gptqmodel 4.25:target=gptqmodel \\
                      4.5:target=vllm 4.5:target=vllm,act_order=0

2. this script: every export loaded by the clients that serve its format — GPTQ through ``GPTQModel.load``
   (.venv-gptq, ``bash bench/gptq_env.sh``), which reads the per-module ``dynamic`` widths, compressed-tensors
   through llm-compressor's transformers 5.17 + compressed-tensors 0.19 (.venv-peers, ``bash bench/peers_env.sh``)
   and the current transformers — with logits compared on every window; then bench/results/serve.md:

       python -m bench.serve
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from bench import export_bench, foundation

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("serve")
CLIENTS = {  # format -> [(label, python, environment)]
    # transformers' GPTQ integration (optimum) reads one model-wide width and ignores `dynamic`: GPTQModel.load
    "gptq": [("GPTQModel 7.7 `GPTQModel.load` (float16, torch kernel)", ROOT / ".venv-gptq/bin/python",
              {"FQ_LOADER": "gptqmodel"})],
    "compressed-tensors": [
        ("transformers 5.17 + compressed-tensors 0.19 (llm-compressor's)", ROOT / ".venv-peers/bin/python",
         {"PYTHONPATH": str(ROOT / "src"), "FQ_CT_COMPRESSED_PATH": "1"}),
        ("transformers 5.25 + compressed-tensors 0.20 (dequantize=True where asymmetric)", Path(sys.executable), {}),
    ],
}


def label(row: dict) -> str:
    o = dict(row.get("options") or {})
    bpw, target = o.pop("bpw", None), o.pop("target", "flexquant")
    rest = " ".join(f"{k}={v}" for k, v in o.items())
    return f"{bpw:g} | {target}{' ' + rest if rest else ''}"


def markdown(header: str, rows: list[dict], checks: dict, windows: int) -> str:
    lines = [header, "", "### Quality inside each target (flexquant's packed model, the same windows)", "",
             "| budget | target | bpw as exported | bpw (flexquant file) | perplexity | KL to FP | quant time (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "reference":
            lines.append(f"| — | full precision | — | 32 | {r['perplexity']:.3f} | 0 | — |")
        elif r["kind"] == "peer":
            lines.append(f"| — | llm-compressor GPTQ w{r['bits']}g64 | {r['bpw']:.3f} (nominal) | — | "
                         f"{r['perplexity']:.3f} | {r['kl_divergence']:.4f} | {r['quant_seconds']:.0f} |")
        elif "error" in r:
            lines.append(f"| {label(r)} | failed: {r['error']} | | | | |")
        else:
            e = r.get("export")
            lines.append(f"| {label(r)} | {e['bpw']:.3f} ({e['format']} {e.get('checkpoint_format', '')}) | "
                         f"{r['bpw']:.3f} | {r['perplexity']:.3f} | {r['kl_divergence']:.4f} | "
                         f"{r['quant_seconds']:.0f} |" if e else
                         f"| {label(r)} | — | {r['bpw']:.3f} | {r['perplexity']:.3f} | {r['kl_divergence']:.4f} | "
                         f"{r['quant_seconds']:.0f} |")
    lines += ["", f"### The exports loaded by the real clients ({windows} held-out windows)", "",
              "Δ: max |logit difference| over every position of every window, against flexquant's packed model "
              "(fp32) and against it with each dequantized weight rounded to float16 (what a float16 client computes).",
              "", "| budget | target | client | Δ vs fp32 | Δ vs fp16 weights | max abs logit | ppl flexquant | "
              "ppl client |", "|---|---|---|---|---|---|---|---|"]
    for key, results in checks.items():
        for client, c in results:
            if "error" in c:
                lines.append(f"| {key} | {client} | failed: {c['error']} | | | | |")
                continue
            lines.append(f"| {key} | {client} | {c['max_abs_diff']:.2e} | {c['max_abs_diff_fp16_weights']:.2e} | "
                         f"{c['max_abs_logit']:.1f} | {c['ppl_flexquant']:.4f} | {c['ppl_transformers']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(ROOT / "bench/results"), help="folder of serve.json (step 1)")
    p.add_argument("--name", default="serve")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--check-windows", type=int, default=8, help="windows each client check runs (the first N)")
    p.add_argument("--only", default=None, choices=tuple(CLIENTS),
                   help="check the exports of this format only; the others keep their checks from the last run")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    res = json.loads(Path(args.results, args.name + ".json").read_text())
    work = Path(args.results) / "work"
    _, windows = foundation.setup(args, work, args.windows)  # the same held-out windows as step 1
    save_file({"input_ids": windows[: args.check_windows].contiguous()}, work / "serve-eval.safetensors")
    last = Path(args.results, args.name + "_clients.json")
    checks = json.loads(last.read_text()) if args.only and last.is_file() else {}
    for r in res["rows"]:
        e = r.get("export")
        if not e or (args.only and e["format"] != args.only):
            continue
        results = []
        for client, python, env in CLIENTS[e["format"]]:
            if not python.exists():
                results.append((client, {"error": [f"{python} is missing (see this script's docstring)"]}))
                continue
            log.info("%s: %s", label(r), client)
            # a fresh inductor cache per check: GPTQModel's compiled CPU kernels, reused from a model of other
            # shapes, failed an index check (seen with GPTQModel 7.7, torch 2.13)
            env = {**env, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="serve-inductor-")}
            results.append((client, export_bench.run_check(python, Path(r["path"]), Path(e["out"]),
                                                           work / "serve-eval.safetensors", env)))
        checks[label(r)] = results
    md = markdown(res["header"], res["rows"], checks, args.check_windows)
    last.write_text(json.dumps(checks, indent=2) + "\n")
    Path(args.results, args.name + ".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
