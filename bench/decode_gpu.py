"""End-to-end decode speed of a 7B-shaped Llama, packed ~3 bpw vs fp16, batch 1, on one GPU.

Model: 32 layers, hidden 4096, intermediate 11008, 32 heads (head_dim 128), vocab 32000, random fp16
weights (speed does not depend on the values). The quantized model replaces every qkv/o/gate_up/down
linear by a `QuantLinear` built with flexquant's own RTN (3 bits, group 128, asymmetric: 3.19 bpw stored)
and `QuantLinear.from_result`, running the Triton kernel; embedding, norms and lm_head stay fp16 in both
models. A third row adds FlexibleLLM's online Hadamard rotation before every down_proj (Triton kernel).

This is a minimal hand-written Llama decode step over those weights (RMSNorm, RoPE, SDPA attention over a
static KV cache of 256 positions read in full with a mask, SiLU MLP, greedy next token; q/k/v and gate/up
fused into one linear each in both models, as serving engines do), written for a speed benchmark: eager
Hugging Face decode costs ~30 ms of Python per token and would hide the kernels. One step is captured
in a CUDA graph (position and token live in device tensors, updated inside the graph), and
tokens/s is 128 replays over their measured time; median of 5 such runs.

    PYTHONPATH=src python3 -m bench.decode_gpu [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from flexquant.config import GridConfig
from flexquant.nn import QuantLinear
from flexquant.quant import rtn_quantize
from flexquant.transforms.rotate import Rotation

LAYERS, D, FF, HEADS, VOCAB, CTX = 32, 4096, 11008, 32, 32000, 256
HD = D // HEADS
# q/k/v and gate/up fused into one linear each (as serving engines do), in both models
NAMES = {"qkv": (3 * D, D), "o": (D, D), "gate_up": (2 * FF, D), "down": (D, FF)}


class Dense:
    """fp16 linear without bias (the baseline)."""

    def __init__(self, W):
        self.W = W

    def __call__(self, x):
        return F.linear(x, self.W)


def rmsnorm(x, w, eps=1e-6):
    return F.rms_norm(x, (x.shape[-1],), w, eps)


class Llama:
    """Weights + static KV cache + one decode step (see module docstring)."""

    def __init__(self, layers, emb, norms, final_norm, lm_head):
        self.layers, self.emb, self.norms, self.final_norm, self.lm_head = layers, emb, norms, final_norm, lm_head
        dev = emb.device
        self.K = torch.zeros(LAYERS, HEADS, CTX, HD, dtype=torch.float16, device=dev)
        self.V = torch.zeros_like(self.K)
        inv = 1.0 / (10000 ** (torch.arange(0, HD, 2, device=dev).float() / HD))
        ang = torch.arange(CTX, device=dev).float()[:, None] * inv[None, :]
        self.cos, self.sin = ang.cos().half(), ang.sin().half()
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.tok = torch.zeros(1, dtype=torch.long, device=dev)
        self.ar = torch.arange(CTX, device=dev)

    def rope(self, t):
        """Rotary embedding of [n, HD] heads at the current position."""
        c, s = self.cos[self.pos], self.sin[self.pos]  # [1, HD/2]
        a, b = t[:, : HD // 2], t[:, HD // 2:]
        return torch.cat((a * c - b * s, a * s + b * c), -1)

    def step(self):
        h = self.emb[self.tok]  # [1, D]
        mask = (self.ar <= self.pos)[None, None, None, :]  # [1, 1, 1, CTX]
        for i, L in enumerate(self.layers):
            qkv = L["qkv"](rmsnorm(h, self.norms[i][0]))  # [1, 3D]
            qk = self.rope(qkv[:, : 2 * D].view(2 * HEADS, HD))
            q, k, v = qk[:HEADS], qk[HEADS:], qkv[:, 2 * D:].view(HEADS, HD)
            self.K[i].index_copy_(1, self.pos, k[:, None, :])
            self.V[i].index_copy_(1, self.pos, v[:, None, :])
            o = F.scaled_dot_product_attention(q[None, :, None, :], self.K[i][None], self.V[i][None], attn_mask=mask)
            h = h + L["o"](o.reshape(1, D))
            gu = L["gate_up"](rmsnorm(h, self.norms[i][1]))
            h = h + L["down"](F.silu(gu[:, :FF]) * gu[:, FF:])
        logits = self.lm_head(rmsnorm(h, self.final_norm))
        self.tok.copy_(logits.argmax(-1))
        self.pos.add_(1)
        return logits

    def reset(self):
        self.pos.zero_()
        self.tok.zero_()


def build(seed=0, rotate=False):
    """(fp16 model, packed model [, packed model with online rotation]) sharing embedding, norms, lm_head."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    emb = torch.randn(VOCAB, D, device="cuda", generator=g).half() * 0.02
    head_w = torch.randn(VOCAB, D, device="cuda", generator=g).half() * 0.02
    norms = [(torch.ones(D, device="cuda").half(), torch.ones(D, device="cuda").half()) for _ in range(LAYERS)]
    grid = GridConfig(bits=3, group_size=128)
    dense, quant, quant_rot = [], [], []
    bits = numel = 0
    for i in range(LAYERS):
        dl, ql, rl = {}, {}, {}
        for name, (o, n) in NAMES.items():
            W = (torch.randn(o, n, device="cuda", generator=g) * 0.02).half()
            dl[name] = Dense(W)
            r = rtn_quantize(W, grid)
            q = QuantLinear.from_result(r, None, torch.float16).cuda()
            q.bias = None
            q.set_kernel("triton")
            ql[name] = q
            bits += q.stored_bits()
            numel += o * n
            if rotate:
                if name == "down":
                    q = QuantLinear.from_result(r, None, torch.float16, rotation=Rotation.random(n, i)).cuda()
                    q.bias = None
                    q.set_kernel("triton")
                rl[name] = q
        dense.append(dl)
        quant.append(ql)
        quant_rot.append(rl)
    head = Dense(head_w)
    models = [Llama(dense, emb, norms, norms[0][0], head), Llama(quant, emb, norms, norms[0][0], head)]
    if rotate:
        models.append(Llama(quant_rot, emb, norms, norms[0][0], head))
    return models, bits / numel


