"""Which quantizer breaks a saved `--method adaptive` checkpoint? Perplexity with parts switched off.

For each checkpoint folder: as saved; K/V cache at 16 bits; activations and K/V at 16 bits (weights only);
activations at 16 bits with the K/V cache as saved; activations as saved except the down_proj input.
Evaluated on the first WINDOWS held-out pydoc windows of 2048 tokens (no reference: perplexity only).

    python -m bench.adaptive_diagnose bench/results/work/adaptive/<checkpoint> [...] --out result.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--out", default=None, help="write the perplexities as JSON here")
    args = p.parse_args()

    import flexquant as fq
    from flexquant.actquant.runtime import ATTRIBUTE
    from flexquant.data import eval_windows
    from flexquant.eval import evaluate_windows

    result: dict[str, dict[str, float]] = {}
    for path in args.checkpoints:
        loaded = fq.load(path)
        model = loaded.model
        windows = eval_windows(loaded.tokenizer, "pydoc", 2048, args.windows)  # the checkpoint's own tokenizer
        rt = getattr(model, ATTRIBUTE, None)
        if rt is None:
            raise SystemExit(f"{path} has no activation/KV quantizers (not an --method adaptive checkpoint)")
        kv = {k: (q.k_bits, q.v_bits) for k, q in rt.kv.items()}
        act = {k: s.bits for k, s in rt.sites.items()}

        rows = result.setdefault(Path(path).name, {})
        for tag, a_on, kv_on, down_on in (("as saved", True, True, True), ("K/V at 16 bits", True, False, True),
                                          ("weights only (A and K/V at 16 bits)", False, False, True),
                                          ("activations at 16 bits, K/V as saved", False, True, True),
                                          ("down_proj input at 16 bits", True, True, False)):
            for k, q in rt.kv.items():
                q.k_bits, q.v_bits = kv[k] if kv_on else (16, 16)
            for k, s in rt.sites.items():
                s.bits = act[k] if a_on and (down_on or not k.endswith("_down")) else 16
            rows[tag] = evaluate_windows(model, windows, None, progress=False)["perplexity"]
            print(f"{Path(path).name}: {tag}: {rows[tag]:.3f}", flush=True)
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps({"windows": args.windows, "perplexity": result}, indent=1))
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
