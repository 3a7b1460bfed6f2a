"""Offline benchmark of image-classifier PTQ: block reconstruction with and without the meta step.

Trains a small ResNet on scikit-learn's digits (8×8 upsampled to 16×16, 1 channel), then quantizes it
at W2A4 and W4A4 with plain reconstruction (AdaRound + LSQ + QDrop) and with the meta-learning step,
over several seeds (the seed also draws the calibration images). Reports mean ± std top-1 and time
as Markdown and JSON.

Splits are fixed: train (FP training and calibration), val (for choosing hyper-parameters) and test
(reported). Use ``--eval-split val`` while tuning; the default reports the test split.

    python -m bench.vision_bench                      # full run (5 seeds), ~10 min on one core
    python -m bench.vision_bench --seeds 0 --bits 2   # quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flexquant.vision import VisionQuantConfig, evaluate_top1, quantize_classifier
from flexquant.vision.models import TinyResNet

log = logging.getLogger("vision_bench")


def load_digits_splits(size: int = 16, seed: int = 1234) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Digits as [N, 1, size, size] standardised tensors in fixed train/val/test splits."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("this benchmark needs scikit-learn (pip install scikit-learn); its digits set ships inside it")
    d = load_digits()
    X = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    X = F.interpolate(X, size=(size, size), mode="bilinear", align_corners=False)
    X = (X - X.mean()) / X.std()
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    idx = {"train": perm[:1100], "val": perm[1100:1400], "test": perm[1400:]}
    return {k: (X[v], y[v]) for k, v in idx.items()}


def train_fp(train: tuple[torch.Tensor, torch.Tensor], epochs: int, seed: int = 0) -> torch.nn.Module:
    """Train the FP TinyResNet with Adam and small random shifts."""
    torch.manual_seed(seed)
    # narrow on purpose: at 2 bits it loses a few points, so methods can be told apart
    model = TinyResNet(num_classes=10, in_channels=1, widths=(8, 16, 32))
    X, y = train
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * ((len(X) + 63) // 64))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(X))
        for i in range(0, len(X), 64):
            xb, yb = X[perm[i : i + 64]], y[perm[i : i + 64]]
            dx, dy = torch.randint(-1, 2, (2,)).tolist()
            xb = torch.roll(xb, shifts=(dx, dy), dims=(2, 3))
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def parse_overrides(items: list[str]) -> dict:
    """key=value pairs for VisionQuantConfig fields (numbers parsed as JSON)."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 4], help="weight bits to run (activations: --a-bits)")
    ap.add_argument("--a-bits", type=int, default=4)
    ap.add_argument("--methods", nargs="+", default=["plain", "meta"], choices=["plain", "meta"])
    # a small calibration set: the regime the meta step (a learned augmentation) is meant for
    ap.add_argument("--calib-size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=500, help="reconstruction steps per block")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--eval-split", choices=["val", "test"], default="test")
    ap.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="VisionQuantConfig overrides (both methods)"
    )
    ap.add_argument("--meta-set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for the meta method only")
    ap.add_argument("--out", default="bench/results/vision", help="output prefix for .md and .json")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("flexquant").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    splits = load_digits_splits()
    t0 = time.perf_counter()
    model = train_fp(splits["train"], args.epochs)
    train_s = time.perf_counter() - t0
    ev = splits[args.eval_split]
    fp_top1 = evaluate_top1(model, ev)
    log.info("FP model: %s top-1 %.4f (trained in %.1f s)", args.eval_split, fp_top1, train_s)

    common, meta_only = parse_overrides(args.set), parse_overrides(args.meta_set)
    runs = []
    for w_bits in args.bits:
        for method in args.methods:
            for seed in args.seeds:
                fields = {**common, **(meta_only if method == "meta" else {})}
                fields.setdefault("iters", args.iters)
                cfg = VisionQuantConfig(w_bits=w_bits, a_bits=args.a_bits, meta=method == "meta", seed=seed, **fields)
                # the seed also draws the calibration images from the training split
                g = torch.Generator().manual_seed(seed)
                calib = splits["train"][0][torch.randperm(len(splits["train"][0]), generator=g)[: args.calib_size]]
                t0 = time.perf_counter()
                qmodel = quantize_classifier(model, calib, cfg, progress=False)
                secs = time.perf_counter() - t0
                top1 = evaluate_top1(qmodel, ev)
                runs.append(
                    {
                        "w_bits": w_bits,
                        "a_bits": args.a_bits,
                        "method": method,
                        "seed": seed,
                        "top1": top1,
                        "seconds": secs,
                    }
                )
                log.info("W%dA%d %-5s seed %d: top-1 %.4f  (%.1f s)", w_bits, args.a_bits, method, seed, top1, secs)

    rows = []
    for w_bits in args.bits:
        for method in args.methods:
            sel = [r for r in runs if r["w_bits"] == w_bits and r["method"] == method]
            m, s = mean_std([r["top1"] for r in sel])
            tm, _ = mean_std([r["seconds"] for r in sel])
            rows.append(
                {
                    "setting": f"W{w_bits}A{args.a_bits}",
                    "method": method,
                    "top1_mean": m,
                    "top1_std": s,
                    "seconds_mean": tm,
                    "n": len(sel),
                }
            )
    verdicts = {}
    for w_bits in args.bits:
        by = {r["method"]: r for r in rows if r["setting"] == f"W{w_bits}A{args.a_bits}"}
        if "plain" in by and "meta" in by:
            gap = by["meta"]["top1_mean"] - by["plain"]["top1_mean"]
            std = max(by["meta"]["top1_std"], by["plain"]["top1_std"])
            # same seed = same calibration images for both methods, so per-seed differences are paired
            top1 = {(r["method"], r["seed"]): r["top1"] for r in runs if r["w_bits"] == w_bits}
            diffs = [top1[("meta", s)] - top1[("plain", s)] for s in args.seeds]
            d_mean, d_std = mean_std(diffs)
            verdicts[f"W{w_bits}A{args.a_bits}"] = {
                "meta_minus_plain": gap,
                "larger_std": std,
                "meta_wins_by_1std": gap > std,
                "paired_diff_mean": d_mean,
                "paired_diff_std": d_std,
                "meta_wins_seeds": sum(d > 0 for d in diffs),
                "ties": sum(d == 0 for d in diffs),
            }

    total_s = time.perf_counter() - t_start
    lines = [
        f"Digits (8×8 → 16×16), TinyResNet widths (8, 16, 32), {args.calib_size} calibration images, "
        f"{args.iters} reconstruction steps per block, overrides {common or 'none'} / meta {meta_only or 'none'}, "
        f"seeds {args.seeds}, "
        f"top-1 on the {args.eval_split} split ({len(ev[1])} images); FP top-1 {100 * fp_top1:.2f}%.",
        "",
        "| setting | method | top-1 % (mean ± std) | quantization time s (mean) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['method']} | {100 * r['top1_mean']:.2f} ± {100 * r['top1_std']:.2f} "
            f"| {r['seconds_mean']:.1f} |"
        )
    lines.append("")
    for k, v in verdicts.items():
        lines.append(
            f"- {k}: meta − plain = {100 * v['meta_minus_plain']:+.2f} points; larger std "
            f"{100 * v['larger_std']:.2f}; meta wins by more than one std: {v['meta_wins_by_1std']}; "
            f"paired (same calibration images) meta − plain {100 * v['paired_diff_mean']:+.2f} ± "
            f"{100 * v['paired_diff_std']:.2f}, meta better on {v['meta_wins_seeds']}/{len(args.seeds)} seeds "
            f"({v['ties']} ties)"
        )
    lines.append(
        f"- total benchmark time {total_s:.0f} s ({args.threads} thread(s), "
        f"{platform.processor() or platform.machine()})"
    )
    table = "\n".join(lines)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table + "\n")
    result = {
        "fp_top1": fp_top1,
        "eval_split": args.eval_split,
        "seeds": args.seeds,
        "overrides": common,
        "meta_overrides": meta_only,
        "rows": rows,
        "runs": runs,
        "verdicts": verdicts,
        "total_seconds": total_s,
        "train_seconds": train_s,
        "torch": torch.__version__,
    }
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    sys.stdout.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
