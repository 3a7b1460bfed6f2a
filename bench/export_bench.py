#!/usr/bin/env python
"""Interoperability benchmark (issue 5) on smollm2-135m: exports checked by transformers, imports checked
against llm-compressor, on the windows of bench/foundation.py (pydoc held-out split, 8 × 2048 tokens;
calibration 128 × 512 tokens of the pydoc calibration split, seed 0).

1. flexquant RTN, GPTQ and a rotated FlexibleLLM model at uniform 4 bits (group 64) are exported to
   compressed-tensors and GPTQ, each export is loaded by transformers (through the compressed-tensors
   package; through optimum + GPTQModel from .venv-gptq, made by ``bash bench/gptq_env.sh``), and its
   logits are compared with flexquant's packed model on every evaluation window.
2. llm-compressor GPTQ w4g64 (.venv-peers, ``bash bench/peers_env.sh``) is saved as its own compressed-tensors
   checkpoint; flexquant evaluates that folder and must give llm-compressor's perplexity within 0.5%.

    python -m bench.export_bench            # everything; quantized models are reused from OUT/work/export
    python -m bench.export_bench --skip-llmc

Results: bench/results/export.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("export_bench")
# name -> quantize() settings; every model here is one uniform integer grid per layer with fp16 scales.
MODELS = {
    "rtn-w4g64": dict(method="rtn", bits=4),
    "gptq-w4g64-actorder": dict(method="gptq", bits=4, act_order=True),
    "gptq-w4g64": dict(method="gptq", bits=4, act_order=False),
    # DOSA rotation on; one candidate bit-width (uniform 4 bits); natural column order; fp16 scales, byte zeros.
    "flexible-rotated-w4g64": dict(method="flexible", bits=4, act_order=False, scale_bits=16, zero_bits=8,
                                   options={"bpw": 5.0, "dosa": True, "sbgbs": False, "candidates": [4],
                                            "protect": "none"}),
}
CLIENTS = {  # who loads the export in each check
    "compressed-tensors": "transformers 5.24 + compressed-tensors 0.20.1 (.venv; asymmetric: dequantize=True)",
    "gptq": "transformers 5.24 + optimum 2.3 + GPTQModel 7.7 (.venv-gptq)",
    "peers": "transformers 5.17 + compressed-tensors 0.19 (.venv-peers, llm-compressor's; compressed path)",
}
EXPORTS = [  # (model, format): act-order needs g_idx, which only GPTQ has
    ("rtn-w4g64", "compressed-tensors"), ("rtn-w4g64", "gptq"),
    ("gptq-w4g64", "compressed-tensors"), ("gptq-w4g64-actorder", "gptq"),
    ("flexible-rotated-w4g64", "compressed-tensors"), ("flexible-rotated-w4g64", "gptq"),
]


def quantize(name: str, args, work: Path, calib: torch.Tensor) -> Path:
    import flexquant as fq

    out = work / name
    if (out / "report.json").is_file():
        log.info("reusing %s", out)
        return out
    s = dict(MODELS[name])
    log.info("quantizing %s", name)
    qm = fq.quantize(args.model_dir, calib_ids=calib, nsamples=calib.shape[0], seqlen=calib.shape[1],
                     group_size=64, progress=False, **s)
    fq.save(qm, out, overwrite=True)
    return out


def fp16_weights(model):
    """The packed model with each quantized linear as a dense layer holding its weight rounded to float16: what
    a client that dequantizes into float16 (GPTQModel's CPU kernels) computes with. Layers with an online
    rotation stay as they are (the export writes them dense, in float32)."""
    from flexquant.nn.quant_linear import QuantLinear

    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear) and mod.rotation_order == 0:
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.weight.data = mod.dequantized_weight().half().float()
            if mod.bias is not None:
                lin.bias.data = mod.bias.data.float()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
    return model


def hf_check(source: str, export: str, windows_file: str) -> dict:
    """(Run by the python that has the client) flexquant's packed model vs transformers on the export."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    import flexquant as fq

    windows = load_file(windows_file)["input_ids"]
    qcfg = json.loads(Path(export, "config.json").read_text())["quantization_config"]
    extra = {}
    if qcfg["quant_method"] == "compressed-tensors" and not os.environ.get("FQ_CT_COMPRESSED_PATH") and not all(
            g["weights"]["symmetric"] for g in qcfg["config_groups"].values()):
        # transformers' compressed path cannot take asymmetric packed zero points (llm-compressor issue 1618)
        extra["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    t0 = time.perf_counter()
    if os.environ.get("FQ_LOADER") == "gptqmodel":  # GPTQModel's own loader: it reads `dynamic` per-module widths
        from gptqmodel import BACKEND, GPTQModel

        hf = GPTQModel.load(export, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model.eval()
    else:
        hf = AutoModelForCausalLM.from_pretrained(export, **extra).eval()
    load_s = time.perf_counter() - t0
    packed = fq.load(source).model
    half = fp16_weights(fq.load(source).model)
    d32 = d16 = r16 = top = nll_fq = nll_hf = 0.0
    tokens = 0
    for w in windows:
        with torch.no_grad():
            a = packed(w[None]).logits[0].float()
            b = hf(w[None]).logits[0].float()
            c = half(w[None]).logits[0].float()
        d32, d16 = max(d32, float((a - b).abs().max())), max(d16, float((c - b).abs().max()))
        r16, top = max(r16, float((a - c).abs().max())), max(top, float(a.abs().max()))
        nll_fq += float(torch.nn.functional.cross_entropy(a[:-1], w[1:], reduction="sum"))
        nll_hf += float(torch.nn.functional.cross_entropy(b[:-1], w[1:], reduction="sum"))
        tokens += w.numel() - 1
    layer = hf.model.layers[0]
    return {"max_abs_diff": d32, "max_abs_diff_fp16_weights": d16, "fp16_weight_rounding": r16,
            "max_abs_logit": top, "rel_diff": min(d32, d16) / top,
            "ppl_flexquant": math.exp(nll_fq / tokens), "ppl_transformers": math.exp(nll_hf / tokens),
            "client_layers": {"q_proj": type(layer.self_attn.q_proj).__name__,
                              "down_proj": type(layer.mlp.down_proj).__name__},
            "load_seconds": load_s, "windows": int(windows.shape[0])}


def run_check(python: Path, source: Path, export: Path, windows_file: Path, env: dict | None = None) -> dict:
    cmd = [str(python), "-m", "bench.export_bench", "_check", str(source), str(export), str(windows_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else ["failed"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def llmc_import(args, work: Path, calib_file: Path, windows_file: Path) -> dict:
    import flexquant as fq

    out = work / "llmc-gptq-w4g64"
    if not (out / "llmc_report.json").is_file():
        peers = ROOT / ".venv-peers/bin/python"
        if not peers.exists():
            return {"error": "the peers' environment is missing: run `bash bench/peers_env.sh`"}
        cmd = [str(peers), "-m", "bench.llmc_export", "--model", args.model_dir, "--calib", str(calib_file),
               "--eval", str(windows_file), "--bits", "4", "--group-size", "64", "--out", str(out)]
        log.info("running llm-compressor GPTQ w4g64 (.venv-peers)")
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-3:]}
    peer = json.loads((out / "llmc_report.json").read_text())
    t0 = time.perf_counter()
    res = fq.evaluate(out, text="pydoc", seqlen=2048, windows=args.windows, progress=False)
    rel = abs(res["perplexity"] - peer["ppl_own_model"]) / peer["ppl_own_model"]
    return {"ppl_llmc_own_model": peer["ppl_own_model"], "ppl_llmc_saved_reloaded": peer["ppl_saved_reloaded"],
            "ppl_flexquant_import": res["perplexity"], "rel_diff": rel, "pass": rel <= 0.005,
            "bpw_in_file": res["bpw"], "flexquant_eval_seconds": time.perf_counter() - t0,
            "transformers_compressed_path": peer["transformers_compressed_path"], "versions": peer["versions"],
            "llmc_quant_seconds": peer["quant_seconds"]}


def markdown(header: str, rows: list[dict], llmc: dict | None) -> str:
    lines = [header, "", "### Exports loaded by transformers vs flexquant's packed model (all windows)", "",
             "Δ: max |logit difference| over every position of every window. GPTQModel dequantizes into float16, so "
             "its reference is flexquant's model with each dequantized weight rounded to float16 (the last column "
             "shows what that rounding alone changes).", "",
             "| model | format | client | client layers (q / down) | Δ vs flexquant fp32 | Δ vs flexquant fp16 "
             "weights | max abs logit | ppl flexquant | ppl client | fp16 weight rounding alone |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["check"]
        if "error" in c:
            lines.append(f"| {r['model']} | {r['format']} | {r['client']} | failed: {c['error']} | | | | | | |")
            continue
        cl = c["client_layers"]
        lines.append(f"| {r['model']} | {r['format']} | {r['client']} | {cl['q_proj']} / {cl['down_proj']} | "
                     f"{c['max_abs_diff']:.2e} | "
                     f"{c['max_abs_diff_fp16_weights']:.2e} | {c['max_abs_logit']:.1f} | {c['ppl_flexquant']:.4f} | "
                     f"{c['ppl_transformers']:.4f} | {c['fp16_weight_rounding']:.2e} |")
    if llmc:
        lines += ["", "### llm-compressor GPTQ w4g64 checkpoint evaluated by flexquant", ""]
        if "error" in llmc:
            lines.append(f"failed: {llmc['error']}")
        else:
            lines += ["| perplexity | value |", "|---|---|",
                      f"| llm-compressor's own model (in memory, after oneshot) | {llmc['ppl_llmc_own_model']:.4f} |",
                      f"| its saved folder reloaded by transformers | {llmc['ppl_llmc_saved_reloaded']:.4f} |",
                      f"| flexquant eval of the saved folder (import) | {llmc['ppl_flexquant_import']:.4f} |",
                      f"| relative difference (bar ≤ 0.5%) | {llmc['rel_diff']:.1e} "
                      f"({'pass' if llmc['pass'] else 'FAIL'}) |",
                      f"| bits per weight stored in the file | {llmc['bpw_in_file']:.4f} |", "",
                      f"transformers' compressed (non-dequantizing) load path: {llmc['transformers_compressed_path']}; "
                      f"versions: {llmc['versions']}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--skip-llmc", action="store_true")
    p.add_argument("--gptq-python", default=str(ROOT / ".venv-gptq/bin/python"),
                   help="a python with optimum + GPTQModel (bash bench/gptq_env.sh)")
    p.add_argument("--out", default=str(ROOT / "bench/results"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import flexquant as fq
    from bench import foundation  # the demo model, calibration file and held-out windows

    work = Path(args.out) / "work" / "export"
    calib, windows = foundation.setup(args, work, args.windows)
    save_file({"input_ids": windows.contiguous()}, work / "eval.tmp")  # for the transformers subprocesses
    (work / "eval.tmp").replace(work / "eval.safetensors")
    header = (f"smollm2-135m, group 64, calibration {args.nsamples}×{args.seqlen} tokens (pydoc calibration split), "
              f"evaluation {windows.shape[0]} windows × 2048 tokens (pydoc held-out split); {dt.date.today()}, "
              f"{platform.machine()} with {os.cpu_count()} cores, torch {torch.__version__}")
    rows = []
    for name, fmt in EXPORTS:
        src = quantize(name, args, work, calib)
        out = work / f"{name}.{fmt}"
        opts = {"online_rotation": "dense"} if name.startswith("flexible") else {}
        summary = fq.export(src, out, fmt, overwrite=True, **opts)
        python = Path(sys.executable) if fmt == "compressed-tensors" else Path(args.gptq_python)
        if not python.exists():
            check = {"error": [f"{python} is missing: run `bash bench/gptq_env.sh`"]}
        else:
            log.info("checking %s with %s", out.name, python)
            check = run_check(python, src, out, work / "eval.safetensors")
        bpw = json.loads((src / "report.json").read_text())["summary"]["bpw"]
        rows.append({"model": name, "format": fmt, "client": CLIENTS[fmt], "export": summary, "check": check,
                     "bpw_flexquant": bpw})
        log.info("%s %s: %s", name, fmt, {k: v for k, v in check.items() if k != "client_layers"})
        peers = ROOT / ".venv-peers/bin/python"
        if fmt == "compressed-tensors" and peers.exists():  # the versions llm-compressor 0.14 ships with
            log.info("checking %s with %s (compressed load path)", out.name, peers)
            check = run_check(peers, src, out, work / "eval.safetensors",
                              {"PYTHONPATH": str(ROOT / "src"), "FQ_CT_COMPRESSED_PATH": "1"})
            rows.append({"model": name, "format": fmt, "client": CLIENTS["peers"], "export": summary,
                         "check": check, "bpw_flexquant": bpw})
    llmc = None if args.skip_llmc else llmc_import(args, work, work / "calib.safetensors", work / "eval.safetensors")
    md = markdown(header, rows, llmc)
    for suffix, text in ((".md", md), (".json", json.dumps({"header": header, "exports": rows, "llmc_import": llmc},
                                                            indent=2))):
        path = Path(args.out, "export" + suffix)
        path.with_suffix(".tmp").write_text(text)
        path.with_suffix(".tmp").replace(path)
    print(md)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_markdown":  # rewrite export.md from export.json
        res = json.loads(Path(sys.argv[2], "export.json").read_text())
        Path(sys.argv[2], "export.md").write_text(markdown(res["header"], res["exports"], res["llmc_import"]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_check":
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(hf_check(*sys.argv[2:5])))
    else:
        main()
