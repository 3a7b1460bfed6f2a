"""The quantization pipeline on a CUDA device against the same run on the CPU (a lent GPU machine's check).

    python -m bench.device_parity [--cases gptq flexible-3.5] [--out FILE.json]

Each case is a fixed-seed regression case (tests/regression_cases.py) on the built-in tiny-llama, run once with
``device="cpu"`` and once with ``device="cuda"``. Reported per case: the fraction of equal codes over every
packed linear (the GPU's float reductions differ, so a few codes may flip), the bits per weight of both, the
wall time of both, and the next-token KL of each packed model to the full-precision model on held-out windows
(evaluated on the CPU), so a GPU run that is worse than the CPU run shows as a larger KL, not as a digest
mismatch. Exits non-zero if a case fails on the GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _codes(model) -> dict[str, torch.Tensor]:
    from flexquant.nn import QuantLinear

    return {n: m.input_order_codes().cpu() for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _kl(model, ref, windows) -> float:
    with torch.no_grad():
        p = torch.log_softmax(ref(windows).logits.float(), -1)
        q = torch.log_softmax(model(windows).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def run(cases: list[str]) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from regression_cases import CASES

    import flexquant as fq
    from flexquant.models import load_model

    ref = load_model("tiny-llama")[0].float().eval()
    windows = torch.randint(0, ref.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1))
    out = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "cases": {}}
    for name in cases:
        row = {}
        models = {}
        for device in ("cpu", "cuda"):
            t0 = time.perf_counter()
            try:
                qm = fq.quantize("tiny-llama", progress=False, device=device, **CASES[name])
            except Exception as e:  # the other cases still run: one run shows every device bug
                row[f"{device}_error"] = traceback.format_exception(e)[-6:]
                print(name, device, "".join(row[f"{device}_error"]), flush=True)
                break
            row[f"{device}_seconds"] = round(time.perf_counter() - t0, 2)
            row[f"{device}_bpw"] = qm.report["summary"]["bpw"]
            models[device] = qm.model.to("cpu").float().eval()
        out["cases"][name] = row
        if len(models) < 2:
            continue
        a, b = _codes(models["cpu"]), _codes(models["cuda"])
        same = sum(int((a[k] == b[k]).sum()) for k in a)
        total = sum(a[k].numel() for k in a)
        row["codes_equal"] = same / total
        row["kl_cpu"] = _kl(models["cpu"], ref, windows)
        row["kl_cuda"] = _kl(models["cuda"], ref, windows)
        print(name, json.dumps(row), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=["rtn", "gptq", "flexible-3.5", "flexible-2.5", "hiratio", "adaptive"])
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to compare", file=sys.stderr)
        return 2
    res = run(a.cases)
    if a.out:
        a.out.write_text(json.dumps(res, indent=1) + "\n")
    return 1 if any("cuda_error" in r or "cpu_error" in r for r in res["cases"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
