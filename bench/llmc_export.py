#!/usr/bin/env python
"""llm-compressor GPTQ, saved as its own compressed-tensors checkpoint (the import side of bench/export_bench.py).

    .venv-peers/bin/python -m bench.llmc_export --model MODEL_DIR --calib CALIB.safetensors \
        --eval EVAL.safetensors --bits 4 --group-size 64 --out OUT_DIR

Runs the same GPTQModifier recipe as bench/peers.py (int, asymmetric, group-wise, float16 scales, lm_head
ignored) on the calibration windows, measures the perplexity of llm-compressor's own in-memory model on the
evaluation windows, then saves the model compressed (``save_compressed=True``: pack-quantized safetensors +
config.json, exactly what a user would upload) and measures the reloaded folder too. OUT_DIR gets
``llmc_report.json``; it is written atomically.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.peers import load_calib, perplexity, publish, run_llmc_gptq

log = logging.getLogger("llmc_export")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--calib", required=True, type=Path)
    p.add_argument("--eval", required=True, type=Path, help="safetensors with int64 input_ids [n, L] to evaluate")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

    calib, windows = load_calib(a.calib), load_calib(a.eval)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    _, config = run_llmc_gptq(model, calib, a.bits, a.group_size, "float16")
    quant_s = time.perf_counter() - t0
    ppl_own = perplexity(model, windows)
    log.info("llm-compressor's own model: ppl %.4f on %d windows", ppl_own, len(windows))
    tmp = Path(tempfile.mkdtemp(prefix=f".{a.out.name}.tmp-", dir=a.out.resolve().parent))
    try:
        model.save_pretrained(tmp, save_compressed=True)
        AutoTokenizer.from_pretrained(a.model).save_pretrained(tmp)
        del model
        # transformers' compressed path cannot load asymmetric packed zero points (llm-compressor issue 1618):
        # record whether it does here, then measure through its dequantize-at-load path.
        try:
            AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
            default_path = "loads"
        except Exception as e:  # the loader's own error types
            default_path = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        reloaded = AutoModelForCausalLM.from_pretrained(
            tmp, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
        ppl_reloaded = perplexity(reloaded, windows)
        log.info("saved folder reloaded by transformers: ppl %.4f", ppl_reloaded)
        report = {"bits": a.bits, "group_size": a.group_size, "quant_seconds": quant_s, "ppl_own_model": ppl_own,
                  "ppl_saved_reloaded": ppl_reloaded, "transformers_compressed_path": default_path,
                  "windows": list(windows.shape), "recipe": config,
                  "versions": {k: md.version(k) for k in ("llmcompressor", "compressed-tensors", "transformers",
                                                          "torch")}}
        (tmp / "llmc_report.json").write_text(json.dumps(report, indent=2) + "\n")
        publish(tmp, a.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(json.dumps({k: v for k, v in report.items() if k != "recipe"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
