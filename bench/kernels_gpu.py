"""GPU kernel benchmark: the Triton packed kernel vs fp16 ``torch.nn.functional.linear``, same run.

Shapes are out×in (W is [out, in], y = x·Wᵀ): 4096×4096, 4096×11008 (a 7B down_proj), 11008×4096 (7B
gate/up), 8192×28672 (a 70B down_proj); batch 1, 4, 16; 2, 3, 4 bits and a 2.5-bpw mix (half the groups at
2 bits, half at 3, interleaved at random), group size 128, asymmetric (uint8 zeros, fp16 scales), RTN codes
of a random weight. Each timing is the median over 30 replays of a CUDA graph that calls the op once on each
of k copies of the layer and its input (k chosen so the copies span ≥ 3× the L2 cache, so no call is served
from L2), divided by k. Bytes counted per call: codes + scales + zeros + per-chunk column table (read) + x
(read) + y (written); the split-K workspace traffic (L2-resident) is not counted. The device-to-device copy
bandwidth is measured in the same run (bytes read + written).

    PYTHONPATH=src python3 -m bench.kernels_gpu [--sweep] [--out bench/results]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import statistics

import torch
import torch.nn.functional as F

from flexquant.config import GridConfig
from flexquant.kernels import triton_quant as tq
from flexquant.nn import QuantLinear
from flexquant.quant import rtn_quantize

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672)]
BITS = {"2": [2], "3": [3], "4": [4], "2.5mix": None}
L2_SPAN = 3


def median_graph_time(fns, reps=30) -> float:
    """Median seconds per call of fns (one per buffer copy), from replays of one CUDA graph calling each once."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / len(fns))
    del g
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (1 GiB buffers, median of 20)."""
    src = torch.empty(1 << 29, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    bw = 2 * src.numel() * 2 / statistics.median(times)
    del src, dst
    return bw


def make_layer(out_f: int, in_f: int, bits: list[int] | None, seed: int = 0) -> QuantLinear:
    g = torch.Generator(device="cuda").manual_seed(seed)
    W = torch.randn(out_f, in_f, device="cuda", generator=g, dtype=torch.float32) * 0.02
    ng = in_f // 128
    if bits is None:  # 2.5 bpw nominal: half the groups at 2 bits, half at 3, in random order
        gb = torch.tensor([2] * (ng // 2) + [3] * (ng - ng // 2), dtype=torch.uint8)[torch.randperm(ng)]
        grid = GridConfig(bits=3, group_size=128)
    else:
        gb = None
        grid = GridConfig(bits=bits[0], group_size=128)
    q = QuantLinear.from_result(rtn_quantize(W, grid, group_bits=gb), None, torch.float16).cuda()
    q.bias = None
    q.set_kernel("triton")
    return q


def kernel_bytes(q: QuantLinear, B: int) -> int:
    """Bytes one call reads (codes, scales, zeros, chunk column table, x) and writes (y)."""
    plan = tq.get_plan(q, torch.device("cuda"))
    total = 0
    for seg in plan.segments:
        total += seg.words.numel() * seg.words.element_size() + seg.cols.numel() * 4
        for t in (seg.scales, seg.zeros):
            if t is not None:
                total += t.numel() * t.element_size()
    return total + B * (q.in_features + q.out_features) * 2


def copies_for(nbytes: int, l2: int) -> int:
    return max(2, min(64, math.ceil(L2_SPAN * l2 / nbytes)))


def time_quant(q: QuantLinear, B: int, l2: int) -> tuple[float, int]:
    nbytes = kernel_bytes(q, B)
    k = copies_for(nbytes, l2)
    layers = [q] + [copy.deepcopy(q) for _ in range(k - 1)]
    xs = [torch.randn(B, q.in_features, device="cuda", dtype=torch.float16) for _ in range(k)]
    t = median_graph_time([lambda lq=lq, x=x: lq(x) for lq, x in zip(layers, xs)])
    return t, nbytes


def time_fp16(out_f: int, in_f: int, B: int, l2: int) -> tuple[float, int]:
    nbytes = (out_f * in_f + B * (in_f + out_f)) * 2
    k = copies_for(nbytes, l2)
    Ws = [torch.randn(out_f, in_f, device="cuda", dtype=torch.float16) for _ in range(k)]
    xs = [torch.randn(B, in_f, device="cuda", dtype=torch.float16) for _ in range(k)]
    t = median_graph_time([lambda W=W, x=x: F.linear(x, W) for W, x in zip(Ws, xs)])
    del Ws
    return t, nbytes


def check(q: QuantLinear, B: int) -> float:
    x = torch.randn(B, q.in_features, device="cuda", dtype=torch.float16)
    truth = x.float() @ q.dequantized_weight(torch.float32).T
    y = q(x)
    return float((y.float() - truth).norm() / truth.norm())


def sweep(l2: int) -> list[dict]:
    """Tile/split variants of both paths on the shapes that matter; prints one line per variant."""
    rows = []
    base = copy.deepcopy(tq.TUNING)
    v = lambda bm, nc, w, p: dict(bm=bm, nc=nc, warps=w, programs_per_sm=p)  # noqa: E731
    fma = [v(64, 16, 4, 4), v(128, 16, 4, 4), v(128, 8, 4, 4), v(64, 32, 4, 4), v(32, 32, 4, 4), v(256, 8, 8, 4),
           v(128, 16, 8, 4), v(64, 16, 4, 8), v(128, 16, 4, 2)]
    dot = [v(64, 4, 4, 2), v(128, 4, 8, 2), v(64, 4, 4, 4)]
    plan = [(1, "fma", fma), (16, "dot", dot)]
    for shape in [(4096, 11008), (8192, 28672)]:
        q = make_layer(*shape, [3])
        k = copies_for(kernel_bytes(q, 1), l2)
        layers = [q] + [copy.deepcopy(q) for _ in range(k - 1)]
        for B, path, variants in plan:
            xs = [torch.randn(B, q.in_features, device="cuda", dtype=torch.float16) for _ in range(k)]
            for cfg in variants:
                tq.TUNING.update(copy.deepcopy(base))
                tq.TUNING[path] = cfg
                tq.TUNING["dot_min_batch"] = 2
                for lq in layers:
                    lq.__dict__.pop("_triton_plan", None)
                try:
                    err = check(q, B)
                    t = median_graph_time([lambda lq=lq, x=x: lq(x) for lq, x in zip(layers, xs)], reps=15)
                except Exception as e:  # a variant that does not compile is reported, not fatal
                    print(f"sweep {shape} B={B} {path} {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                nb = kernel_bytes(q, B)
                rows.append(dict(shape=shape, batch=B, path=path, **cfg, us=t * 1e6, gbs=nb / t / 1e9, err=err))
                print(f"sweep {shape} B={B} {path} {cfg}: {t * 1e6:.1f} us {nb / t / 1e9:.0f} GB/s err {err:.1e}",
                      flush=True)
        del q, layers
        torch.cuda.empty_cache()
    tq.TUNING.update(base)
    return rows


def best_tuning(rows: list[dict]) -> dict:
    """The variant of each path with the least total time over the swept shapes."""
    out = copy.deepcopy(tq.TUNING)
    for path in ("fma", "dot"):
        tot: dict = {}
        for r in rows:
            if r["path"] == path:
                key = (r["bm"], r["nc"], r["warps"], r["programs_per_sm"])
                tot[key] = tot.get(key, 0.0) + r["us"]
        if tot:
            bm, nc, w, p = min(tot, key=tot.get)
            out[path] = dict(bm=bm, nc=nc, warps=w, programs_per_sm=p)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="time tile/split variants instead of the table")
    ap.add_argument("--auto", action="store_true", help="sweep first, then run the table with the best variants "
                    "(written to kernels_gpu_tuning.json)")
    ap.add_argument("--tuning", default=None, help="JSON dict merged into triton_quant.TUNING")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = ap.parse_args()
    import triton

    if a.tuning:
        tq.TUNING.update(json.loads(a.tuning))
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    meta = dict(device=torch.cuda.get_device_name(0), sms=props.multi_processor_count, l2_bytes=l2,
                torch=torch.__version__, triton=triton.__version__, date=datetime.date.today().isoformat(),
                tuning=copy.deepcopy(tq.TUNING))
    print(meta, flush=True)
    if a.sweep:
        rows = sweep(l2)
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "kernels_gpu_sweep.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        return
    if a.auto:
        sweep_rows = sweep(l2)
        tq.TUNING.update(best_tuning(sweep_rows))
        meta["tuning"] = copy.deepcopy(tq.TUNING)
        meta["sweep"] = sweep_rows
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "kernels_gpu_tuning.json"), "w") as f:
            json.dump(tq.TUNING, f)
        print("tuning", tq.TUNING, flush=True)
    copy_bw = copy_bandwidth()
    meta["copy_bw_gbs"] = copy_bw / 1e9
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)", flush=True)
    rows = []
    for out_f, in_f in SHAPES:
        fp16 = {B: time_fp16(out_f, in_f, B, l2) for B in (1, 4, 16)}
        for name, bits in BITS.items():
            q = make_layer(out_f, in_f, bits)
            for B in (1, 4, 16):
                err = check(q, B)
                t, nb = time_quant(q, B, l2)
                tf, nbf = fp16[B]
                r = dict(shape=f"{out_f}x{in_f}", bits=name, bpw=round(q.bpw, 3), batch=B, us=t * 1e6,
                         mbytes=nb / 1e6, gbs=nb / t / 1e9, pct_copy=100 * nb / t / copy_bw, fp16_us=tf * 1e6,
                         fp16_gbs=nbf / tf / 1e9, speedup=tf / t, rel_err=err)
                rows.append(r)
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
                      flush=True)
            del q
            torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "kernels_gpu.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = [f"# Triton packed kernel vs fp16 F.linear ({meta['device']})", "",
             f"{meta['date']}; torch {meta['torch']}, triton {meta['triton']}; {meta['sms']} SMs, "
             f"L2 {l2 / 2**20:.0f} MiB. Measured device-to-device copy bandwidth (read + write): "
             f"**{copy_bw / 1e9:.0f} GB/s**. Shapes are out×in; group size 128, asymmetric; medians of 30 CUDA-graph "
             "replays over ≥3×L2 of rotated copies. Batch 1 runs the FMA path, batch ≥ 2 the tensor-core path; "
             f"tile choice (swept in the same run): `{json.dumps(tq.TUNING)}`. "
             "Produced by `PYTHONPATH=src python3 -m bench.kernels_gpu --auto`.", "",
             "| out×in | bits | bpw | batch | kernel µs | MB read+written | GB/s | % of copy BW | fp16 µs | fp16 GB/s "
             "| speed-up vs fp16 | rel. err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['bits']} | {r['bpw']:.3f} | {r['batch']} | {r['us']:.1f} "
                     f"| {r['mbytes']:.1f} | {r['gbs']:.0f} | {r['pct_copy']:.0f}% | {r['fp16_us']:.1f} "
                     f"| {r['fp16_gbs']:.0f} "
                     f"| {r['speedup']:.2f}× | {r['rel_err']:.1e} |")
    with open(os.path.join(a.out, "kernels_gpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
