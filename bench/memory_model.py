"""The memory and time model of docs/scale.md, as code: predicted peak host memory of a streamed run from the
model's shape, the calibration tokens, the method and the ranks; checked against the measured rows of
bench/results/scale*.json and applied to Llama-3-70B and a DeepSeek-V3-sized MoE.

    python -m bench.memory_model                # the validation table and the projections (markdown)

Peak host memory of one process (bytes), CPU, float32 compute (B = 4), activations kept in float16 (s = 2):

    M = M0 + max(capture, block, statistics, fisher)
    capture = V·d·B·(1 + t·tied)            embedding (t = 1 for FlexibleLLM's rotation, which reads the
                                            embedding alone, or all the ends of a tied model)
              + max(V·d·B·t, T·d·(B + s))   the rotated copy being made, then the captured stream and its kept
                                            float16 copy
              (gptq under --max-memory: V·d·s + T·d·B + b·L·d·s, the embedding's 16-bit table, the stream and
              the batch being converted before it spills)
    block   = P_b·B + kept + hess           one decoder block's weights (for gptq under --max-memory the files'
                                            16-bit dtype, --block-weights auto, and a byte a weight for those
                                            already quantized: all but down_proj's), what the store keeps
              + max(solve, forward)         the two phases of a block, which do not overlap:
    solve   = F(n) + m·n·(B + 1)            the largest solve, n = d_ff: F = 16·n² up to 4096 columns (H, its
                                            permuted copy, the float64 factor), 4·n² beyond (H parked on disk,
                                            permuted and factored in its own buffer); W's copy and the codes
              + T·d·B (if ≤ cap)            the mid-block residual h' kept by the pre-norm path
    forward = min(b·L·3·d_ff·B, C)          the MLP intermediates of one batch, or of one row chunk (C = 128 MiB)
              + 4·d_ff²                     down_proj's Hessian being accumulated
              + T·d·B                       h' (the block outputs are written into it)

Under --max-memory X the block's working set (its weights, 4·d_ff² for the largest Hessian, 4·d·d_ff for the
solve's copy) is held out of X; what is kept (the store's, h' and the outputs of the pre-norm path) fills the rest
and spills beyond it (one batch being read back stays), and the MLP runs in chunks of C = X/16 (8..128 MiB).

FlexibleLLM's block loop carries the full-precision stream of its first K windows one block at a time (kept =
2·K·L·d·B in the store, exact: the block's inputs and outputs; read a batch at a time); its plan's error tables
are built in the statistics pass, each Hessian dropped there. With --max-memory, kept + the stream's
kept copy are capped there (the rest spills to disk) and so is the cache. Its statistics phase peaks in the output
Fisher's head pass, which comes first and keeps the inputs of K_f = 16 windows for every block, or in its
backward pass through the blocks:

    statistics = V·d·B·(1 + t·tied) + n_l·K_f·L·d·s + K·L·d·B  the head (read and rotated again), the Fisher pass's
                                                            kept inputs (capped by --max-memory), the pass's
                                                            stream (its K windows)
                 + max(V·d·B·t, 3·C_h + 2·K_f·L·d·B)        the rotated copy being made; then a chunk of positions'
                                                            logits, log-softmax and gradient (C_h = 32 MiB), the
                                                            loss gradients of the K_f windows
    fisher     = P_b·B + b·L·(4·f + 2·h·L + 6·d)·B          a float32 block and one batch's autograd
                 + n_l·K_f·L·d·s + K·L·d·B + 3·K_f·L·d·B    intermediates (h heads); what the pass keeps; the
                                                            gradients in and out and the block's inputs

M0 is the interpreter with torch, transformers, the tokenizer and the skeleton (measured: 0.52 GB).
Ranks: each process holds its own M, with T/ranks tokens (the exact reduction adds the largest group's inputs,
T·n·4, on every rank).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

GB = 1e9
M0 = 0.52 * GB
B, S = 4, 2
CACHE_CAP = 6 * 2**30
FLOAT64_MAX_COLUMNS = 4096  # GPTQ factor_dtype "auto" (quant/gptq.py)
MLP_CHUNK_BYTES = 128 * 2**20  # pipeline/prenorm.py
HEAD_CHUNK_BYTES = 32 * 2**20  # pipeline/sensitivity.py: the head's logits per chunk of positions


@dataclass(frozen=True)
class Shape:
    d: int
    d_ff: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int = 1  # routed experts per MoE layer (their weights are streamed with the block)
    tied: bool = False  # the head is the embedding (a transform then reads all the ends together)

    @property
    def block_params(self) -> int:
        dq, dkv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.d * dq * 2 + 2 * self.d * dkv + 3 * self.d * self.d_ff * self.experts + 2 * self.d

    @property
    def params(self) -> int:
        return self.layers * self.block_params + 2 * self.vocab * self.d


SHAPES = {
    "smollm2-135m": Shape(576, 1536, 30, 49152, 9, 3, 64, tied=True),
    "llama-3-70b": Shape(8192, 28672, 80, 128256, 64, 8, 128),
    # DeepSeek-V3-sized: 61 layers, hidden 7168, 256 routed experts of width 2048 (+1 shared), vocab 129280;
    # multi-head latent attention approximated by 128 heads of 128
    "deepseek-v3-size": Shape(7168, 2048, 61, 129280, 128, 128, 128, experts=257),
}


def peak(shape: Shape, tokens: int, method: str = "gptq", window: int = 512, batch: int = 8,
         keep_windows: int = 32, max_memory: float | None = None, ends_transformed: bool | None = None,
         ranks: int = 1, fisher_windows: int = 16) -> dict[str, float]:
    """Predicted peak bytes and its parts (see the module docstring)."""
    T, d, f = tokens / ranks, shape.d, shape.d_ff
    t = method == "flexible" if ends_transformed is None else ends_transformed  # DOSA rotates the ends
    ends = shape.vocab * d * B * (1 + t * shape.tied)  # one end (a transform of tied ends reads all of them)
    rotating = shape.vocab * d * B * t  # the rotated copy of the embedding or head being made
    narrow = max_memory is not None and method == "gptq"  # --block-weights auto: 16-bit blocks and embedding
    if narrow:  # the embedding's 16-bit table; the captured stream, each batch spilled as it is converted
        capture = shape.vocab * d * S + T * d * B + batch * window * d * S
    else:
        capture = ends + max(rotating, T * d * (B + S))
    cap = CACHE_CAP if max_memory is None else min(CACHE_CAP, max_memory)
    cache = 2 * T * d * B
    cache = cache if cache <= cap else 0.0  # past the cap the block is recomputed per group instead
    kept = fisher_kept = 0.0
    if method == "flexible":
        kept = 2 * keep_windows / ranks * window * d * B  # the FP stream: the block's inputs and outputs, exact
        fisher_kept = shape.layers * fisher_windows / ranks * window * d * S  # the Fisher pass's inputs, every block
    stream_kept = T * d * S
    budgeted = kept + stream_kept
    if max_memory is not None:
        budgeted = min(budgeted, max_memory)
    cached = cache > 0
    # a whole block, all its experts (read together); in the files' float16 under a budget where no transform
    # computes on the blocks (--block-weights auto)
    reserve_w = block_w = shape.block_params * (S if narrow else B)
    if narrow:  # quantized linears held as their codes (a byte a weight)
        block_w -= (shape.block_params - d * f * shape.experts) * (S - 1)
    chunk = MLP_CHUNK_BYTES if max_memory is None else min(MLP_CHUNK_BYTES, max(8 * 2**20, max_memory / 16))
    factor = f * f * (16 if f <= FLOAT64_MAX_COLUMNS else 4) + d * f * (B + 1)
    if max_memory is None:
        solve = factor + (T * d * B if cached else 0)
        forward = min(batch * window * 3 * f * B, chunk) + 4 * f * f + T * d * B
    else:  # the block's working set is reserved; what is kept (h' and the outputs too) fills the rest, then spills
        room = max(0.0, max_memory - (reserve_w + 4 * f * f + 4 * d * f))
        budgeted = min(budgeted + T * d * B, room) + batch * window * d * B  # + the batch being read back
        solve, forward = factor, min(batch * window * 3 * f * B, chunk) + 4 * f * f
    parts = {"base": M0, "block weights": block_w, "kept (store)": budgeted, "solve": solve, "forward": forward}
    block = parts["block weights"] + budgeted + max(solve, forward)
    parts["capture"] = capture
    statistics = fisher = 0.0
    if method == "flexible":  # the output Fisher's head pass, with every block's Fisher inputs and the stream
        stream = min(T, keep_windows / ranks * window) * d * B  # the pass's own stream (float32, not stored)
        held = (fisher_kept if max_memory is None else min(fisher_kept, max_memory)) + stream
        statistics = (ends + held
                      + max(rotating, 3 * HEAD_CHUNK_BYTES + 2 * fisher_windows * window * d * B))
        # then backwards through the blocks: a float32 block, one batch's autograd intermediates (the MLP's four
        # b·L·f tensors, the attention scores and probabilities, ~6 of b·L·d), the gradients, the block's inputs
        autograd = batch * window * (4 * f + 2 * shape.heads * window + 6 * d) * B
        fisher = (shape.block_params * B + autograd + held + 3 * fisher_windows / ranks * window * d * B)
    parts["statistics"], parts["fisher backward"] = statistics, fisher
    parts["peak"] = M0 + max(capture, block, statistics, fisher)
    if ranks > 1:
        parts["peak"] += tokens * f * 4  # the exact reduction's gathered inputs of the widest group
    return parts


def flops(shape: Shape, tokens: int, method: str = "gptq") -> float:
    """Floating-point operations of a run: the block forwards (about 3 passes of 2·P_b per token: the Hessian
    captures, the outputs, the statistics pass for FlexibleLLM twice that) and the solves (per linear of m × n:
    n³ for the factorisations and 2·m·n² for GPTQ's column updates)."""
    d, f = shape.d, shape.d_ff
    dq, dkv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    linears = [(dq, d), (dkv, d), (dkv, d), (d, dq)] + [(f, d), (f, d), (d, f)] * shape.experts
    solve = sum(n ** 3 + 2 * m * n * n for m, n in linears) * shape.layers
    passes = 6 if method == "flexible" else 3
    forward = passes * 2 * shape.layers * shape.block_params * tokens
    if shape.experts > 1:  # a token visits 8 routed experts + 1 shared, not all of them
        forward = passes * 2 * shape.layers * (shape.block_params - 3 * d * f * (shape.experts - 9)) * tokens
    return forward + solve


def measured_rows(results: Path) -> list[dict]:
    """The newest finished CPU row of each (size, method, flags, tokens) in the committed results
    (``results``/scale_*.json, as bench.scale writes them; `bench.scale_summary.collect`), oldest first. GPU rows
    are left out: the model is of a CPU run's host memory."""
    from bench.scale_summary import collect

    done = collect(results)[0]
    return sorted((r for r in done.values() if not r.get("report_peak_device_mb")), key=lambda r: r.get("date", ""))


MODELLED = ("gptq", "flexible")  # the methods the formula has terms for (hiratio's probes are not modelled)


def validation(results: Path) -> list[str]:
    """Predicted vs measured peak for the newest measured row of each run with a known shape."""
    from bench.synth import SIZES

    lines = ["| run | tokens | flags | code | measured peak (MiB) | predicted (MiB) | error | CPU s | GFLOP | "
             "GFLOP per CPU s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in measured_rows(results):
        size = row.get("size")
        if row.get("kind") != "flexquant" or not row.get("peak_rss_mib") or size not in SIZES \
                or row.get("method") not in MODELLED:
            continue
        s = SIZES[size]
        shape = Shape(s.hidden, s.intermediate, s.layers, s.vocab, s.heads, s.kv_heads, s.head_dim)
        mm = _flag(" ".join(row.get("flags") or []), "--max-memory")
        p = peak(shape, row.get("nsamples", 32) * row.get("seqlen", 512), row["method"],
                 max_memory=float(mm) if mm else None)["peak"] / 2**20
        m, t = row["peak_rss_mib"], (row.get("user_s") or 0) + (row.get("sys_s") or 0)
        g = flops(shape, row.get("nsamples", 32) * row.get("seqlen", 512), row["method"]) / 1e9
        lines.append(f"| {size} {row['method']} | {row.get('nsamples', 32) * row.get('seqlen', 512)} | "
                     f"{' '.join(row.get('flags') or []) or '—'} | {row.get('code', '?')} | {m:.0f} | {p:.0f} | "
                     f"{(p - m) / m:+.1%} | "
                     f"{t:.0f} | {g:.0f} | {g / t if t else 0:.1f} |")
    return lines


def _flag(flags: str, name: str) -> float | None:
    from flexquant.config import parse_bytes

    parts = flags.split()
    return parse_bytes(parts[parts.index(name) + 1]) if name in parts else None


GPU_HOUR_USD = 2.5  # assumed rental price per GPU-hour
# The GPU rate is not measured here (no device lent): it is anchored on llm-compressor's documented GPTQ time for
# Llama-3-8B on one GPU (745 s), taking its calibration as 512 × 2048 tokens: the FLOP count of that run by the
# formula below divided by 745 s.
LLAMA3_8B = Shape(4096, 14336, 32, 128256, 32, 8, 128)


def gpu_rate() -> float:
    return flops(LLAMA3_8B, 512 * 2048) / 745.0


def projections() -> list[str]:
    rate = gpu_rate()
    lines = [f"Effective GPU rate (anchored, see above): {rate / 1e12:.0f} TFLOP/s.", "",
             "| model | params | method | tokens | ranks | --max-memory | predicted peak per process (GB) | "
             "GPU hours | cost at $2.5/GPU-h |", "|---|---|---|---|---|---|---|---|---|"]
    for name in ("llama-3-70b", "deepseek-v3-size"):
        s = SHAPES[name]
        for method, mm in (("gptq", None), ("gptq", 8 * GB), ("flexible", None), ("flexible", 8 * GB)):
            for ranks in (1, 8):
                p = peak(s, 128 * 2048, method, window=2048, max_memory=mm, ranks=ranks)["peak"]
                hours = flops(s, 128 * 2048, method) / rate / 3600  # GPU-hours, however many ranks share them
                lines.append(f"| {name} | {s.params / 1e9:.0f}B | {method} | 128×2048 | {ranks} | "
                             f"{'—' if mm is None else f'{mm / GB:.0f} GB'} | {p / GB:.1f} | {hours:.1f} "
                             f"({hours / ranks * 60:.0f} min wall) | {hours * GPU_HOUR_USD:.0f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path("bench/results"),
                    help="folder of bench.scale's scale*.json (the newest row of each run is checked)")
    a = ap.parse_args()
    print("\n".join(validation(a.results)))
    print()
    print("\n".join(projections()))


if __name__ == "__main__":
    main()
