"""Triton kernel for `QuantLinear` on GPU: fused unpack + dequantize + matmul over the stored packed layout.

The codes are read exactly as stored (format v1: ``qweight_b{b}``, every bit-width's groups contiguous per
row), nothing is repacked. What the kernel needs besides them is derived once per layer and device and
cached on the layer (``_triton_plan``): per bit-width segment the input column of each 32-code chunk, the
segment's scales / zeros gathered contiguously when the layer mixes bit-widths (kept as they are for a
uniform layer), the permutation as int32, and fp32 workspaces for split-K. Building the plan reads the bit
map on the host once; ``forward`` afterwards launches kernels only (no host synchronisation), so a decode
step that calls it can be captured in a CUDA graph after one warm-up call.

Launch scheme: one launch per segment (a uniform layer: one launch), grid (row blocks, K splits, batch
blocks). When the K dimension is split, all programs of an output tile add into one fp32 workspace and the
last one (counted with an atomic counter across the launches of the call) writes the output and re-zeroes
the workspace. Batch 1 (per row of x) and fp32 activations use FMAs on fp32 (the
mantissa trick of ``triton_kernels``); larger fp16/bf16 batches dequantize a tile and use tensor cores.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from ..quant.result import FP16_BITS
from .registry import Kernel, register

log = logging.getLogger(__name__)

# Buffers this kernel understands; a layer with any other buffer (a future format feature) is left to the
# reference kernel.
KNOWN_BUFFERS = {"group_bits", "scales", "scale_codes", "scale_base", "zeros", "zeros_b4", "fp16_cols", "perm",
                 "rot_signs", "rot_factor"}
# Tuning knobs (measured on an H100, see bench/results/kernels_gpu.md); `TUNING` may be replaced by benchmarks.
TUNING = {
    "dot_min_batch": 2,  # from this batch on, fp16/bf16 take the tensor-core path
    "emax": 5,  # FMA path: codes may sit EMAX bits below the top of the mantissa (see triton_kernels)
    "fma": {"bm": 128, "nc": 16, "warps": 4, "programs_per_sm": 4},
    "dot": {"bm": 64, "nc": 4, "warps": 4, "programs_per_sm": 4},
}


def triton_available() -> bool:
    """True when Triton imports (it is the optional extra ``flexquant[gpu]``)."""
    try:
        import triton  # noqa: F401
    except Exception:  # a broken Triton install must not break the library
        return False
    return True


def usable_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests)."""
    if device.type == "cuda":
        return triton_available()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and triton_available()


# The bits of 1.0f, passed as a run-time argument: as an immediate, ptxas would take it as the logic op's one
# immediate and re-create every code mask in a register (measured: +20% instructions per weight).
ONE_BITS = 0x3F800000


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


@dataclass
class _Segment:
    bits: int
    words: torch.Tensor  # int32 [m, words] packed codes (bits < 16) or fp16 [m, cols] kept columns
    cols: torch.Tensor  # int32: input column (quantization order) of each 32-code chunk; fp16: of each column
    units: int  # chunks (quantized) or columns (fp16)
    scales: torch.Tensor | None = None  # fp16 [m, ngs] or uint8 log codes [m, ngs]
    zeros: torch.Tensor | None = None  # uint8 [m, ngs]; None when symmetric
    ngs: int = 0


@dataclass
class _Plan:
    key: tuple
    m: int
    n: int
    group_size: int
    sym: bool
    segments: list[_Segment]
    perm: torch.Tensor | None
    scale_base: torch.Tensor | None
    sms: int
    launches: dict = field(default_factory=dict)  # (B, dtype) -> list of launch closures' arguments
    dummy: torch.Tensor | None = None


def _layer_key(layer, device) -> tuple:
    return (str(device),) + tuple(getattr(layer, k).data_ptr() for k in layer.buffer_names)


def layout_supported(layer) -> bool:
    """Group size a multiple of 32 (whole 32-code chunks per group), code widths 1..8 (+ fp16 groups)."""
    names = set(layer.buffer_names)
    if any(not k.startswith("qweight_b") and k not in KNOWN_BUFFERS for k in names):
        return False
    if layer.group_size % 32:
        return False
    bits = {int(k[len("qweight_b"):]) for k in names if k.startswith("qweight_b")}
    return bits <= set(range(1, 9))


