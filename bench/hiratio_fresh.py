"""A second ranking check of the hiratio curve loss model on fresh allocations (issue 6).

The ranking check of bench/hiratio_bench.py measures 10 fixed allocations (the QP's, equal, five shapes, three
random ones). This one draws ``--allocations`` new ones at the same budget (seeded, not the ranking check's
seed): smooth random profiles exp(Σ_k a_k cos(kπx)) at two amplitudes and Dirichlet draws at two
concentrations, a quarter each. The loss model is rebuilt from the probes a curve run stored in its JSON
(``--from``, no new probing: same calibration, same probe quantizer), and every allocation is measured with
the probe quantizer on the probes' own tokens and on the held-out windows. Reported: Spearman ρ of the
prediction against both, how well the probe tokens stand for the held-out data (ρ of their KLs), the model's
RMS error, and whether refitting per-layer weights lowers its cross-validated error (`reweight_cv`).

    python -m bench.hiratio_fresh --from bench/results/hiratio_curve.json
    python -m bench.hiratio_fresh --from bench/results/hiratio_curve.json --rows bench/results/hiratio_fresh.json
                                  # the analysis again on the recorded measurements (no model run)
    python -m bench.hiratio_fresh --exact-sum bench/results/hiratio_joint_study.json
                                  # joint probes against the exact sum of single-layer changes
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
from pathlib import Path

import numpy as np
import torch

from bench import foundation
from bench.hiratio_bench import at_budget, facts, layer_costs, measure_allocation

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("bench.hiratio_fresh")


def curve_model_from_probe(probe: dict, loss_model: str):
    """The QP's loss model of a curve run, from the probes its report stored (what `_qp_allocation` fits)."""
    from flexquant.alloc.qp import LossModel, fit_curve_model, project_psd

    if loss_model != "curve" or not probe.get("curve"):
        raise SystemExit("--from needs a ranking-check JSON of a run with --loss-model curve")
    L = len(probe["L1"])
    singles = [[(probe["r1"][i], probe["L1"][i]), (probe["r2"][i], probe["L2"][i])] for i in range(L)]
    for e in probe["curve"]:
        singles[e["layer"]].append((e["ratio"], e["loss"]))
    pairs = {tuple(map(int, k.split(","))): v for k, v in probe["pairs"].items()}
    raw = fit_curve_model(probe["L0"], probe["center_ratios"], singles, probe["r2"], probe["L2"], pairs)
    Qp, _ = project_psd(raw.Q)
    return LossModel(raw.a, Qp, probe["L0"], raw.center, curves=raw.curves)


def shapes(L: int, count: int, seed: int) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, L)
    out = []
    for k in range(count):
        kind = k % 4
        if kind < 2:
            amp = (0.5, 1.0)[kind]
            out.append((f"smooth {amp:g}", np.exp(sum(rng.normal(0, amp) * np.cos(j * np.pi * x) for j in (1, 2, 3)))))
        else:
            alpha = (4.0, 1.5)[kind - 2]
            out.append((f"dirichlet {alpha:g}", rng.dirichlet(np.full(L, alpha))))
    return out


def reweight_cv(model_fn, rows: list[dict], folds: int = 8) -> dict:
    """Is the model's error structured? Refit non-negative weights on the per-layer curve deviations
    (ΔL ≈ Σ_l w_l·[g_l(r_l) − g_l(c_l)], ridge toward w = 1; one weight, 3 or 5 depth groups, or one per layer)
    on the probe-token KL of the allocations, and report the k-fold cross-validated RMS error of each (the
    plain model has no fitted weights: its RMS is the reference)."""
    from scipy.optimize import lsq_linear

    from flexquant.alloc.qp import pwl

    c, L0 = model_fn.center, model_fn.L0
    D = np.array([[pwl(x, g, a["ratios"][i]) - pwl(x, g, c[i]) for i, (x, g) in enumerate(model_fn.curves)]
                  for a in rows])
    rest = np.array([model_fn(a["ratios"]) for a in rows]) - D.sum(1)  # pair couplings, kept as they are
    y = np.array([a["probe_tokens_kl"] for a in rows]) - L0 - rest
    L, fold = D.shape[1], np.arange(len(rows)) % folds
    out = {"plain model": float(np.sqrt(np.mean((D.sum(1) - y) ** 2)))}
    for name, groups in (("one weight", 1), ("3 depth groups", 3), ("5 depth groups", 5), ("one per layer", L)):
        G = np.zeros((L, groups))
        for k, ix in enumerate(np.array_split(np.arange(L), groups)):
            G[ix, k] = 1.0
        for lam in (0.01, 0.1, 1.0):
            err = []
            for f in range(folds):
                X = D[fold != f] @ G
                A = np.vstack([X, np.sqrt(lam) * np.eye(groups)])
                b = np.r_[y[fold != f], np.sqrt(lam) * np.ones(groups)]
                w = lsq_linear(A, b, bounds=(0, np.inf)).x
                err.append(D[fold == f] @ G @ w - y[fold == f])
            out[f"{name}, ridge {lam:g}"] = float(np.sqrt(np.mean(np.concatenate(err) ** 2)))
    return out


