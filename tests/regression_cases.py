"""The fixed-seed runs whose checkpoint tensors must stay bit-identical across refactors (issue 20).

Each case is the flat settings of one `flexquant.quantize` call on the built-in tiny-llama with the embedded
calibration text. `digest` hashes every tensor a saved checkpoint holds (name, dtype, shape, bytes).
Regenerate the reference only when a change of numbers is intended:
``python tests/regression_cases.py > tests/data/reference_digests.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# float32 activation storage: the pre-renovation code kept every activation in float32 (the default is now
# float16, which changes the numbers slightly and is measured by the benchmark instead)
CALIB = dict(nsamples=8, seqlen=64, seed=0, batch_size=4, store_dtype="float32")
CASES = {
    "rtn": dict(method="rtn", bits=4, group_size=32),
    "gptq": dict(method="gptq", bits=3, group_size=32, **CALIB),
    "flexible-2.5": dict(method="flexible", group_size=64, **CALIB, options=dict(bpw=2.5)),
    "flexible-3.5": dict(method="flexible", group_size=64, **CALIB, options=dict(bpw=3.5)),
    "hiratio": dict(method="hiratio", group_size=64, **CALIB,
                    options=dict(bpw=2.5, stats_nsamples=4, probe_nsamples=2, probe_seqlen=32, learn_nsamples=2,
                                 learn_batch=1, learn_steps=4)),
    "adaptive": dict(method="adaptive", bits=4, group_size=32, **CALIB,
                     options=dict(train_nsamples=2, train_steps=3, fold_norms="on")),  # the reference's order
    # the default since 2026-12-05 (digest made then)
    "adaptive_unfolded": dict(method="adaptive", bits=4, group_size=32, **CALIB,
                              options=dict(train_nsamples=2, train_steps=3, fold_norms="off")),
}


def digest(folder: str | Path) -> str:
    """sha256 over every tensor of ``folder``'s safetensors files (one file or shards), in name order."""
    from flexquant.tensorio import tensors_digest

    return tensors_digest(folder)


def run_case(name: str, out: Path) -> Path:
    import flexquant as fq

    qm = fq.quantize("tiny-llama", progress=False, **CASES[name])
    return fq.save(qm, out, plot=False)


if __name__ == "__main__":
    import tempfile

    names = sys.argv[1:] or list(CASES)
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps({n: digest(run_case(n, Path(tmp) / n)) for n in names}, indent=2))
