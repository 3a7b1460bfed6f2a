"""Layer-wise high-impact ratio benchmark (METHODS.md §2, issue 6) on smollm2-135m (or ``--model gemma3-270m``),
baselines in the same run.

Rows (same calibration windows, same held-out evaluation windows, same full-precision reference):
- full precision; flexquant GPTQ at the nearest uniform bits (w2g64); llm-compressor GPTQ w2g64 (peer);
- hiratio with the QP allocation (default settings) and its options (learnable quantizer: clipping,
  rounding, or plain GPTQ at b_hi; impact score: salience or obs);
- the baselines at the same budget: one equal ratio for every layer, and fp16 retention (OWQ-style:
  the equal ratio of columns kept in fp16).
Then the ranking check: the QP's predicted loss against the measured KL (probe quantizer, fake-quantized,
held-out windows) for ≥ 8 allocations at the same budget, with the Spearman correlation.

    python -m bench.hiratio_bench                   # everything (resumes finished rows from the cache)
    python -m bench.hiratio_bench --peers ''        # without llm-compressor
    python -m bench.hiratio_bench --skip-spearman   # quantization rows only

Quantizations run as subprocesses of bench/foundation.py's job entry (own wall time and peak memory);
evaluation uses bench/foundation.py's functions on the same windows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from bench import foundation  # reference, evaluation, peers and the quantization job

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("bench.hiratio")


def run_flexquant(label: str, method: str, bits: int, options: dict, args, work: Path) -> dict:
    """One flexquant quantization through foundation.py's job entry (a subprocess), or the finished one."""
    out = work / label
    t0 = time.perf_counter()
    proc = foundation.flexquant_job(out, method, bits, options, args, work)
    if proc.returncode != 0:
        log.error("%s failed:\n%s", label, proc.stderr[-3000:])
        return {"kind": "flexquant", "label": label, "method": method, "bits": bits, "options": options,
                "error": proc.stderr.strip().splitlines()[-1:]}
    rep = json.loads((out / "report.json").read_text())
    row = {"kind": "flexquant", "label": label, "method": method, "bits": bits, "options": options, "path": str(out),
           "job_wall_seconds": time.perf_counter() - t0, "bpw": rep["summary"]["bpw"],
           "quant_seconds": rep["summary"]["quant_seconds"], "peak_rss_mb": rep["summary"]["peak_rss_mb"]}
    facts = (rep.get("method") or {}).get("hiratio")
    if facts:
        qp = facts.get("qp") or {}
        row["hiratio"] = {"ratios": facts["allocation"]["ratios"], "planned_bpw": facts["allocation"]["planned_bpw"],
                          "predicted_kl": qp.get("predicted_kl"), "measured_probe_kl": qp.get("measured_probe_kl"),
                          "probe_cost": (facts.get("probe") or {}).get("cost"),
                          "stats_seconds": facts["budget"]["stats_seconds"],
                          "learn_kept": [b["learn"]["kept"] for b in rep["blocks"] if "learn" in b]}
    return row


def qp_options(args) -> dict:
    """Options of the QP row and of the ranking check: the budget and the trust region (always explicit, so
    a cached row is never reused under a changed default)."""
    from flexquant.methods.hiratio import HiRatioConfig

    opts = {"bpw": args.bpw, "trust": HiRatioConfig().trust if args.trust is None else args.trust}
    if args.joint_probes is not None:
        opts["joint_probes"] = args.joint_probes
    if args.loss_model is not None:
        opts["loss_model"] = args.loss_model
    for k in ("probe_nsamples", "probe_seqlen"):
        if getattr(args, k) is not None:
            opts[k] = getattr(args, k)
    return opts


def layer_costs(method) -> np.ndarray:
    """Extra stored bits per unit of ratio, per layer (what the budget constraint of the QP charges)."""
    return np.array([t.bits[-1] / t.weights[-1] * t.total for t in method.ratio_plan.tables])


def facts(method) -> dict:
    """The method's run-report facts (budget, probes, QP, allocation)."""
    return method.summary()["hiratio"]


def predicted_kl(method, steps: list[int]) -> float:
    """The QP loss model's KL for an allocation (steps per layer)."""
    model = method.loss_model
    return model.L0 + model(method.ratio_plan.ratios(steps))


