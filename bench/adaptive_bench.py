"""Adaptive transformation selection (METHODS.md §3, issue 7): five variants side by side on smollm2-135m
(or ``--model gemma3-270m``).

At each weight/activation/KV setting (W4A4KV4, W3A3K2V2) the same model, calibration windows and held-out
windows are used for: no transform, all-rotation (QuaRot-style), all-affine (FlatQuant-style), the
differentiable search, and the kurtosis rule in both orientations (ordinary sites rotation / outliers
affine, and the reverse), scoring raw or norm-folded weights; `*-learned` variants use the learned orthogonal
rotation instead of the fixed Hadamard. Each quantization runs in its own subprocess (bench/foundation.py's job), so its
wall time and peak memory are its own; evaluation (perplexity, KL to the full-precision model on 8×2048
held-out pydoc tokens) runs here on the saved checkpoints, i.e. with the activation and KV quantizers that
`flexquant.load` re-attaches.

    python -m bench.adaptive_bench                          # everything (hours on 2 cores)
    python -m bench.adaptive_bench --settings W4A4KV4 --variants rule-rotation,search
    python -m bench.adaptive_bench --settings W4A4KV4 --variants affine,rule-affine --seeds 0,1,2 --name adaptive_seeds
    python -m bench.adaptive_bench --model gemma3-270m --settings W4A4KV4 \
        --variants rule-affine,affine,rotation,search --seeds 0,1,2 --name gemma3_270m_adaptive

Finished rows are kept in the model's work folder (OUT/work/adaptive/rows.json for smollm2-135m), keyed by the
resolved method configuration, so an interrupted run resumes and a changed default never reuses a stale row.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from bench import foundation as fd  # the shared job / evaluation helpers

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench")
SETTINGS = {"W4A4KV4": (4, 4, 4, 4), "W3A3K2V2": (3, 3, 2, 2)}
VARIANTS = {
    "none": {"transform": "none"},
    "rotation": {"transform": "rotation"},
    "affine": {"transform": "affine"},
    "search": {"transform": "search"},
    # The rule: kurtosis of the raw checkpoint weights (default), or of the weights with the norm scales folded in.
    "rule-rotation": {"transform": "rule", "rule_default": "rotation", "rule_weights": "raw"},
    "rule-affine": {"transform": "rule", "rule_default": "affine", "rule_weights": "raw"},
    "rule-folded-rotation": {"transform": "rule", "rule_default": "rotation", "rule_weights": "folded"},
    "rule-folded-affine": {"transform": "rule", "rule_default": "affine", "rule_weights": "folded"},
}
# The same with the learned rotation (orthogonal Kronecker factors trained from the Hadamard) as "rotation".
LEARNED = "-learned"
VARIANTS.update({v + LEARNED: {**o, "rotation": "learned"} for v, o in list(VARIANTS.items())
                 if v not in ("none", "affine")})
# Rows cached before rule_weights existed were keyed by the options as passed, when the rule scored folded weights;
# rows cached before fold_norms existed were computed with the norms folded.
LEGACY_DEFAULTS = {"rule_weights": "folded", "fold_norms": "on"}


def config_key(setting_key: str, options: dict, defaults: dict | None = None) -> str:
    """A cache key from the method's resolved configuration (less the settings this transform mode does not
    use), so a changed default can never reuse a stale row."""
    from dataclasses import asdict

    from flexquant.methods.adaptive import AdaptiveConfig

    resolved = asdict(AdaptiveConfig(**{**(defaults or {}), **options}))
    if resolved["transform"] != "rule":  # settings the model does not depend on
        for k in ("rule_default", "rule_weights", "z_threshold"):
            del resolved[k]
    if resolved["transform"] in ("none", "affine"):
        del resolved["rotation"]
    if resolved["transform"] == "none":  # nothing is folded without transforms
        del resolved["fold_norms"]
    return f"{setting_key}:resolved:{json.dumps(resolved, sort_keys=True)}"


def legacy_rows(cache) -> dict[str, dict]:
    """Rows under the old as-passed keys, re-keyed by their resolved configuration under the defaults of then."""
    out = {}
    for key, row in cache.rows.items():
        if ":resolved:" not in key and ":" in key:
            setting_key, options = key.split(":", 1)
            out[config_key(setting_key, json.loads(options), LEGACY_DEFAULTS)] = row
        elif ":resolved:" in key:  # resolved before fold_norms existed: the norms were folded
            setting_key, resolved = key.split(":resolved:")
            resolved = json.loads(resolved)
            if "fold_norms" not in resolved and resolved["transform"] != "none":
                out[config_key(setting_key, {**resolved, "fold_norms": "on"})] = row
    return out


def rule_rows(names) -> list[tuple[str, str, str]]:
    """(rule variant, its all-rotation baseline, description) for every rule variant among ``names``."""
    out = []
    for v in names:
        if v.startswith("rule-"):
            o = VARIANTS[v]
            rot = "rotation" + (LEARNED if o.get("rotation") == "learned" else "")
            what = (f"rule ({o['rule_weights']} weights, ordinary sites {o['rule_default']}, "
                    f"{o.get('rotation', 'hadamard')} rotation)")
            out.append((v, rot, what))
    return out


def rule_timing(model_dir: str, repeats: int) -> dict:
    """Median wall time of the rule's selection (kurtosis of every site's raw weights + robust z-scores; scoring
    the folded weights costs the same, the folding being part of every transform's preparation)."""
    from flexquant.methods.adaptive import SITE_NAMES, rule_choice, site_kurtosis
    from flexquant.models import get_spec, load_model

    model, _ = load_model(model_dir)
    spec = get_spec(model.config.model_type)
    layers = model.get_submodule(spec.layers)
    groups = list(zip(SITE_NAMES, spec.linear_groups))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        kappa = [site_kurtosis(block, groups) for block in layers]
        rule_choice(kappa, "affine", 3.5)
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


