#!/usr/bin/env python
"""GGUF judged by llama.cpp (issue 24) on smollm2-135m: flexquant's `--target gguf` files against llama.cpp's own
imatrix quants, every perplexity computed by llama.cpp on the same held-out windows as bench/foundation.py.

    bash bench/llama_env.sh                        # llama.cpp tools + binding, built from PyPI's source (once)
    .venv-llama/bin/python -m bench.gguf           # -> bench/results/gguf.{md,json,png}

Steps (finished rows are cached in bench/results/work-gguf/rows.json; a rerun resumes):
1. the float model as an F32 GGUF (`flexquant export MODEL --format gguf --dtype float32`), its llama.cpp
   perplexity beside flexquant's float perplexity;
2. llama.cpp's imatrix from the calibration windows (decoded to text), then ``llama-quantize --imatrix`` to each
   ``--types`` (Q4_0, Q4_K_M, ... : llama.cpp's own tensor mixes and fallbacks);
3. flexquant: GPTQ w4 into Q4_0 and FlexibleLLM at the budgets whose files match each llama.cpp file's size
   (±2%; a size below the cheapest GGML type of every linear — Q4_0, or Q3_K where a row holds 256-weight
   super-blocks — is out of `--target gguf`'s reach and is listed so);
   each quantized, exported, and measured twice: flexquant's perplexity of its own model and llama.cpp's of
   the file (the export bar: within 0.5%).
File bits per weight = file bytes × 8 / the weights of every 2-D tensor (linears and the embedding), the same
count for both tools.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LLAMA = ROOT / ".llama"
os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(LLAMA / "lib"))
from bench import foundation  # noqa: E402

log = logging.getLogger("gguf")
TYPES = ("Q4_0", "Q4_K_M", "Q5_K_M", "Q3_K_M", "Q3_K_S", "Q2_K")


def tool(name: str, *args: str) -> None:
    exe = LLAMA / "bin" / name
    if not exe.is_file():
        sys.exit(f"{exe} is missing: run bash bench/llama_env.sh first")
    t0 = time.perf_counter()
    res = subprocess.run([str(exe), *args], capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"{name} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    log.info("%s done in %.0f s", name, time.perf_counter() - t0)


def weights_2d(model_dir: str) -> int:
    from flexquant.tensorio import TensorFiles

    return sum(e.shape[0] * e.shape[1] for e in TensorFiles(model_dir).entries.values() if len(e.shape) == 2)


def llama_row(path: Path, windows: torch.Tensor, n2d: int, extra: dict) -> dict:
    from flexquant.eval.llama_cpp import gguf_perplexity

    res = gguf_perplexity(path, windows, threads=2, progress=False)
    size = path.stat().st_size
    return {**extra, "file": str(path), "file_bytes": size, "file_bpw": size * 8 / n2d,
            "llama_ppl": res["perplexity"], "llama_eval_s": res["eval_seconds"]}


def flexquant_row(name: str, quantize: dict, args, calib, windows, n2d: int, work: Path) -> dict:
    import flexquant as fq
    from flexquant.eval import evaluate_windows

    t0 = time.perf_counter()
    qm = fq.quantize(args.model_dir, calib_ids=calib, nsamples=calib.shape[0], seqlen=calib.shape[1],
                     progress=False, target="gguf", **quantize)
    seconds = time.perf_counter() - t0
    path = fq.save(qm, work / name, overwrite=True, plot=False)
    exp = fq.export(path, work / f"{name}.gguf", "gguf", overwrite=True, gguf_embedding=args.embedding)
    if args.embedding != "q8_0":  # rounded at export: flexquant's own figure with the file's embedding and head
        file_ends(qm.model, work / f"{name}.gguf")
    own = evaluate_windows(qm.model, windows, progress=False)["perplexity"]
    row = llama_row(work / f"{name}.gguf", windows, n2d, {"tool": "flexquant", "name": name,
                                                          "quantize": quantize, "quant_seconds": seconds})
    row.update({"flexquant_ppl": own, "linear_bpw": exp["bpw"], "linear_weights": exp["quantized_weights"],
                "block_types": exp["block_types"], "ppl_gap": row["llama_ppl"] / own - 1})
    return row


@torch.no_grad()
def file_ends(model, path: Path) -> None:
    """Give ``model`` the token embedding and output head as the GGUF file ``path`` stores them (dequantized by
    the gguf package), so that its perplexity is that of the weights in the file."""
    import gguf
    from gguf.quants import dequantize

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for name, mod in (("token_embd.weight", model.get_input_embeddings()),
                      ("output.weight", model.get_output_embeddings())):
        if name in tensors:
            t = tensors[name]
            mod.weight.data.copy_(torch.from_numpy(dequantize(t.data, t.tensor_type)).view_as(mod.weight))


def budget_for(size: int, base: dict) -> float:
    """--bpw of the linears that makes the file ``size`` bytes, from a flexquant file ``base`` (its other bytes
    are fixed: embedding, norms, tokenizer, header)."""
    fixed = base["file_bytes"] - base["linear_bpw"] * base["linear_weights"] / 8
    return (size - fixed) * 8 / base["linear_weights"]


def least_bpw(ckpt: Path) -> float:
    """The smallest --bpw --target gguf can reach for the model of checkpoint ``ckpt`` (every linear at its
    cheapest GGML type: Q4_0, or Q3_K where rows hold 256-weight super-blocks)."""
    from flexquant.quant.targets import get_target

    t = get_target("gguf")
    mods = json.loads((ckpt / "quant_config.json").read_text())["modules"]
    bits = weights = 0
    for m in mods.values():
        rows, cols = m["out_features"], m["in_features"]
        bits += min(t.stored_bits(rows, cols, g, True, b) for b, g in t.layer_options(cols, t.bits, (32,)))
        weights += rows * cols
    return bits / weights


def size_at(bpw: float, base: dict) -> float:
    """File bytes of a flexquant GGUF whose linears store ``bpw`` (the inverse of `budget_for`)."""
    fixed = base["file_bytes"] - base["linear_bpw"] * base["linear_weights"] / 8
    return fixed + bpw * base["linear_weights"] / 8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--types", nargs="*", default=list(TYPES), help="llama-quantize types to compare against")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--name", default="gguf")
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--clips", nargs="+", default=["mse"], choices=("mse", "lsq", "minmax"),
                   help="GridConfig.clip of the flexquant rows, each with each --sym-grids (rows other than mse "
                        "are named with a -CLIP suffix)")
    p.add_argument("--embedding", default="q8_0", choices=("q8_0", "q5_0", "q4_0"),
                   help="GGML type of the token embedding and output head in flexquant's files (rows other than "
                        "q8_0 are named with a -eTYPE suffix; llama.cpp's own files keep its choice)")
    p.add_argument("--table-only", action="store_true",
                   help="write the results from the rows already measured (work-NAME/rows.json), run nothing")
    p.add_argument("--sym-grids", nargs="+", default=["balanced"], choices=("balanced", "signed"),
                   help="flexquant rows for each symmetric grid rule (GridConfig.sym_grid); 'signed' rows are "
                        "named with a -signed suffix")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = ROOT / "bench/results" / f"work-{args.name}"
    calib, windows = foundation.setup(args, work, args.windows)
    cache = foundation.RowCache(work, args.fresh)
    n2d = weights_2d(args.model_dir)

    class Missing(Exception):
        pass

    def cached(key, make):
        row = cache.get(key)
        if row is None and args.table_only:
            raise Missing(key)
        if row is None:
            log.info("row %s", key)
            row = make()
            cache.put(key, row)
        return row

    import flexquant as fq
    from flexquant.eval import evaluate_windows
    from flexquant.models.loader import load_model

    def reference():
        f32 = work / "f32.gguf"
        fq.export(args.model_dir, f32, "gguf", dtype="float32", gguf_embedding="f32", overwrite=True)
        model, _ = load_model(args.model_dir)
        own = evaluate_windows(model, windows, progress=False)["perplexity"]
        return {**llama_row(f32, windows, n2d, {"tool": "float", "name": "F32"}), "flexquant_ppl": own}

    rows = [cached("F32", reference)]
    imatrix = work / "imatrix.gguf"
    if not imatrix.is_file():
        from flexquant.models import load_tokenizer

        tok = load_tokenizer(args.model_dir)
        (work / "calib.txt").write_text("\n".join(tok.decode(w) for w in calib.tolist()))
        tool("llama-imatrix", "-m", str(work / "f32.gguf"), "-f", str(work / "calib.txt"), "-c", str(args.seqlen),
             "--chunks", str(args.nsamples), "-o", str(imatrix), "-t", "2", "--no-ppl")
    for t in args.types:
        def make(t=t):
            out = work / f"llama-{t}.gguf"
            tool("llama-quantize", "--imatrix", str(imatrix), str(work / "f32.gguf"), str(out), t, "2")
            return llama_row(out, windows, n2d, {"tool": "llama.cpp", "name": f"{t} (imatrix)"})
        rows.append(cached(f"llama:{t}", make))

    from flexquant.errors import FlexQuantError

    for grid, clip in [(g, c) for c in args.clips for g in args.sym_grids]:
        sfx = (("" if grid == "balanced" else f"-{grid}") + ("" if clip == "mse" else f"-{clip}")
               + ("" if args.embedding == "q8_0" else f"-e{args.embedding}"))
        extra = {"sym_grid": grid, "clip": clip}
        try:
            base = cached(f"fq:gptq-q4_0{sfx}", lambda sfx=sfx, extra=extra: flexquant_row(
                f"gptq-q4_0{sfx}", {"method": "gptq", "bits": 4, **extra}, args, calib, windows, n2d, work))
        except Missing:
            continue
        rows.append(base)
        least = least_bpw(Path(base["file"]).with_suffix(""))
        for r in [r for r in rows if r["tool"] == "llama.cpp"]:
            raw = budget_for(r["file_bytes"], base)
            bpw = math.ceil(raw * 1000) / 1000  # --bpw to 3 decimals, never below
            if cache.get(f"fq:flexible-{raw:.3f}{sfx}") is not None:  # a row measured before rounding up
                bpw = round(raw, 3)
            if least > bpw and size_at(least, base) <= 1.02 * r["file_bytes"]:
                bpw = math.ceil(least * 1000) / 1000  # the smallest file, still within ±2% of the peer's size
            if bpw > 8.5:
                r["flexquant_match"] = f"out of reach: {bpw:.2f} bits per linear weight (Q8_0 everywhere is 8.5)"
                continue
            name = f"flexible-{bpw:.3f}{sfx}"
            try:
                rows.append(cached(f"fq:{name}", lambda bpw=bpw, name=name, extra=extra: flexquant_row(
                    name, {"method": "flexible", "options": {"bpw": bpw}, **extra}, args, calib,
                    windows, n2d, work)))
            except Missing:
                continue
            except FlexQuantError as e:  # below the cheapest GGML type of every linear
                r["flexquant_match"] = f"out of reach: {bpw:.2f} bits per linear weight ({e})"
                continue
            r["flexquant_match"] = name
    write(args, rows)


def write(args, rows: list[dict]) -> None:
    rows = list({r["name"] + r["tool"]: r for r in rows}.values())  # one line per file (Q2_K and Q3_K_S share one)
    res = ROOT / "bench/results"
    (res / f"{args.name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    head = (f"{args.model}, calibration {args.nsamples}×{args.seqlen} tokens (imatrix and flexquant), "
            f"evaluation {args.windows} windows × 2048 held-out tokens, perplexity computed by llama.cpp "
            f"(llama-cpp-python binding over the same build as the tools) on the same token ids; "
            f"{time.strftime('%Y-%m-%d')}, 2 threads")
    lines = [head, "", "| file | tool | bytes | bits/weight (file) | llama.cpp ppl | flexquant ppl | gap | "
             "linear types |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["file_bytes"]):
        own = f"{r['flexquant_ppl']:.3f}" if "flexquant_ppl" in r else "—"
        gap = f"{(r['llama_ppl'] / r['flexquant_ppl'] - 1) * 100:+.2f}%" if "flexquant_ppl" in r else "—"
        types = ", ".join(f"{k} ×{v}" for k, v in sorted(r.get("block_types", {}).items())) or "—"
        lines.append(f"| {r['name']} | {r['tool']} | {r['file_bytes']} | {r['file_bpw']:.3f} | "
                     f"{r['llama_ppl']:.3f} | {own} | {gap} | {types} |")
    misses = [f"- {r['name']}: {r['flexquant_match']}" for r in rows if "out of reach" in str(r.get("flexquant_match"))]
    if misses:
        lines += ["", "Sizes flexquant's GGUF types cannot reach yet:", *misses]
    (res / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    plot(rows, res / f"{args.name}.png")
    print("\n".join(lines))


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for tool_name, mark in (("llama.cpp", "o"), ("flexquant", "s")):
        pts = sorted((r["file_bpw"], r["llama_ppl"]) for r in rows if r["tool"] == tool_name)
        if pts:
            ax.plot(*zip(*pts), marker=mark, label=tool_name)
    ref = [r for r in rows if r["tool"] == "float"]
    if ref:
        ax.axhline(ref[0]["llama_ppl"], color="grey", linestyle=":", label="float (F32)")
    ax.set_xlabel("bits per weight (file bytes × 8 / 2-D weights)")
    ax.set_ylabel("perplexity (llama.cpp)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