def measure_allocation(model, method, fp: dict, steps: list[int], windows, refs, probe_ids, probe_ref) -> dict:
    """An allocation (steps per layer) under the probe quantizer, fake-quantized: KL and perplexity on the held-out
    windows, KL on the probe tokens, its stored bpw; the full-precision weights ``fp`` are put back after."""
    from flexquant.eval import evaluate_windows

    t0 = time.perf_counter()
    try:
        for n, w in method.prober.weights(steps).items():
            model.get_submodule(n).weight.data = w
        res = evaluate_windows(model, windows, refs, progress=False)
        on_probe = evaluate_windows(model, probe_ids, probe_ref, progress=False)
    finally:
        for n, w in fp.items():
            model.get_submodule(n).weight.data = w
    used = method.ratio_plan.bits(steps)
    bud = facts(method)["budget"]
    return {"ratios": method.ratio_plan.ratios(steps).tolist(), "ratio_bits": used,
            "bpw": (bud["low_bits"] + used) / bud["weights"], "measured_kl": res["kl_divergence"],
            "measured_ppl": res["perplexity"], "probe_tokens_kl": on_probe["kl_divergence"],
            "seconds": time.perf_counter() - t0}


def at_budget(w: np.ndarray, cost: np.ndarray, bits: float, r_max: float) -> np.ndarray:
    """Ratios proportional to the shape ``w`` that spend ``bits`` (cost = bits per unit ratio per layer),
    clipped at r_max with the excess handed to the other layers in proportion to w."""
    r = w / (cost @ w) * bits
    for _ in range(50):
        r = np.minimum(r, r_max)
        left = bits - cost @ r
        free = r < r_max - 1e-12
        if left <= 1 or not free.any():
            break
        r[free] += left * w[free] / (cost[free] @ w[free])
    return r


def candidate_ratios(method, count: int, seed: int, full_range: bool = False) -> list[tuple[str, np.ndarray]]:
    """Allocations at the same ratio budget: the QP's, equal, shaped ones and random ones.

    By default every allocation lies in the QP's feasible set (its bounds, e.g. the trust region): a shape's
    allocation r_w is pulled toward the equal allocation c, r = c + λ(r_w − c) with the largest λ ≤ 1 that keeps
    the bounds (both spend the budget exactly, so every r does). ``full_range``: within [0, r_max] only."""
    L = len(method.ratio_plan.tables)
    budget = facts(method)["budget"]
    cost = layer_costs(method)
    r_max = method.options.r_max
    c = np.full(L, budget["equal_ratio"])
    qp = facts(method)["qp"]
    lower, upper = ((np.zeros(L), np.full(L, r_max)) if full_range or "lower" not in qp
                    else (np.array(qp["lower"]), np.array(qp["upper"])))
    x = np.linspace(0, 1, L)
    shapes = [("front-loaded", 1.5 - x), ("back-loaded", 0.5 + x), ("middle", 1 - np.abs(x - 0.5)),
              ("ends", 0.2 + np.abs(x - 0.5)), ("alternating", 1 + 0.8 * (-1) ** np.arange(L))]
    rng = np.random.default_rng(seed)
    while len(shapes) < count - 2:
        shapes.append((f"random {len(shapes) - 4}", rng.dirichlet(np.full(L, 0.7))))
    out = [("qp", np.array(facts(method)["allocation"]["ratios"])), ("equal", c)]
    for name, w in shapes[: count - 2]:
        d = at_budget(w, cost, budget["ratio_budget_bits"], r_max) - c
        with np.errstate(divide="ignore", invalid="ignore"):
            room = np.where(d > 0, (upper - c) / d, np.where(d < 0, (lower - c) / d, np.inf))
        out.append((name, c + min(1.0, float(room.min())) * d))
    return out


