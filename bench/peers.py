#!/usr/bin/env python
"""Run a peer quantizer on a Hugging Face Llama folder and save its *dequantized* weights.

    python -m bench.peers {llmc-gptq,hqq} --model MODEL_DIR --calib TOKENS.safetensors \
        --bits B --group-size 64 --out OUT_DIR

Peers (run them from the separate venv made by ``bench/peers_env.sh``, not the core venv):

* ``llmc-gptq``: ``llmcompressor.oneshot`` + ``GPTQModifier``; integer weights, asymmetric,
  group-wise (strategy "group"), no activation quantization, lm_head ignored, default
  actorder ("static") / block_size / dampening.  Calibrates on exactly the windows of
  ``input_ids`` in TOKENS.safetensors, in file order, one window per batch.
* ``hqq``: ``hqq`` (calibration-free half-quadratic quantization) through
  ``AutoHQQHFModel.quantize_model``; group-wise along axis=1, asymmetric, every decoder
  linear layer, lm_head left alone.  The calibration file is read only for the check below.

Scales (and HQQ's float zeros) are rounded to float16 values so the nominal
bits-per-weight (bits + 32/group_size: a 16-bit scale and a 16-bit zero per group) is honest;
llm-compressor does this itself (``scale_dtype=float16``), for HQQ we round its metadata
(what ``compute_dtype=float16`` stores on a GPU).  ``--qparams-dtype float32`` turns this off.

OUT_DIR is written atomically (OUT_DIR.tmp-xxx, then rename): a plain float32 LlamaForCausalLM
folder (safetensors + tokenizer) holding the peer's dequantized weights, and
``peer_report.json``.  Before the rename, the perplexity of the peer's own in-memory quantized
model on the first calibration windows must equal that of the reloaded saved folder
(relative difference <= 1e-4), proving the dequantization is faithful.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

# Versions this script was developed and measured with (see bench/peers_env.sh).
PINS = {"torch": "2.13.0", "transformers": "5.17.0", "llmcompressor": "0.14.0.1",
        "compressed-tensors": "0.19.0", "hqq": "0.2.8.post1"}
PEER_PACKAGES = {"llmc-gptq": "llmcompressor", "hqq": "hqq"}
N_CHECK = 2          # calibration windows used for the in-memory vs saved perplexity check
CHECK_RTOL = 1e-4
log = logging.getLogger("peers")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        self.exit(2, f"peers.py: error: {message} (see --help)\n")


def peak_rss_mb() -> float:
    """flexquant's own measurement (this process's VmHWM), loaded from its file: this venv lacks flexquant."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "fq_metrics", Path(__file__).resolve().parents[1] / "src/flexquant/eval/metrics.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.peak_rss_mb()


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("method", choices=sorted(PEER_PACKAGES))
    p.add_argument("--model", required=True, type=Path, help="HF Llama folder (float weights)")
    p.add_argument("--calib", required=True, type=Path, help="safetensors with int64 input_ids [n, L]")
    p.add_argument("--bits", required=True, type=int, choices=(2, 3, 4, 8))
    p.add_argument("--group-size", required=True, type=int)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--qparams-dtype", choices=("float16", "float32"), default="float16",
                   help="precision the scales/zeros are rounded to (default float16, matching bpw)")
    p.add_argument("--hqq-round-zero", action="store_true",
                   help="hqq: integer zeros at every bit width (HQQ's default rounds them only at 4 bits)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="dtype the model is loaded in for quantization (default float32, the validated one)")
    p.add_argument("--measure-only", action="store_true",
                   help="only quantize and measure (bench/scale.py): no perplexity check, no dequantized "
                        "save; OUT_DIR gets just peer_report.json (peak RSS taken right after quantizing)")
    a = p.parse_args(argv)
    if not (a.model / "config.json").is_file():
        p.error(f"--model {a.model}: no config.json there (expected a Hugging Face model folder)")
    if not a.calib.is_file():
        p.error(f"--calib {a.calib}: no such file")
    if a.group_size <= 0 or a.group_size % 8:
        p.error(f"--group-size {a.group_size}: must be a positive multiple of 8")
    if not a.out.resolve().parent.is_dir():
        p.error(f"--out {a.out}: parent folder does not exist")
    return a


def import_peer(method: str):
    """Import the peer package or exit with a one-line hint about the peers venv."""
    pkg = PEER_PACKAGES[method]
    try:
        return __import__(pkg)
    except ImportError as e:
        sys.exit(f"peers.py: error: {method} needs the '{pkg}' package, which this Python "
                 f"({sys.executable}) cannot import ({e}); create the peers venv with "
                 f"'bash bench/peers_env.sh' and run this script with .venv-peers/bin/python")


def load_calib(path: Path) -> torch.Tensor:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        if "input_ids" not in f.keys():
            keys = sorted(f.keys())
            sys.exit(f"peers.py: error: --calib {path}: no 'input_ids' tensor "
                     f"(has {len(keys)} others, e.g. {keys[:3]})")
        ids = f.get_tensor("input_ids")
    if ids.dtype != torch.int64 or ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        sys.exit(f"peers.py: error: --calib {path}: input_ids must be int64 [n, L], "
                 f"got {ids.dtype} {list(ids.shape)}")
    return ids


def decoder_linears(model) -> dict[str, torch.nn.Module]:
    """The nn.Linear layers inside the decoder blocks (lm_head excluded), by qualified name."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"}


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    """exp(mean NLL of tokens[1:] given logits[:-1]) over all windows."""
    nll, count = 0.0, 0
    for w in windows:
        logits = model(input_ids=w[None]).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum").item()
        count += w.numel() - 1
    return math.exp(nll / count)


def run_llmc_gptq(model, calib, bits, group_size, qdtype) -> tuple[dict, dict]:
    """GPTQ via llm-compressor on `model` in place; returns (dequantized weights, peer config).

    llm-compressor leaves each Linear as a plain float Linear holding the already fake-quantized
    weight plus weight_scale / weight_zero_point, and wraps its forward to fake-quantize again
    on every call; the dequantized weight is that same fake_quantize(weight, scale, zp).
    """
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    extra = {"scale_dtype": torch.float16} if qdtype == "float16" else {}
    wargs = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group",
                             group_size=group_size, **extra)
    recipe = GPTQModifier(ignore=["lm_head"], config_groups={"group_0": QuantizationScheme(
        targets=["Linear"], weights=wargs, input_activations=None, output_activations=None)})

    def collate(rows):
        ids = torch.stack(rows)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    loader = torch.utils.data.DataLoader(list(calib), batch_size=1, shuffle=False, collate_fn=collate)
    oneshot(model=model, dataset=loader, recipe=recipe, num_calibration_samples=len(calib),
            shuffle_calibration_samples=False)
    deq, scheme = {}, None
    for name, mod in decoder_linears(model).items():
        scheme = mod.quantization_scheme.weights
        if getattr(mod, "weight_g_idx", None) is not None:
            raise RuntimeError(f"{name}: unexpected g_idx (activation-ordered groups)")
        deq[name] = fake_quantize(mod.weight, mod.weight_scale, mod.weight_zero_point, scheme).float()
    return deq, {"weights": json.loads(scheme.model_dump_json()), "block_size": recipe.block_size,
                 "dampening_frac": recipe.dampening_frac, "ignore": recipe.ignore}


def run_hqq(model, bits, group_size, qdtype, round_zero=False) -> tuple[dict, dict]:
    """HQQ on `model` in place (decoder linears -> HQQLinear); returns (dequantized, config).

    HQQ's BaseQuantizeConfig keeps float (unrounded) zeros below 4 bits; `round_zero` forces
    integer zeros, which makes 0.0 exactly representable again.
    """
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from hqq.models.hf.base import AutoHQQHFModel

    cfg = BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1)
    cfg["weight_quant_params"]["round_zero"] |= round_zero
    AutoHQQHFModel.quantize_model(model, quant_config=cfg, compute_dtype=torch.float32, device="cpu")
    deq = {}
    for name, mod in model.named_modules():
        if isinstance(mod, HQQLinear):
            if qdtype == "float16":  # what HQQLinear(compute_dtype=float16) would store
                for k in ("scale", "zero"):
                    mod.meta[k] = mod.meta[k].half().float()
            deq[name] = mod.dequantize().float()
    return deq, cfg["weight_quant_params"]


def versions() -> dict:
    out = {}
    for pkg in ("llmcompressor", "compressed-tensors", "hqq", "torch", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def publish(tmp: Path, out: Path) -> None:
    """Rename the finished tmp folder to `out`, replacing a previous result."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old)
        log.warning("replaced existing %s", out)
    else:
        os.replace(tmp, out)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    a = parse_args(argv)
    import_peer(a.method)
    for pkg, have in versions().items():
        if have and not have.startswith(PINS[pkg]):
            log.warning("%s %s is installed, but this script was validated with %s", pkg, have, PINS[pkg])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calib = load_calib(a.calib)
    check = calib[:N_CHECK]
    log.info("loading %s (%s); calib %s windows x %s tokens", a.model, a.dtype, *calib.shape)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype)).eval()
    bad = sorted({m.in_features for m in decoder_linears(model).values() if m.in_features % a.group_size})
    if bad:
        sys.exit(f"peers.py: error: --group-size {a.group_size} does not divide in_features {bad}")
    ppl_float = None if a.measure_only else perplexity(model, check)

    log.info("quantizing with %s, %d bits, group size %d", a.method, a.bits, a.group_size)
    t0 = time.perf_counter()
    if a.method == "llmc-gptq":
        deq, peer_config = run_llmc_gptq(model, calib, a.bits, a.group_size, a.qparams_dtype)
    else:
        deq, peer_config = run_hqq(model, a.bits, a.group_size, a.qparams_dtype, a.hqq_round_zero)
    quant_time = time.perf_counter() - t0
    log.info("quantized %d linear layers in %.1f s", len(deq), quant_time)
    if a.measure_only:
        report = {"method": a.method, "bits": a.bits, "group_size": a.group_size,
                  "bpw": a.bits + 32 / a.group_size, "qparams_dtype": a.qparams_dtype, "dtype": a.dtype,
                  "quant_time_s": round(quant_time, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
                  "n_calib": int(calib.shape[0]), "seqlen": int(calib.shape[1]), "measure_only": True,
                  "threads": torch.get_num_threads(), "versions": versions(), "peer_config": peer_config,
                  "model": str(a.model.resolve()), "calib": str(a.calib.resolve())}
        a.out.mkdir(exist_ok=True)
        (a.out / "peer_report.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps({k: report[k] for k in ("method", "bits", "group_size", "bpw", "quant_time_s",
                                                 "peak_rss_mb")}))
        return 0
    ppl_peer = perplexity(model, check)
    del model

    tmp = Path(tempfile.mkdtemp(prefix=f"{a.out.name}.tmp-", dir=a.out.resolve().parent))
    try:
        plain = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
        linears = decoder_linears(plain)
        if set(linears) != set(deq):
            raise RuntimeError(f"quantized layers differ from decoder linears: {set(linears) ^ set(deq)}")
        for name, w in deq.items():
            linears[name].weight.data.copy_(w)
        plain.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(a.model).save_pretrained(tmp)
        del plain, deq
        saved = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        ppl_saved = perplexity(saved, check)
        del saved
        rel = abs(ppl_saved - ppl_peer) / ppl_peer
        log.info("check on %d calib windows: float %.4f, peer in-memory %.6f, saved %.6f (rel %.1e)",
                 len(check), ppl_float, ppl_peer, ppl_saved, rel)
        if not rel <= CHECK_RTOL:
            raise RuntimeError(f"saved dequantized model disagrees with the peer: ppl {ppl_saved} "
                               f"vs {ppl_peer} (rel {rel:.2e} > {CHECK_RTOL})")
        report = {
            "method": a.method, "bits": a.bits, "group_size": a.group_size,
            "bpw": a.bits + 32 / a.group_size, "qparams_dtype": a.qparams_dtype,
            "quant_time_s": round(quant_time, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "n_calib": int(calib.shape[0]), "seqlen": int(calib.shape[1]),
            "calib_used": a.method == "llmc-gptq", "threads": torch.get_num_threads(),
            "versions": versions(), "peer_config": peer_config,
            "sanity_check": {"n_windows": len(check), "ppl_float": ppl_float, "ppl_peer_in_memory": ppl_peer,
                             "ppl_saved_dequantized": ppl_saved, "rel_diff": rel},
            "model": str(a.model.resolve()), "calib": str(a.calib.resolve()),
        }
        (tmp / "peer_report.json").write_text(json.dumps(report, indent=2) + "\n")
        publish(tmp, a.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(json.dumps({k: report[k] for k in ("method", "bits", "group_size", "bpw", "quant_time_s",
                                             "peak_rss_mb", "sanity_check")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