def tokens_per_s(model: Llama, steps=128, runs=5) -> tuple[float, float]:
    model.reset()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            model.step()
    torch.cuda.current_stream().wait_stream(s)
    model.reset()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        model.step()
    rates = []
    for _ in range(runs):
        model.reset()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(steps):
            g.replay()
        b.record()
        b.synchronize()
        rates.append(steps / (a.elapsed_time(b) / 1e3))
    # eager, for reference: Python and launch overhead included
    model.reset()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(8):
        model.step()
    torch.cuda.synchronize()
    eager = 8 / (time.perf_counter() - t0)
    del g
    return statistics.median(rates), eager


def logits_error(model: Llama) -> float:
    """Step 0 logits of the packed model, Triton kernel vs the reference kernel (same packed weights)."""
    model.reset()
    y = model.step().float()
    for L in model.layers:
        for q in L.values():
            q.set_kernel("reference")
    model.reset()
    ref = model.step().float()
    for L in model.layers:
        for q in L.values():
            q.set_kernel("triton")
    return float((y - ref).norm() / ref.norm())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--no-rotate", action="store_true", help="skip the online-rotation row")
    ap.add_argument("--tuning", default=None, help="JSON file merged into triton_quant.TUNING (kernels_gpu --auto)")
    a = ap.parse_args()
    import triton

    from flexquant.kernels import triton_quant as tq

    if a.tuning:
        with open(a.tuning) as f:
            tq.TUNING.update(json.load(f))
    meta = dict(tuning=dict(tq.TUNING), device=torch.cuda.get_device_name(0), torch=torch.__version__,
                triton=triton.__version__, date=datetime.date.today().isoformat(), layers=LAYERS, hidden=D,
                intermediate=FF, heads=HEADS,
                vocab=VOCAB, ctx=CTX)
    t0 = time.perf_counter()
    models, bpw = build(rotate=not a.no_rotate)
    meta["build_s"] = time.perf_counter() - t0
    meta["bpw"] = bpw
    print(meta, flush=True)
    names = ["fp16", "rtn 3-bit g128 (Triton)", "rtn 3-bit g128 + online Hadamard before down_proj (Triton)"]
    rows = []
    for name, model in zip(names, models):
        tps, eager = tokens_per_s(model)
        rows.append(dict(model=name, tokens_per_s=tps, ms_per_token=1e3 / tps, eager_tokens_per_s=eager))
        print(rows[-1], flush=True)
    meta["logits_rel_err_triton_vs_reference"] = logits_error(models[1])
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "decode_gpu.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = [f"# Decode speed, 7B-shaped Llama, batch 1 ({meta['device']})", "",
             f"{meta['date']}; torch {meta['torch']}, triton {meta['triton']}. 32 layers, hidden 4096, intermediate "
             f"11008, 32 heads, vocab 32000, random fp16 weights; quantized linears {bpw:.3f} bpw stored (RTN 3-bit, "
             "group 128, asymmetric), embedding/norms/lm_head fp16 in every row; q/k/v and gate/up fused in both. "
             f"One hand-written decode step (static KV cache of {CTX}) captured in a CUDA graph; tokens/s = "
             "median of 5 runs of 128 replays. "
             "Produced by `PYTHONPATH=src python3 -m bench.decode_gpu`.", "",
             "| model | tokens/s (graph) | ms/token | speed-up vs fp16 | eager tokens/s |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['tokens_per_s']:.1f} | {r['ms_per_token']:.2f} | {r['speedup']:.2f}× "
                     f"| {r['eager_tokens_per_s']:.1f} |")
    lines += ["", f"Step-0 logits, Triton vs reference kernel on the same packed weights: relative error "
              f"{meta['logits_rel_err_triton_vs_reference']:.1e}."]
    with open(os.path.join(a.out, "decode_gpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
