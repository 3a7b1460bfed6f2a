"""Adaptive transformation selection (METHODS.md §3, issue 7): five variants side by side on smollm2-135m.

At each weight/activation/KV setting (W4A4KV4, W3A3K2V2) the same model, calibration windows and held-out
windows are used for: no transform, all-rotation (QuaRot-style), all-affine (FlatQuant-style), the
differentiable search, and the kurtosis rule in both orientations (ordinary sites rotation / outliers
affine, and the reverse). Each quantization runs in its own subprocess (bench/foundation.py's job), so its
wall time and peak memory are its own; evaluation (perplexity, KL to the full-precision model on 8×2048
held-out pydoc tokens) runs here on the saved checkpoints, i.e. with the activation and KV quantizers that
`flexquant.load` re-attaches.

    python bench/adaptive_bench.py                          # everything (hours on 2 cores)
    python bench/adaptive_bench.py --settings W4A4KV4 --variants rule-rotation,search

Finished rows are kept in OUT/work/adaptive/rows.json, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import foundation as fd  # noqa: E402  (the shared job / evaluation helpers)

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench")
SETTINGS = {"W4A4KV4": (4, 4, 4, 4), "W3A3K2V2": (3, 3, 2, 2)}
VARIANTS = {
    "none": {"transform": "none"},
    "rotation": {"transform": "rotation"},
    "affine": {"transform": "affine"},
    "search": {"transform": "search"},
    "rule-rotation": {"transform": "rule", "rule_default": "rotation"},
    "rule-affine": {"transform": "rule", "rule_default": "affine"},
}
# The same with the learned rotation (orthogonal Kronecker factors trained from the Hadamard) as "rotation".
LEARNED = "-learned"
VARIANTS.update({v + LEARNED: {**o, "rotation": "learned"} for v, o in list(VARIANTS.items())
                 if v not in ("none", "affine")})


def rule_timing(model_dir: str, repeats: int) -> dict:
    """Median wall time of the rule's selection (kurtosis of every site's weights + robust z-scores)."""
    from flexquant.methods.adaptive import SITE_NAMES, kurtosis, rule_choice
    from flexquant.models import get_spec, load_model
    from flexquant.transforms.rotate import fold_norm

    model, _ = load_model(model_dir)
    spec = get_spec(model.config.model_type)
    layers = model.get_submodule(spec.layers)
    for block in layers:
        for norm, readers in spec.norm_linear_pairs:
            fold_norm(block.get_submodule(norm), [block.get_submodule(r) for r in readers])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        kappa = [{name: kurtosis(torch.cat([block.get_submodule(n).weight for n in group]))
                  for name, group in zip(SITE_NAMES, spec.linear_groups)} for block in layers]
        rule_choice(kappa, "rotation", 3.5)
        times.append(time.perf_counter() - t0)
    return {"median_seconds": statistics.median(times), "repeats": repeats}


def method_facts(row: dict) -> None:
    """Selection, calibration and choice facts from the run's report."""
    if "error" in row:
        return
    rep = json.loads((Path(row["path"]) / "report.json").read_text())["method"]["adaptive"]
    blocks = rep["blocks"]
    row["facts"] = {
        "selection_seconds": rep["selection_seconds"], "search_seconds": rep["search_seconds"],
        "rule_seconds": rep["rule_seconds"], "calibration_seconds": rep["calibration_seconds"],
        "calibration_block_median_seconds": statistics.median(b["seconds"] for b in blocks),
        "search_block_median_seconds": (statistics.median(b["search_seconds"] for b in blocks)
                                        if "search_seconds" in blocks[0] else None),
        "counts": rep["counts"], "choice": rep["choice"], "agreement": rep.get("agreement"),
        "rule": rep["rule"], "z": rep["z"], "kurtosis": rep["kurtosis"],
        "loss_first": sum(b["loss_first"] for b in blocks), "loss_last": sum(b["loss_last"] for b in blocks),
        "train_tokens": rep["train_tokens"],
    }