def build_plan(layer, device: torch.device) -> _Plan:
    """Derive (once) the per-segment metadata the kernel launches need; host reads happen here only."""
    from ..quant.pack import unpack_bits

    m, n, g = layer.out_features, layer.in_features, layer.group_size
    gb = layer.group_bits.to("cpu", torch.int64)
    qmask = gb < FP16_BITS
    nq = int(qmask.sum())
    qidx = torch.cumsum(qmask.long(), 0) - 1  # index of each quantized group among the quantized ones
    scale_src = layer.scales if "scales" in layer.buffer_names else None
    codes_src = layer.scale_codes if "scale_codes" in layer.buffer_names else None
    if "zeros" in layer.buffer_names:
        zeros_src = layer.zeros
    elif "zeros_b4" in layer.buffer_names:
        zeros_src = unpack_bits(layer.zeros_b4, 4, m * nq).view(m, nq).to(torch.uint8)
    else:
        zeros_src = None
    i32 = dict(dtype=torch.int32, device=device)
    segs = []
    for b in sorted(set(gb.tolist())):
        sel = (gb == b).nonzero().flatten()
        if b == FP16_BITS:
            cols = (sel[:, None] * g + torch.arange(g)[None, :]).flatten()
            if "perm" in layer.buffer_names:
                cols = layer.perm.to("cpu", torch.int64)[cols]
            segs.append(_Segment(b, layer.fp16_cols.contiguous(), cols.to(**i32), cols.numel()))
            continue
        chunk_cols = (sel[:, None] * g + torch.arange(0, g, 32)[None, :]).flatten()
        qs = qidx[sel].to(device)
        whole = sel.numel() == nq  # a single quantized segment: metadata used in place
        meta = codes_src if codes_src is not None else scale_src
        seg = _Segment(b, getattr(layer, f"qweight_b{b}").contiguous(), chunk_cols.to(**i32), chunk_cols.numel(),
                       scales=(meta if whole else meta[:, qs]).contiguous(), ngs=sel.numel())
        if zeros_src is not None and not layer.sym:
            seg.zeros = (zeros_src if whole else zeros_src[:, qs]).to(torch.uint8).contiguous()
        segs.append(seg)
    perm = layer.perm.to(**i32) if "perm" in layer.buffer_names else None
    base = layer.scale_base.float().contiguous() if "scale_base" in layer.buffer_names else None
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return _Plan(_layer_key(layer, device), m, n, g, layer.sym, segs, perm, base, sms,
                 dummy=torch.zeros(1, dtype=torch.float32, device=device))


def get_plan(layer, device: torch.device) -> _Plan:
    plan = layer.__dict__.get("_triton_plan")
    if plan is None or plan.key != _layer_key(layer, device):
        plan = build_plan(layer, device)
        layer.__dict__["_triton_plan"] = plan
    return plan


