"""Mixture-of-experts calibration, measured both ways: ``--moe-calibration routed`` (each expert's Hessian from the
tokens the router sends it, weighted by routing weight) against ``all`` (every token through every expert).

No real MoE model is available offline, so the models are random tiny Mixtral / Qwen3-MoE / Qwen2-MoE configs built
in code (heavy-tailed weights; byte tokenizer), saved as folders; each is quantized with GPTQ at 3 and 4 bits both
ways through the public API, and the KL divergence to its own full-precision model is measured on the same held-out
pydoc windows in the same run. Means ± sd over model seeds.

``python -m bench.moe [--seeds 3] [--out bench/results] [--name moe]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import flexquant as fq

HIDDEN, LAYERS, EXPERTS, TOP_K = 128, 4, 8, 2
FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe")
CALIB = dict(nsamples=32, seqlen=256, batch_size=8)
EVAL = dict(text="pydoc", seqlen=256, windows=8)


def build(family: str, seed: int):
    import transformers as t

    common = dict(vocab_size=258, hidden_size=HIDDEN, intermediate_size=256, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=LAYERS, num_experts_per_tok=TOP_K,
                  max_position_embeddings=4096, bos_token_id=256, eos_token_id=257, pad_token_id=257)
    if family == "mixtral":
        cfg = t.MixtralConfig(**common, num_local_experts=EXPERTS)
    elif family == "qwen3_moe":
        cfg = t.Qwen3MoeConfig(**common, num_experts=EXPERTS, moe_intermediate_size=128, head_dim=32)
    else:
        cfg = t.Qwen2MoeConfig(**common, num_experts=EXPERTS, moe_intermediate_size=128,
                               shared_expert_intermediate_size=256)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = t.AutoModelForCausalLM.from_config(cfg)
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.data = torch.randn_like(p) * (0.7 / p.shape[-1] ** 0.5)
                p.data[..., : p.shape[-1] // 16] *= 4.0  # a few strong input channels, as trained models have
    return model.float().eval()


def main(argv: list[str] | None = None) -> int:
    from flexquant.models.builtin import tiny_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--name", default="moe")
    args = ap.parse_args(argv)
    t0, rows = time.time(), []
    with tempfile.TemporaryDirectory(prefix="flexquant-moe-") as tmp:
        for family in FAMILIES:
            for seed in range(args.seeds):
                folder = Path(tmp) / f"{family}-{seed}"
                build(family, seed).save_pretrained(folder)
                tiny_tokenizer().save_pretrained(folder)
                for bits in (3, 4):
                    for mode in ("routed", "all"):
                        qm = fq.quantize(str(folder), method="gptq", bits=bits, group_size=32, moe_calibration=mode,
                                         progress=False, **CALIB)
                        ev = fq.evaluate(qm, reference=str(folder), progress=False, **EVAL)
                        under = len(qm.report["experts"]["under_sampled"])
                        rows.append(dict(family=family, seed=seed, bits=bits, mode=mode, kl=ev["kl_divergence"],
                                         ppl=ev["perplexity"], bpw=qm.bpw, under_sampled=under))
                        print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"rows": rows, "seconds": time.time() - t0}, indent=2))
    (args.out / f"{args.name}.md").write_text(report(rows, args, time.time() - t0))
    return 0


def report(rows: list[dict], args, seconds: float) -> str:
    def ms(v):
        return f"{statistics.mean(v):.4f} ± {statistics.stdev(v):.4f}" if len(v) > 1 else f"{v[0]:.4f}"

    out = [f"# MoE calibration: routed vs all ({args.seeds} seeds)", "",
           f"`python -m bench.moe --seeds {args.seeds}` · flexquant {fq.__version__} · "
           f"{time.strftime('%Y-%m-%d %H:%M')} · {seconds:.0f} s", "",
           f"Random tiny models ({LAYERS} blocks, hidden {HIDDEN}, {EXPERTS} experts, top-{TOP_K}), GPTQ g32, "
           f"calibration {CALIB['nsamples']}×{CALIB['seqlen']} pydoc tokens; KL to the model's own FP on "
           f"{EVAL['windows']} held-out windows of {EVAL['seqlen']} (lower is better).", "",
           "| family | bits | KL routed | KL all | all/routed | under-sampled expert linears (routed) |",
           "|---|---|---|---|---|---|"]
    for family in FAMILIES:
        for bits in (3, 4):
            sel = {m: [r for r in rows if r["family"] == family and r["bits"] == bits and r["mode"] == m]
                   for m in ("routed", "all")}
            kr, ka = [r["kl"] for r in sel["routed"]], [r["kl"] for r in sel["all"]]
            ratio = statistics.mean(a / r for a, r in zip(ka, kr))
            out.append(f"| {family} | {bits} | {ms(kr)} | {ms(ka)} | {ratio:.3f} | "
                       f"{statistics.mean(r['under_sampled'] for r in sel['routed']):.1f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