def table(rows: list[dict]) -> str:
    lines = ["| setting | variant | sites affine / rotation / none | bpw (stored) | perplexity | KL to FP | "
             "selection (s) | calibration (s) | quant time (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "reference":
            lines.append(f"| FP32 | full precision | — | 32 | {r['perplexity']:.3f} | 0 | — | — | — |")
            continue
        if "error" in r:
            lines.append(f"| {r['setting']} | {r['variant']} | failed: {r['error']} | | | | | | |")
            continue
        f = r["facts"]
        c = f["counts"]
        sel = f"{f['selection_seconds']:.2f}" if f["selection_seconds"] else "—"
        lines.append(f"| {r['setting']} | {r['variant']} | {c['affine']} / {c['rotation']} / {c['none']} | "
                     f"{r['bpw']:.3f} | {r['perplexity']:.3f} | {r['kl_divergence']:.4f} | {sel} | "
                     f"{f['calibration_seconds']:.0f} | {r['quant_seconds']:.0f} |")
    return "\n".join(lines)


def verdicts(rows: list[dict], rule_time: dict) -> list[str]:
    """The issue's bar, checked for each rule orientation, plus the rule/search agreement."""
    out = []
    by = {(r.get("setting"), r.get("variant")): r for r in rows if "perplexity" in r and r["kind"] != "reference"}
    for setting, rk in ((s, r) for s in SETTINGS for r in ("", LEARNED)):
        aff, rot, srch = (by.get((setting, v)) for v in ("affine", "rotation" + rk, "search" + rk))
        kind = "learned rotation" if rk else "Hadamard rotation"
        for orient in ("rotation", "affine"):
            rule = by.get((setting, f"rule-{orient}{rk}"))
            if not (rule and aff and (rot or setting != "W4A4KV4")):
                continue
            if setting == "W4A4KV4":
                best = min(aff["perplexity"], rot["perplexity"])
                line = (f"- {setting}, {kind}, rule (ordinary sites {orient}): perplexity {rule['perplexity']:.3f} "
                        f"vs better of all-affine / all-rotation {best:.3f}: "
                        f"{'met' if rule['perplexity'] <= best else 'NOT met'}")
                if srch:
                    ratio = rule_time["median_seconds"] / srch["facts"]["search_seconds"]
                    line += (f"; selection {rule_time['median_seconds']:.2f} s (median of {rule_time['repeats']}) vs "
                             f"search {srch['facts']['search_seconds']:.0f} s = {ratio:.4f}× "
                             f"({'met' if ratio <= 0.2 else 'NOT met'}, bar ≤ 0.2×)")
            else:
                line = (f"- {setting}, {kind}, rule (ordinary sites {orient}): perplexity "
                        f"{rule['perplexity']:.3f} vs all-affine {aff['perplexity']:.3f}: "
                        f"{'met' if rule['perplexity'] <= aff['perplexity'] else 'NOT met'}")
            out.append(line)
        if srch and srch["facts"].get("agreement"):
            ag = srch["facts"]["agreement"]
            n_sites = sum(srch["facts"]["counts"].values())
            out.append(f"- {setting}, {kind}, rule/search agreement over {n_sites} sites: "
                       + ", ".join(f"ordinary sites {k}: {v:.1%}" for k, v in ag.items()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--nsamples", type=int, default=32, help="GPTQ calibration windows")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--train-nsamples", type=int, default=4, help="windows the transforms/clipping are trained on")
    p.add_argument("--train-steps", type=int, default=16)
    p.add_argument("--search-steps", type=int, default=16)
    p.add_argument("--windows", type=int, default=8, help="evaluation windows of 2048 tokens")
    p.add_argument("--rule-repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="transform seed (random signs, initial transforms); rows of a "
                   "seed other than 0 are labelled with it")
    p.add_argument("--out", default=str(ROOT / "bench/results"))
    p.add_argument("--name", default="adaptive")
    p.add_argument("--fresh", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    work = Path(args.out) / "work" / "adaptive"
    calib, windows = fd.setup(args, work, args.windows)
    cache = fd.RowCache(work, args.fresh)
    ref, fp_row = fd.reference_row(args, windows)
    rows = [fp_row]
    rule_time = rule_timing(args.model_dir, args.rule_repeats)
    header = (f"smollm2-135m; weights GPTQ group {args.group_size} (asymmetric, act-order) from {args.nsamples}×"
              f"{args.seqlen} calibration tokens; transforms and clipping trained per block on "
              f"{args.train_nsamples}×{args.seqlen} tokens, {args.train_steps} Adam steps "
              f"(search: +{args.search_steps} mixed steps); activations symmetric per token, K/V asymmetric "
              f"per head; evaluation "
              f"{windows.shape[0]}×2048 held-out pydoc tokens through the saved checkpoints; {dt.date.today()}, "
              f"{platform.machine()} with {os.cpu_count()} cores, torch {torch.__version__}")
    train = {"train_nsamples": args.train_nsamples, "train_steps": args.train_steps, "search_steps": args.search_steps}
    setting_key = f"calib{args.nsamples}x{args.seqlen}-eval{windows.shape[0]}"

    for setting in args.settings:
        w, a, k, v = SETTINGS[setting]
        for variant in filter(None, args.variants.split(",")):
            options = {"w_bits": w, "a_bits": a, "k_bits": k, "v_bits": v, **VARIANTS[variant], **train,
                       **({"seed": args.seed} if args.seed else {})}
            key = f"{setting_key}:{json.dumps(options, sort_keys=True)}"
            cached = cache.get(key)
            if cached is not None:
                log.info("reusing %s %s", setting, variant)
                rows.append(cached)
            else:
                row = fd.run_quantization("flexquant", "adaptive", w, args, work, options)
                row.update(setting=setting, variant=variant + (f" seed={args.seed}" if args.seed else ""))
                method_facts(row)
                fd.evaluate_row(row, windows, ref)
                rows.append(row)
                if "error" not in row:
                    cache.put(key, row)
            write(args, header, rows, rule_time)
    print(write(args, header, rows, rule_time))


def write(args, header: str, rows: list[dict], rule_time: dict) -> str:
    md = (f"{header}\n\n{table(rows)}\n\nRule selection time, measured apart: {rule_time['median_seconds']:.3f} s "
          f"(median of {rule_time['repeats']}).\n\n" + "\n".join(verdicts(rows, rule_time)) + "\n")
    payload = {"header": header, "rule_timing": rule_time, "rows": rows}
    for suffix, text in ((".md", md), (".json", json.dumps(payload, indent=1))):
        path = Path(args.out, args.name + suffix)
        path.with_suffix(".tmp").write_text(text)
        path.with_suffix(".tmp").replace(path)
    return md


if __name__ == "__main__":
    main()