def spearman_check(args, work: Path, windows: torch.Tensor, ref) -> dict:
    """QP-predicted vs measured KL over several allocations at the same budget (probe quantizer)."""
    from safetensors.torch import load_file

    from flexquant.alloc.qp import round_to_steps, spearman
    from flexquant.config import QuantConfig
    from flexquant.eval import reference_logprobs
    from flexquant.methods import build_method
    from flexquant.models import get_spec, load_model
    from flexquant.pipeline import prepare_model

    calib = load_file(work / "calib.safetensors")["input_ids"]
    model, _ = load_model(args.model_dir)
    spec = get_spec(model.config.model_type)
    config = QuantConfig(model=args.model_dir, method="hiratio", nsamples=calib.shape[0], seqlen=calib.shape[1],
                         options=qp_options(args)).replace(group_size=args.group_size)
    method = build_method(config)
    method.keep_prober = True  # other allocations are measured with it after the plan
    t0 = time.perf_counter()
    prepare_model(model, spec, method, calib, torch.device("cpu"), config.batch_size)
    prepare_seconds = time.perf_counter() - t0
    fp = {n: model.get_submodule(n).weight.data for blk in method.ratio_plan.blocks for n in blk}
    win = windows[: args.spearman_windows]
    refs = ref[: args.spearman_windows]
    # The probes' own tokens too: does the loss model rank allocations on the data it was fitted to?
    h = method.options
    probe_ids = calib[: h.probe_nsamples, : h.probe_seqlen]
    probe_ref = reference_logprobs(model, probe_ids, progress=False)
    extra = facts(method)["budget"]["ratio_budget_bits"]
    rows = []
    for name, r in candidate_ratios(method, args.allocations, seed=0, full_range=args.full_range):
        steps = (facts(method)["allocation"]["steps"] if name == "qp"
                 else round_to_steps(r, method.ratio_plan.tables, extra, None, h.r_max))
        row = measure_allocation(model, method, fp, steps, win, refs, probe_ids, probe_ref)
        rows.append({"allocation": name, **row, "predicted_kl": predicted_kl(method, steps)})
        log.info("allocation %-14s predicted %.4f measured %.4f (bpw %.4f)", name, rows[-1]["predicted_kl"],
                 rows[-1]["measured_kl"], rows[-1]["bpw"])
    rho = spearman([r["predicted_kl"] for r in rows], [r["measured_kl"] for r in rows])
    rho_probe = spearman([r["predicted_kl"] for r in rows], [r["probe_tokens_kl"] for r in rows])
    return {"spearman": rho, "spearman_probe_tokens": rho_probe, "probe_tokens": int(probe_ids.numel()),
            "full_range": args.full_range, "loss_model": h.loss_model,
            "allocations": rows, "windows": int(win.shape[0]), "prepare_seconds": prepare_seconds,
            "probe": facts(method)["probe"], "qp": {k: facts(method)["qp"][k] for k in
                                                ("backend", "objective", "budget_used", "psd_projection",
                                                 "predicted_kl", "measured_probe_kl")}}