def seed_means(rows: list[dict]) -> dict[tuple[str, str], tuple[float, float, int, float, float]]:
    """(setting, variant) -> (mean perplexity, its sample standard deviation, seeds, mean KL, its standard
    deviation) where a variant ran with 2+ seeds."""
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in rows:
        if r["kind"] != "reference" and "perplexity" in r:
            runs.setdefault((r["setting"], r["base"]), []).append((r["perplexity"], r["kl_divergence"]))
    out = {}
    for k, v in runs.items():
        if len(v) > 1:
            ppl, kl = zip(*v)
            out[k] = (statistics.mean(ppl), statistics.stdev(ppl), len(v), statistics.mean(kl), statistics.stdev(kl))
    return out


def bar_line(setting: str, what: str, rule: float, aff: float | None, rot: float | None) -> str | None:
    """The issue's perplexity bar for one rule variant: W4A4KV4 ≤ the better of all-affine and all-rotation,
    W3A3K2V2 ≤ all-affine."""
    if aff is None:
        return None
    if setting == "W4A4KV4" and rot is not None:
        best, against = min(aff, rot), "better of all-affine / all-rotation"
    else:
        best, against = aff, "all-affine" + (" (all-rotation not run here)" if setting == "W4A4KV4" else "")
    return f"{what}: perplexity {rule:.3f} vs {against} {best:.3f}: {'met' if rule <= best else 'NOT met'}"


def seed_table(rows: list[dict]) -> str:
    means = seed_means(rows)
    if not means:
        return ""
    lines = ["Across transform seeds (mean ± sample standard deviation):", "",
             "| setting | variant | seeds | perplexity | KL to FP |", "|---|---|---|---|---|"]
    lines += [f"| {s} | {v} | {n} | {m:.3f} ± {sd:.3f} | {mk:.4f} ± {sdk:.4f} |"
              for (s, v), (m, sd, n, mk, sdk) in means.items()]
    lines.append("")
    for s in SETTINGS:
        for v, rot, what in rule_rows(VARIANTS):
            if (s, v) in means:
                line = bar_line(s, what, means[(s, v)][0], (means.get((s, "affine")) or (None,))[0],
                                (means.get((s, rot)) or (None,))[0])
                if line:
                    lines.append(f"- {s}, mean over seeds, {line}")
    return "\n".join(lines) + "\n"