def ranking_check(path: str) -> dict:
    """The ranking check (with its probes) that a result JSON of bench/hiratio_bench.py stored."""
    if not Path(path).is_file():
        raise SystemExit(f"{path} does not exist: give a result JSON of bench/hiratio_bench.py")
    src = json.loads(Path(path).read_text()).get("spearman")
    if not src or "probe" not in src:
        raise SystemExit(f"{path} has no ranking check with probes: run bench/hiratio_bench.py (--loss-model curve "
                         "for --from, --joint-probes N for --exact-sum)")
    return src


def exact_sum_check(probe: dict) -> dict:
    """For a run with joint probes (``--joint-probes``: each layer at its centre or one of its two probe points),
    the joint loss against L0 + the exact sum of the measured single-layer changes (L1/L2 − L0 of the moved
    layers): no fitted model, so any miss is the loss's own non-additivity."""
    c, L0 = np.asarray(probe["center_ratios"]), probe["L0"]
    levels = [(np.asarray(probe["r1"]), np.asarray(probe["L1"])), (np.asarray(probe["r2"]), np.asarray(probe["L2"]))]
    pred, meas, moved = [], [], []
    for q in probe.get("joint") or []:
        r, d = np.asarray(q["ratios"]), 0.0
        for i in np.flatnonzero(np.abs(r - c) > 1e-9):
            hit = [Ls[i] for rs, Ls in levels if abs(r[i] - rs[i]) <= 1e-9]
            if not hit:
                raise SystemExit(f"joint probe moves layer {i} off its probe points: not a table check")
            d += hit[0] - L0
        pred.append(L0 + d)
        meas.append(q["loss"])
        moved.append(int(np.sum(np.abs(r - c) > 1e-9)))
    if not pred:
        raise SystemExit("the run stored no joint probes: run bench/hiratio_bench.py --joint-probes N")
    pred, meas = np.array(pred), np.array(meas)
    from flexquant.alloc.qp import spearman

    return {"joint_probes": len(pred), "mean_layers_moved": float(np.mean(moved)),
            "rms_miss": float(np.sqrt(np.mean((pred - meas) ** 2))), "mean_miss": float(np.mean(pred - meas)),
            "spread": float(meas.std()), "spearman": spearman(pred, meas)}


def method_linears(model, spec) -> list[str]:
    layers = model.get_submodule(spec.layers)
    return [f"{spec.layers}.{i}.{n}" for i in range(len(layers)) for n in spec.linears]