def plots(args, rows: list[dict], spear: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = Path(args.out)
    main_row = next((r for r in reversed(rows) if str(r.get("label")).startswith("hiratio-qp") and "path" in r), None)
    if main_row and (Path(main_row["path"]) / "report_hiratio.png").is_file():
        shutil.copy(Path(main_row["path"]) / "report_hiratio.png", res / f"{args.name}_report.png")
    fig, ax = plt.subplots(1, 2 if spear else 1, figsize=(14 if spear else 7, 4.5), squeeze=False)
    ax = ax[0]
    for r in rows:
        if "hiratio" in r and "learner" not in r["label"]:
            main = r["label"].startswith("hiratio-qp") and "obs" not in r["label"]
            ax[0].plot(r["hiratio"]["ratios"], "o-" if main else ".--", label=r["label"])
    ax[0].set_xlabel("decoder layer")
    ax[0].set_ylabel("high-impact ratio (stored)")
    ax[0].set_title(f"ratio per layer at {args.bpw} bpw")
    ax[0].legend()
    if spear:
        p = [a["predicted_kl"] for a in spear["allocations"]]
        m = [a["measured_kl"] for a in spear["allocations"]]
        ax[1].plot(p, m, "o")
        for a in spear["allocations"]:
            ax[1].annotate(a["allocation"], (a["predicted_kl"], a["measured_kl"]), fontsize=7)
        ax[1].set_xlabel("QP-predicted KL (probe subset)")
        ax[1].set_ylabel(f"measured KL ({spear['windows']} held-out windows)")
        ax[1].set_title(f"{len(p)} allocations, Spearman ρ = {spear['spearman']:.3f}")
    fig.tight_layout()
    fig.savefig(res / f"{args.name}.png", dpi=100)
    plt.close(fig)


def write(args, header: str, rows: list[dict], spear: dict | None) -> str:
    lines = [header, "", "| variant | bpw (stored) | perplexity | KL to FP | QP-predicted KL (probe) | quant time (s) "
             "| probe cost | peak RSS (MiB) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r.get("label") or r["method"]
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | | |")
            continue
        h = r.get("hiratio") or {}
        pred = f"{h['predicted_kl']:.4f}" if h.get("predicted_kl") is not None else "—"
        pc = h.get("probe_cost")
        probe = f"{pc['probes']} probes, {pc['total_seconds']:.0f} s" if pc else "—"
        t = f"{r['quant_seconds']:.0f}" if r.get("quant_seconds") is not None else "—"
        mem = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") is not None else "—"
        lines.append(f"| {name} | {r['bpw']:.3f} | {r['perplexity']:.3f} | {r['kl_divergence']:.4f} | {pred} | {t} "
                     f"| {probe} | {mem} |")
    if spear:
        where = ("anywhere in [0, r_max]" if spear.get("full_range", True)
                 else "in the QP's feasible set [0, r_max] (curve loss model: no trust region)"
                 if spear.get("loss_model") == "curve" else "in the QP's feasible set (its trust region)")
        lines += ["", f"Ranking check: {len(spear['allocations'])} allocations at the same budget {where}, "
                  "probe quantizer (GPTQ against full-precision Hessians), fake-quantized, KL on "
                  f"{spear['windows']} held-out windows × 2048 tokens. "
                  f"**Spearman ρ(predicted, measured) = {spear['spearman']:.3f}**."]
        if "spearman_probe_tokens" in spear:
            lines[-1] += (f" On the probes' own {spear['probe_tokens']} calibration tokens (the data the loss model "
                          f"was fitted to): ρ = {spear['spearman_probe_tokens']:.3f}.")
        lines += ["", "| allocation | bpw | QP-predicted KL | measured KL | measured ppl | KL on probe tokens |",
                  "|---|---|---|---|---|---|"]
        for a in spear["allocations"]:
            pt = f"{a['probe_tokens_kl']:.4f}" if "probe_tokens_kl" in a else "—"
            lines.append(f"| {a['allocation']} | {a['bpw']:.4f} | {a['predicted_kl']:.4f} | {a['measured_kl']:.4f} "
                         f"| {a['measured_ppl']:.3f} | {pt} |")
    md = "\n".join(lines) + "\n"
    for suffix, text in ((".md", md), (".json", json.dumps({"header": header, "rows": rows, "spearman": spear},
                                                           indent=1))):
        path = Path(args.out, args.name + suffix)
        path.with_suffix(".tmp").write_text(text)
        path.with_suffix(".tmp").replace(path)
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="built-in model name (smollm2-135m, gemma3-270m) or folder")
    p.add_argument("--bpw", type=float, default=2.5)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=8, help="evaluation windows of 2048 tokens")
    p.add_argument("--peers", default="llmc-gptq", help="peer methods at 2 bits ('' for none)")
    p.add_argument("--variants", default="qp,round,gptq-hi,obs,equal,fp16,gptq-w2",
                   help="rows to run (comma list): qp (default settings), round, gptq-hi, clip, obs, equal, fp16, "
                        "gptq-w2")
    p.add_argument("--learner", default=None, help="learner of the equal-ratio baseline (default: the default's)")
    p.add_argument("--joint-probes", type=int, default=None,
                   help="joint probes of the loss-model refit for the qp row and the ranking check (default: "
                        "the method's default, not written into the cache key)")
    p.add_argument("--loss-model", default=None, choices=("quadratic", "curve"),
                   help="QP loss model of the qp row and the ranking check (default: the method's default)")
    p.add_argument("--probe-nsamples", type=int, default=None, help="probe windows (default: the method's)")
    p.add_argument("--probe-seqlen", type=int, default=None, help="tokens per probe window (default: the method's)")
    p.add_argument("--trust", type=float, default=None,
                   help="QP trust region for the qp row and the ranking check (default: the method's default)")
    p.add_argument("--allocations", type=int, default=10, help="allocations in the ranking check (>= 8)")
    p.add_argument("--spearman-windows", type=int, default=8, help="held-out windows the allocations are measured on")
    p.add_argument("--full-range", action="store_true",
                   help="ranking allocations anywhere in [0, r_max] instead of in the QP's feasible set")
    p.add_argument("--ratios-from", default=None,
                   help="a ranking-check JSON: also quantize with its QP allocation as fixed ratios (no probing)")
    p.add_argument("--skip-spearman", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench/results"))
    p.add_argument("--name", default="hiratio")
    p.add_argument("--fresh", action="store_true", help="ignore finished rows in the work folder's hiratio/rows.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from flexquant.methods.hiratio import HiRatioConfig

    work = foundation.work_dir(args) / "hiratio"
    calib, windows = foundation.setup(args, work, args.windows)
    cache = foundation.RowCache(work, args.fresh)
    setting = f"calib{args.nsamples}x{args.seqlen}-eval{windows.shape[0]}-g{args.group_size}"
    ref, fp_row = foundation.reference_row(args, windows)
    rows = [fp_row]
    header = (f"{args.model}, {args.bpw} bpw budget (honest: codes + scales + zeros + bit maps + permutations), "
              f"b_lo = 2; calibration {args.nsamples}×{args.seqlen} tokens of the pydoc calibration split, evaluation "
              f"{windows.shape[0]} windows × 2048 tokens of the held-out split; group size {args.group_size}; "
              f"{dt.date.today()}, {platform.machine()} with {os.cpu_count()} cores, torch {torch.__version__}")
    default = HiRatioConfig()

    def run(label: str, method: str, bits: int, options: dict | None = None, peer: bool = False) -> dict:
        key = f"{setting}:{label}:{method}:{bits}:{json.dumps(options or {}, sort_keys=True)}"
        row = cache.get(key)
        if row is not None:
            log.info("reusing %s", label)
        else:
            if peer:
                row = foundation.run_quantization("peer", method, bits, args, work, None)
                row["label"] = f"llm-compressor {method} w{bits}g{args.group_size}"
            else:
                row = run_flexquant(label, method, bits, options or {}, args, work)
            foundation.evaluate_row(row, windows, ref)
            if "error" not in row:
                cache.put(key, row)
        rows.append(row)
        write(args, header, rows, None)
        return row

    wanted = [v for v in args.variants.split(",") if v]
    bpw = {"bpw": args.bpw}
    if "gptq-w2" in wanted:
        run(f"flexquant gptq w2g{args.group_size} (nearest uniform bits)", "gptq", 2)
    for peer in filter(None, args.peers.split(",")):
        run(peer, peer, 2, peer=True)
    qp_label = ("hiratio-qp" + ("" if args.trust is None else f" trust={args.trust:g}")
                + ("" if args.joint_probes is None else f" joint={args.joint_probes}")
                + ("" if args.loss_model is None else f" loss_model={args.loss_model}")
                + "".join(f" {k}={getattr(args, k)}" for k in ("probe_nsamples", "probe_seqlen")
                          if getattr(args, k) is not None))
    main_row = run(qp_label, "hiratio", 2, qp_options(args)) if "qp" in wanted else None
    fixed = {}
    if main_row and "hiratio" in main_row:  # learner variants reuse the QP's allocation (no second probing)
        fixed = {**bpw, "ratios": main_row["hiratio"]["ratios"]}
    for v, learner in (("clip", "clip"), ("round", "round"), ("gptq-hi", "gptq")):
        if v in wanted and learner != default.learner and fixed:
            run(f"hiratio-qp learner={learner}", "hiratio", 2, {**fixed, "learner": learner})
    if "obs" in wanted:
        run("hiratio-qp-obs", "hiratio", 2, {**bpw, "impact": "obs"})
    if args.ratios_from:  # another run's QP allocation, fixed (its probe cost is in that run's report)
        src = json.loads(Path(args.ratios_from).read_text())["spearman"]
        qp_alloc = next(a for a in src["allocations"] if a["allocation"] == "qp")
        run(f"hiratio QP ratios of {Path(args.ratios_from).stem} (fixed)", "hiratio", 2,
            {**bpw, "ratios": qp_alloc["ratios"]})
    learner = args.learner or default.learner
    if "equal" in wanted:
        run("equal-ratio", "hiratio", 2, {**bpw, "allocation": "equal", "learner": learner})
    if "fp16" in wanted:
        run("fp16-retention", "hiratio", 2, {**bpw, "allocation": "equal", "b_hi": 16, "learner": "gptq"})
    spear = None
    if not args.skip_spearman:
        spear = spearman_check(args, work, windows, ref)
    plots(args, rows, spear)
    print(write(args, header, rows, spear))


if __name__ == "__main__":
    main()