def _launch_config(plan: _Plan, B: int, dtype: torch.dtype) -> dict:
    """Tile sizes, K split and workspaces for a batch of B rows (cached per (B, dtype) on the plan)."""
    use_dot = dtype in (torch.float16, torch.bfloat16) and B >= TUNING["dot_min_batch"]
    t = TUNING["dot" if use_dot else "fma"]
    bm, nc, warps = t["bm"], t["nc"], t["warps"]
    # batch tile ≤ 32 keeps Triton on mma.sync (a 64-row tile selects wgmma, whose operand pass rejects the
    # joined dequantized tile); larger batches take several batch blocks
    bb = min(max(_next_pow2(B), 16), 32) if use_dot else 1
    rows, bblocks = _cdiv(plan.m, bm), _cdiv(B, bb)
    quant_units = sum(s.units for s in plan.segments if s.bits != FP16_BITS)
    f16_units = sum(s.units for s in plan.segments if s.bits == FP16_BITS) // 32
    total_chunks = max(1, quant_units + f16_units)
    want = max(1, (t["programs_per_sm"] * plan.sms) // (rows * bblocks))
    splits = max(1, min(want, total_chunks // nc))
    cps = _cdiv(_cdiv(total_chunks, splits), nc) * nc  # chunks per split, a multiple of NC
    seg_splits = [_cdiv(s.units if s.bits != FP16_BITS else s.units // 32, cps) for s in plan.segments]
    total = sum(seg_splits)
    cfg = dict(use_dot=use_dot, bm=bm, nc=nc, bb=bb, warps=warps, rows=rows, bblocks=bblocks, cps=cps,
               seg_splits=seg_splits, total=total, split=total > 1)
    if total > 1:
        dev = plan.dummy.device
        cfg["ws"] = torch.zeros(B, plan.m, dtype=torch.float32, device=dev)
        cfg["cnt"] = torch.zeros(bblocks * rows, dtype=torch.int32, device=dev)
    return cfg


def plo(bits: int, dtype: torch.dtype) -> int:
    """FMA path: codes sit at mantissa bits ≥ PLO = 23 − b − E_max (lower: fewer shifts, more cancellation,
    ~2^E_max·2^-24 of the result); fp32 activations keep E = 0 (full fp32 accuracy)."""
    return 23 - bits if dtype == torch.float32 else 23 - bits - TUNING["emax"]


def triton_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """y = x·Wᵀ + b for a packed ``layer`` with the Triton kernels (x: fp16, bf16 or fp32, any leading dims)."""
    from . import triton_kernels as tk

    plan = get_plan(layer, x.device)
    x2 = x.reshape(-1, plan.n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    B = x2.shape[0]
    y = torch.empty(B, plan.m, dtype=x.dtype, device=x.device)
    if B == 0:
        return y.view(*x.shape[:-1], plan.m)
    ck = (B, x.dtype)
    cfg = plan.launches.get(ck)
    if cfg is None:
        cfg = plan.launches[ck] = _launch_config(plan, B, x.dtype)
    d = plan.dummy
    bias = layer.bias
    ws, cnt = cfg.get("ws", d), cfg.get("cnt", d)
    perm = plan.perm if plan.perm is not None else d
    common = dict(HAS_BIAS=bias is not None, SPLIT=cfg["split"], USE_DOT=cfg["use_dot"], BM=cfg["bm"], BB=cfg["bb"],
                  num_warps=cfg["warps"])
    bias_t = bias if bias is not None else d
    for seg, ns in zip(plan.segments, cfg["seg_splits"]):
        grid = (cfg["rows"], ns, cfg["bblocks"])
        if seg.bits == FP16_BITS:
            tk.f16seg_kernel[grid](x2, x2.stride(0), seg.words, seg.words.stride(0), seg.cols, y, y.stride(0), ws,
                                   cnt, bias_t, B, plan.m, seg.units, cfg["cps"] * 32, cfg["total"], BK=32, **common)
        else:
            args = (x2, x2.stride(0), seg.words, seg.words.stride(0), seg.scales,
                    seg.zeros if seg.zeros is not None else d, plan.scale_base if plan.scale_base is not None else d,
                    seg.cols, perm, y, y.stride(0), ws, cnt, bias_t, B, plan.m, seg.ngs, seg.units, cfg["cps"],
                    cfg["total"])
            meta = dict(BITS=seg.bits, CPG=plan.group_size // 32, SYM=seg.zeros is None,
                        LOG_SCALES=plan.scale_base is not None, HAS_PERM=plan.perm is not None, NC=cfg["nc"],
                        HAS_BIAS=common["HAS_BIAS"], SPLIT=common["SPLIT"], BM=common["BM"], num_warps=cfg["warps"])
            if cfg["use_dot"]:
                tk.qdot_kernel[grid](*args, BB=cfg["bb"], **meta)
            else:
                tk.qgemv_kernel[grid](*args, ONE_BITS, PLO=plo(seg.bits, x.dtype), **meta)
    return y.view(*x.shape[:-1], plan.m)


class TritonKernel(Kernel):
    """Fused unpack + dequantize + matmul in Triton (CUDA; CPU only under ``TRITON_INTERPRET=1``).

    Supports: code widths 1..8 and fp16 kept groups, mixed per group; group sizes that are multiples of 32;
    act-order permutation; symmetric and asymmetric; fp16 or log-coded scales; 8- or 4-bit zeros;
    fp16, bf16 and fp32 activations, any batch. Graph-capturable after one warm-up call per batch size.
    """

    name = "triton"
    priority = 20

    def supports(self, layer, device):
        return usable_on(device) and layout_supported(layer)

    def forward(self, layer, x):
        return triton_linear(layer, x)


register(TritonKernel())