def verdicts(rows: list[dict], rule_time: dict) -> list[str]:
    """The issue's bar for every rule variant (seed 0 rows), plus the rule/search agreement."""
    from flexquant.methods.adaptive import agreement

    out = []
    by = {(r.get("setting"), r.get("variant")): r for r in rows if "perplexity" in r and r["kind"] != "reference"}

    def ppl(setting, v):
        return by[(setting, v)]["perplexity"] if (setting, v) in by else None

    for setting in SETTINGS:
        srch = by.get((setting, "search"))
        for v, rot, what in rule_rows(VARIANTS):
            if (setting, v) not in by:
                continue
            line = bar_line(setting, what, ppl(setting, v), ppl(setting, "affine"), ppl(setting, rot))
            if line and setting == "W4A4KV4" and srch:
                ratio = rule_time["median_seconds"] / srch["facts"]["search_seconds"]
                line += (f"; selection {rule_time['median_seconds']:.2f} s (median of {rule_time['repeats']}) vs "
                         f"search {srch['facts']['search_seconds']:.0f} s = {ratio:.4f}× "
                         f"({'met' if ratio <= 0.2 else 'NOT met'}, bar ≤ 0.2×)")
            if line and srch:
                same = agreement(by[(setting, v)]["facts"]["choice"], srch["facts"]["choice"])
                line += f"; agrees with the search on {same:.1%} of the sites"
            if line:
                out.append(f"- {setting}, {line}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="built-in model name (smollm2-135m, gemma3-270m) or folder")
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
    p.add_argument("--seeds", default="0", help="transform seeds, comma-separated (random signs, initial transforms); "
                   "rows of a seed other than 0 are labelled with it, and with several seeds the report adds each "
                   "variant's mean and spread and the bar on the means")
    p.add_argument("--out", default=str(ROOT / "bench/results"))
    p.add_argument("--name", default="adaptive")
    p.add_argument("--fresh", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    work = fd.work_dir(args) / "adaptive"
    calib, windows = fd.setup(args, work, args.windows)
    cache = fd.RowCache(work, args.fresh)
    legacy = legacy_rows(cache)
    ref, fp_row = fd.reference_row(args, windows)
    rows = [fp_row]
    rule_time = rule_timing(args.model_dir, args.rule_repeats)
    header = (f"{args.model}; weights GPTQ group {args.group_size} (asymmetric, act-order) from {args.nsamples}×"
              f"{args.seqlen} calibration tokens; transforms and clipping trained per block on "
              f"{args.train_nsamples}×{args.seqlen} tokens, {args.train_steps} Adam steps "
              f"(search: +{args.search_steps} mixed steps); activations symmetric per token, K/V asymmetric "
              f"per head; evaluation "
              f"{windows.shape[0]}×2048 held-out pydoc tokens through the saved checkpoints; {dt.date.today()}, "
              f"{platform.machine()} with {os.cpu_count()} cores, torch {torch.__version__}, "
              f"ATen {torch.backends.cpu.get_cpu_capability()}")
    train = {"train_nsamples": args.train_nsamples, "train_steps": args.train_steps, "search_steps": args.search_steps}
    setting_key = f"calib{args.nsamples}x{args.seqlen}-eval{windows.shape[0]}"

    seeds = [int(x) for x in args.seeds.split(",")]
    for setting, seed in ((st, sd) for sd in seeds for st in args.settings):
        w, a, k, v = SETTINGS[setting]
        for variant in filter(None, args.variants.split(",")):
            options = {"w_bits": w, "a_bits": a, "k_bits": k, "v_bits": v, **VARIANTS[variant], **train,
                       **({"transform_seed": seed} if seed else {})}
            key = config_key(setting_key, options)
            cached = cache.get(key) or legacy.get(key)
            if cached is not None:
                log.info("reusing %s %s seed %d", setting, variant, seed)
                row = cached
            else:
                row = fd.run_quantization("flexquant", "adaptive", w, args, work, options)
                method_facts(row)
                fd.evaluate_row(row, windows, ref)
                if "error" not in row:
                    cache.put(key, row)
            row.update(setting=setting, variant=variant + (f" seed={seed}" if seed else ""), base=variant, seed=seed)
            rows.append(row)
            write(args, header, rows, rule_time)
    print(write(args, header, rows, rule_time))


def write(args, header: str, rows: list[dict], rule_time: dict) -> str:
    md = (f"{header}\n\n{table(rows)}\n\nRule selection time, measured apart: {rule_time['median_seconds']:.3f} s "
          f"(median of {rule_time['repeats']}).\n\n" + "\n".join(verdicts(rows, rule_time)) + "\n\n"
          + seed_table(rows))
    payload = {"header": header, "rule_timing": rule_time, "rows": rows}
    for suffix, text in ((".md", md), (".json", json.dumps(payload, indent=1))):
        path = Path(args.out, args.name + suffix)
        path.with_suffix(".tmp").write_text(text)
        path.with_suffix(".tmp").replace(path)
    return md


if __name__ == "__main__":
    main()