def measure(args, probe: dict, model_fn) -> tuple[list[dict], str]:
    """Every fresh allocation measured with the probe quantizer: held-out and probe-token KL."""
    from flexquant.alloc.qp import round_to_steps
    from flexquant.config import QuantConfig
    from flexquant.eval import reference_logprobs
    from flexquant.methods import build_method
    from flexquant.models import get_spec, load_model
    from flexquant.pipeline import prepare_model

    work = Path(args.out) / "work" / "hiratio"
    calib, windows = foundation.setup(args, work, args.windows)
    ref, _ = foundation.reference_row(args, windows)
    model, _ = load_model(args.model_dir)
    spec = get_spec(model.config.model_type)
    config = QuantConfig(model=args.model_dir, method="hiratio", nsamples=calib.shape[0], seqlen=calib.shape[1],
                         options={"bpw": 2.5, "allocation": "equal"}).replace(group_size=args.group_size)
    method = build_method(config)
    fp = {n: model.get_submodule(n).weight.data for n in method_linears(model, spec)}
    # statistics and step tables only: no probes
    prepare_model(model, spec, method, calib, torch.device("cpu"), config.batch_size)
    tables = method.ratio_plan.tables
    centre = method.ratio_plan.ratios(facts(method)["allocation"]["steps"]).tolist()
    if not np.allclose(centre, probe["center_ratios"]):
        raise SystemExit(f"{args.src} was probed around another centre (other calibration or budget)")
    bud, h = facts(method)["budget"], method.options
    cost = layer_costs(method)
    probe_ids = calib[: h.probe_nsamples, : h.probe_seqlen]
    if probe_ids.numel() != probe["tokens"]:
        raise SystemExit(f"{args.src} probed {probe['tokens']} tokens; the default probe set has {probe_ids.numel()}")
    probe_ref = reference_logprobs(model, probe_ids, progress=False)
    win, refs = windows[: args.windows], ref[: args.windows]
    rows = []
    for name, w in shapes(len(tables), args.allocations, args.seed):
        r = at_budget(w, cost, bud["ratio_budget_bits"], h.r_max)
        steps = round_to_steps(r, tables, bud["ratio_budget_bits"], None, h.r_max)
        row = measure_allocation(model, method, fp, steps, win, refs, probe_ids, probe_ref)
        rows.append({"allocation": name, **row, "predicted_kl": model_fn.L0 + model_fn(row["ratios"])})
        log.info("%d/%d %-12s predicted %.4f held-out %.4f probe tokens %.4f", len(rows), args.allocations, name,
                 rows[-1]["predicted_kl"], rows[-1]["measured_kl"], rows[-1]["probe_tokens_kl"])
    where = (f"held-out KL on {win.shape[0]} windows × 2048 tokens, probe-token KL on the {probe_ids.numel()} "
             f"probe tokens; {dt.date.today()}, {platform.machine()} with {os.cpu_count()} cores, "
             f"torch {torch.__version__}")
    return rows, where


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="src", help="ranking-check JSON of a --loss-model curve run")
    p.add_argument("--exact-sum", default=None, metavar="JSON",
                   help="instead: the additivity check of a run with joint probes (e.g. hiratio_joint_study.json)")
    p.add_argument("--allocations", type=int, default=40)
    p.add_argument("--seed", type=int, default=1, help="seed of the fresh allocations (the ranking check uses 0)")
    p.add_argument("--windows", type=int, default=8, help="held-out windows of 2048 tokens")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--out", default=str(ROOT / "bench/results"))
    p.add_argument("--name", default="hiratio_fresh")
    p.add_argument("--rows", default=None, help="a result JSON of this script: analyse its recorded measurements again")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from flexquant.alloc.qp import spearman

    if not (args.src or args.exact_sum):
        p.error("give --from (or --exact-sum)")
    if args.exact_sum:
        print(json.dumps(exact_sum_check(ranking_check(args.exact_sum)["probe"]), indent=1))
        return
    if args.rows and not Path(args.rows).is_file():
        raise SystemExit(f"{args.rows} does not exist: give a result JSON of this script (--rows)")
    src = ranking_check(args.src)
    probe = src["probe"]
    model_fn = curve_model_from_probe(probe, src.get("loss_model"))
    if args.rows:  # re-analyse recorded measurements
        done = json.loads(Path(args.rows).read_text())
        rows, where = done["rows"], done["where"]
    else:
        rows, where = measure(args, probe, model_fn)
    pred, held, tok = (np.array([a[k] for a in rows]) for k in ("predicted_kl", "measured_kl", "probe_tokens_kl"))
    summary = {"allocations": len(rows), "spearman_held_out": spearman(pred, held),
               "spearman_probe_tokens": spearman(pred, tok), "spearman_probe_tokens_vs_held_out": spearman(tok, held),
               "rms_error_probe_tokens": float(np.sqrt(np.mean((pred - tok) ** 2))),
               "measured_spread_probe_tokens": float(tok.std())}
    summary["cv_rms_error_of_refits"] = reweight_cv(model_fn, rows)
    header = (f"smollm2-135m, hiratio curve loss model of `{Path(args.src).name}` on {len(rows)} fresh allocations "
              f"(seed {args.seed}) at the same 2.5 bpw budget; probe quantizer, fake-quantized; {where}")
    lines = [header, "", "| measure | value |", "|---|---|"]
    lines += [f"| {k.replace('_', ' ')} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |"
              for k, v in summary.items() if not isinstance(v, dict)]
    lines += ["", f"Refits of per-layer weights on the curve terms ({len(rows)} allocations' probe-token KL, 8-fold "
              "cross-validated RMS error; lower than the plain model's would mean a structured error):", "",
              "| model | CV RMS error |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in summary["cv_rms_error_of_refits"].items()]
    lines += ["", "| allocation | bpw | predicted KL | held-out KL | held-out ppl | probe-token KL |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {a['allocation']} | {a['bpw']:.4f} | {a['predicted_kl']:.4f} | {a['measured_kl']:.4f} "
              f"| {a['measured_ppl']:.3f} | {a['probe_tokens_kl']:.4f} |" for a in rows]
    md = "\n".join(lines) + "\n"
    record = {"header": header, "where": where, "summary": summary, "rows": rows}
    for suffix, text in ((".md", md), (".json", json.dumps(record, indent=1))):
        path = Path(args.out, args.name + suffix)
        path.with_suffix(".tmp").write_text(text)
        path.with_suffix(".tmp").replace(path)
    print(md)


if __name__ == "__main__":
    main()
