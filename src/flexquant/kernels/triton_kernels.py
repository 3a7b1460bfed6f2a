"""Triton device code for the packed `QuantLinear` kernels and the online Hadamard rotation.

Imported lazily (only when a Triton kernel is first used), so that ``TRITON_INTERPRET=1`` set by a test
before first use runs the same code on CPU tensors. The host side (layout, launch, registry) lives in
``triton_quant.py`` and ``triton_hadamard.py``.

Packed layout read as stored (format v1): a row of a bit-width segment is a run of 32-code chunks, each
chunk b int32 words, code i at bit offset i·b of the little-endian 32·b-bit chunk. The kernels unroll the
32 code positions of a chunk at compile time, so every shift and mask is a constant, and treat a tile of
``NC`` chunks × ``BM`` rows as 32 slices of shape [BM, NC] (slice i = code i of every chunk).

Dequantization without integer→float conversions: a logic op puts code c at mantissa bit Q of 1.0, giving
cf = 1 + c·2^(Q−23) exactly; with E = 23 − Q − b and x' = 2^E·x, cf·x' = x' + c·x·2^-b. Then
  FMA path (batch 1): p = Σ_i cf_i·x'_i per chunk, and Σ_i (c_i − z)·s·x_i = s·2^b·(p − Σ_i x'_i) − s·z·Σ_i x_i.
    Q may be anywhere in [PLO, 23 − b]: codes of one word whose offsets fall in the same window share one
    shift. The cancellation in p − Σ x' grows with 2^E: E ≤ 5 (PLO = 18 − b) keeps it well under the fp16
    rounding of the result for fp16/bf16 activations; fp32 activations use PLO = 23 − b (E = 0, ~1e-6).
  dot path: w_i = fma(cf_i, s·2^b, −s·(2^b + z)) = (c_i − z)·s rounded once (Q = 23 − b, E = 0), then one
    tensor-core dot per tile.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _finish(acc, offs_b, offs_m, B, m, y_ptr, stride_yb, ws_ptr, cnt_ptr, bias_ptr, total_splits,
            HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """Write acc [BB, BM] (fp32) into y, or, split along K, add it to the fp32 workspace; the last of the
    ``total_splits`` programs of this output tile (over all launches of the call) writes y and re-zeroes the
    workspace and its counter, so the next call (or graph replay) starts clean without a memset."""
    mask = (offs_b[:, None] < B) & (offs_m[None, :] < m)
    if SPLIT:
        ws = ws_ptr + offs_b[:, None] * m + offs_m[None, :]
        tl.atomic_add(ws, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()
        cptr = cnt_ptr + tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
        done = tl.atomic_add(cptr, 1, sem="acq_rel")
        if done == total_splits - 1:
            acc = tl.atomic_add(ws, tl.zeros_like(acc), mask=mask, sem="acquire")  # read at L2, then re-zero
            acc = tl.where(mask, acc, 0.0)
            tl.store(ws, tl.zeros_like(acc), mask=mask)
            tl.atomic_xchg(cptr, 0)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_m, mask=offs_m < m, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + offs_b[:, None] * stride_yb + offs_m[None, :],
                     acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_m, mask=offs_m < m, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_b[:, None] * stride_yb + offs_m[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _code_as_float(wp, one, POS: tl.constexpr, BITS: tl.constexpr, Q: tl.constexpr):
    """Code POS of each chunk as cf = 1 + c·2^(Q−23) (fp32, exact): the code is moved to mantissa bit Q
    (Q + BITS ≤ 23) of 1.0. wp [BM, NC] points at word 0 of each chunk. Shifts by the same amount of the
    same word are shared between codes (compiler CSE); the one logic op takes the mask as its immediate and
    the exponent of 1.0 from one register."""
    J: tl.constexpr = (POS * BITS) // 32
    OFF: tl.constexpr = (POS * BITS) % 32
    MASK: tl.constexpr = ((1 << BITS) - 1) << Q
    w = tl.load(wp + J).to(tl.uint32, bitcast=True)
    if OFF + BITS > 32:  # the code straddles two words: low part from word J, high part from word J+1
        w2 = tl.load(wp + (J + 1)).to(tl.uint32, bitcast=True)
        t = (w >> (OFF - Q)) | (w2 << (32 - OFF + Q))
    elif OFF > Q:
        t = w >> (OFF - Q)
    elif OFF < Q:
        t = w << (Q - OFF)
    else:
        t = w
    return ((t & MASK) | one).to(tl.float32, bitcast=True)


@triton.jit
def _scales(s_ptr, z_ptr, base_ptr, rows, grp, ngs, BITS: tl.constexpr, SYM: tl.constexpr, LOG_SCALES: tl.constexpr):
    """Scale s and zero point z (fp32) for broadcastable row and group index tensors (clamped in range by the
    caller, so no load is masked)."""
    sofs = rows * ngs + grp
    if LOG_SCALES:  # scale = base·2^(−code/32), the 8-bit logarithmic grid
        code = tl.load(s_ptr + sofs).to(tl.float32)
        s = tl.load(base_ptr + rows) * tl.exp2(-code * (1.0 / 32.0))
    else:
        s = tl.load(s_ptr + sofs).to(tl.float32)
    if SYM:
        z = tl.full(s.shape, (1 << (BITS - 1)) * 1.0, tl.float32)
    else:
        z = tl.load(z_ptr + sofs).to(tl.float32)
    return s, z


@triton.jit
def _join32(v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15,
            v16, v17, v18, v19, v20, v21, v22, v23, v24, v25, v26, v27, v28, v29, v30, v31):
    """Stack 32 [BM, NC] slices into [BM, NC, 2, 2, 2, 2, 2] with element (.., c, i) = slice i of chunk c."""
    e0 = tl.join(tl.join(tl.join(tl.join(v0, v16), tl.join(v8, v24)), tl.join(tl.join(v4, v20), tl.join(v12, v28))),
                 tl.join(tl.join(tl.join(v2, v18), tl.join(v10, v26)), tl.join(tl.join(v6, v22), tl.join(v14, v30))))
    e1 = tl.join(tl.join(tl.join(tl.join(v1, v17), tl.join(v9, v25)), tl.join(tl.join(v5, v21), tl.join(v13, v29))),
                 tl.join(tl.join(tl.join(v3, v19), tl.join(v11, v27)), tl.join(tl.join(v7, v23), tl.join(v15, v31))))
    return tl.join(e0, e1)


@triton.jit
def _dq(wp, A, Bz, POS: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr):
    """(c − z)·s = fma(1 + c·2^-b, s·2^b, −s·(2^b + z)), rounded once, in the activation dtype."""
    return tl.fma(_code_as_float(wp, 0x3F800000, POS, BITS, 23 - BITS), A, -Bz).to(DT)


@triton.jit
def qdot_kernel(x_ptr, stride_xb, w_ptr, stride_wm, s_ptr, z_ptr, base_ptr, ccol_ptr, perm_ptr,
                y_ptr, stride_yb, ws_ptr, cnt_ptr, bias_ptr,
                B, m, ngs, nchunks, chunks_per_split, total_splits,
                BITS: tl.constexpr, CPG: tl.constexpr, SYM: tl.constexpr, LOG_SCALES: tl.constexpr,
                HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                BM: tl.constexpr, NC: tl.constexpr, BB: tl.constexpr):
    """Tensor-core path: y[b, r] (+)= Σ over this program's chunks of one bit-width segment of (c − z)·s·x.

    Grid: (row blocks of BM, K splits of ``chunks_per_split`` chunks, batch blocks of BB). ``ccol_ptr``
    [nchunks] gives the input column (quantization order) of each chunk's first code; with ``HAS_PERM`` it is
    mapped through perm. Each tile of BM rows × NC chunks is dequantized to the activation dtype (codes of
    position i of every chunk as one [BM, NC] slice, joined in column order) and multiplied by one dot.
    """
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_b = pid_b * BB + tl.arange(0, BB)
    offs_mc = tl.minimum(offs_m, m - 1)
    bmask = offs_b < B
    c_begin = pid_k * chunks_per_split
    c_end = tl.minimum(c_begin + chunks_per_split, nchunks)
    xdt = x_ptr.dtype.element_ty
    acc = tl.zeros((BB, BM), dtype=tl.float32)
    for c0 in range(c_begin, c_end, NC):
        # Loads of codes and metadata are unmasked (masked loads cost a register clear each): rows and chunks are
        # clamped in range, and chunks past the end read real data that meets x = 0.
        offs_cc = tl.minimum(c0 + tl.arange(0, NC), c_end - 1)
        wp = w_ptr + (offs_mc[:, None] * stride_wm + offs_cc[None, :] * BITS)  # [BM, NC] word 0 of each chunk
        s, z = _scales(s_ptr, z_ptr, base_ptr, offs_mc[:, None], offs_cc[None, :] // CPG, ngs, BITS, SYM,
                       LOG_SCALES)
        A = s * (1 << BITS)
        Bz = A + s * z
        k = tl.arange(0, NC * 32)
        kmask = (c0 + k // 32) < c_end
        kc = tl.load(ccol_ptr + tl.minimum(c0 + k // 32, c_end - 1)) + k % 32
        if HAS_PERM:
            kc = tl.load(perm_ptr + kc)
        xt = tl.load(x_ptr + offs_b[:, None] * stride_xb + kc[None, :], mask=bmask[:, None] & kmask[None, :],
                     other=0.0)
        w = _join32(
                    _dq(wp, A, Bz, 0, BITS, xdt), _dq(wp, A, Bz, 1, BITS, xdt),
                    _dq(wp, A, Bz, 2, BITS, xdt), _dq(wp, A, Bz, 3, BITS, xdt),
                    _dq(wp, A, Bz, 4, BITS, xdt), _dq(wp, A, Bz, 5, BITS, xdt),
                    _dq(wp, A, Bz, 6, BITS, xdt), _dq(wp, A, Bz, 7, BITS, xdt),
                    _dq(wp, A, Bz, 8, BITS, xdt), _dq(wp, A, Bz, 9, BITS, xdt),
                    _dq(wp, A, Bz, 10, BITS, xdt), _dq(wp, A, Bz, 11, BITS, xdt),
                    _dq(wp, A, Bz, 12, BITS, xdt), _dq(wp, A, Bz, 13, BITS, xdt),
                    _dq(wp, A, Bz, 14, BITS, xdt), _dq(wp, A, Bz, 15, BITS, xdt),
                    _dq(wp, A, Bz, 16, BITS, xdt), _dq(wp, A, Bz, 17, BITS, xdt),
                    _dq(wp, A, Bz, 18, BITS, xdt), _dq(wp, A, Bz, 19, BITS, xdt),
                    _dq(wp, A, Bz, 20, BITS, xdt), _dq(wp, A, Bz, 21, BITS, xdt),
                    _dq(wp, A, Bz, 22, BITS, xdt), _dq(wp, A, Bz, 23, BITS, xdt),
                    _dq(wp, A, Bz, 24, BITS, xdt), _dq(wp, A, Bz, 25, BITS, xdt),
                    _dq(wp, A, Bz, 26, BITS, xdt), _dq(wp, A, Bz, 27, BITS, xdt),
                    _dq(wp, A, Bz, 28, BITS, xdt), _dq(wp, A, Bz, 29, BITS, xdt),
                    _dq(wp, A, Bz, 30, BITS, xdt), _dq(wp, A, Bz, 31, BITS, xdt))
        w = tl.reshape(w, (BM, NC * 32))
        acc += tl.dot(xt, tl.trans(w))
    _finish(acc, offs_b, offs_m, B, m, y_ptr, stride_yb, ws_ptr, cnt_ptr, bias_ptr, total_splits, HAS_BIAS, SPLIT)


@triton.jit
def qgemv_kernel(x_ptr, stride_xb, w_ptr, stride_wm, s_ptr, z_ptr, base_ptr, ccol_ptr, perm_ptr,
                 y_ptr, stride_yb, ws_ptr, cnt_ptr, bias_ptr,
                 B, m, ngs, nchunks, chunks_per_split, total_splits, one_bits,
                 BITS: tl.constexpr, CPG: tl.constexpr, SYM: tl.constexpr, LOG_SCALES: tl.constexpr,
                 HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                 BM: tl.constexpr, NC: tl.constexpr, PLO: tl.constexpr):
    """FMA path, one row of x per program (grid axis 2 = row of x): y[b, r] (+)= Σ (c − z)·s·x over this
    program's chunks of one bit-width segment.

    Tiles are [NC chunks, BM rows] (rows the fast dimension, so a thread's rows share the x values it loads;
    x enters as [NC, 1] columns, a free broadcast). Code position i of every chunk is one [NC, BM] slice
    placed at mantissa bit q (see the module docstring); p − Σx' removes the constant part of cf·x'.
    """
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_b = pid_b + tl.arange(0, 1)
    offs_mc = tl.minimum(offs_m, m - 1)
    c_begin = pid_k * chunks_per_split
    c_end = tl.minimum(c_begin + chunks_per_split, nchunks)
    xrow = x_ptr + pid_b * stride_xb
    acc2 = tl.zeros((NC, BM), dtype=tl.float32)
    for c0 in range(c_begin, c_end, NC):
        offs_c = c0 + tl.arange(0, NC)
        cm1 = (offs_c < c_end)[:, None]
        offs_cc = tl.minimum(offs_c, c_end - 1)  # unmasked loads of codes and metadata (see qdot_kernel)
        wp = w_ptr + (offs_cc[:, None] * BITS + offs_mc[None, :] * stride_wm)  # [NC, BM] word 0 of each chunk
        s, z = _scales(s_ptr, z_ptr, base_ptr, offs_mc[None, :], (offs_cc // CPG)[:, None], ngs, BITS, SYM,
                       LOG_SCALES)
        ccol = tl.load(ccol_ptr + offs_cc)[:, None]  # [NC, 1]
        p = tl.zeros((NC, BM), dtype=tl.float32)
        xw = tl.zeros((NC, 1), dtype=tl.float32)
        xsum = tl.zeros((NC, 1), dtype=tl.float32)
        for i in tl.static_range(32):
            off = (i * BITS) % 32
            straddle = (off + BITS) // 33
            win_i = 24 - BITS - PLO  # floor division of non-negative numbers only (the interpreter truncates)
            q = straddle * PLO + (1 - straddle) * (off - ((off - PLO + 32 * win_i) // win_i - 32) * win_i)
            if HAS_PERM:
                xi = tl.load(xrow + tl.load(perm_ptr + ccol + i), mask=cm1, other=0.0)
            else:
                xi = tl.load(xrow + ccol + i, mask=cm1, other=0.0)
            xi = xi.to(tl.float32)
            xq = xi * ((1 << (23 - q - BITS)) * 1.0)  # x' = 2^E·x: cf·x' = x' + c·x·2^-b
            p += _code_as_float(wp, one_bits, i, BITS, q) * xq
            xw += xq
            xsum += xi
        # Σ (c − z)·s·x = s·2^b·(p − Σx') − s·z·Σx, accumulated per chunk and reduced once after the loop
        acc2 += s * (1 << BITS) * (p - xw) - (s * z) * xsum
    acc = tl.sum(acc2, axis=0)[None, :]
    _finish(acc, offs_b, offs_m, B, m, y_ptr, stride_yb, ws_ptr, cnt_ptr, bias_ptr, total_splits, HAS_BIAS, SPLIT)


@triton.jit
def f16seg_kernel(x_ptr, stride_xb, w_ptr, stride_wm, col_ptr, y_ptr, stride_yb, ws_ptr, cnt_ptr, bias_ptr,
                  B, m, ncols, cols_per_split, total_splits,
                  HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, USE_DOT: tl.constexpr,
                  BM: tl.constexpr, BK: tl.constexpr, BB: tl.constexpr):
    """The fp16 kept columns: y (+)= x[:, cols] · Wkeptᵀ over this program's columns (``col_ptr``: input column
    of each kept column, permutation applied)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_b = pid_b * BB + tl.arange(0, BB)
    mrow = offs_m < m
    bmask = offs_b < B
    k_begin = pid_k * cols_per_split
    k_end = tl.minimum(k_begin + cols_per_split, ncols)
    acc = tl.zeros((BB, BM), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BK):
        offs_k = k0 + tl.arange(0, BK)
        kmask = offs_k < k_end
        cols = tl.load(col_ptr + offs_k, mask=kmask, other=0)
        xt = tl.load(x_ptr + offs_b[:, None] * stride_xb + cols[None, :], mask=bmask[:, None] & kmask[None, :],
                     other=0.0)
        w = tl.load(w_ptr + offs_m[:, None] * stride_wm + offs_k[None, :], mask=mrow[:, None] & kmask[None, :],
                    other=0.0)
        if USE_DOT:
            acc += tl.dot(xt, tl.trans(w.to(xt.dtype)))
        else:
            acc += tl.sum(w.to(tl.float32)[None, :, :] * xt.to(tl.float32)[:, None, :], axis=2)
    _finish(acc, offs_b, offs_m, B, m, y_ptr, stride_yb, ws_ptr, cnt_ptr, bias_ptr, total_splits, HAS_BIAS, SPLIT)


@triton.jit
def hadamard_kernel(x_ptr, s_ptr, h_ptr, fhi_ptr, flo_ptr, y_ptr, n, a, prescale, scale,
                    BDIM: tl.constexpr, A_PAD: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    HAS_LO: tl.constexpr):
    """y[t] = (x[t] ⊙ s)·(F ⊗ H_b)·scale for one token t and BN output columns of the inner index.

    x[t] viewed [a, b]: Y1 = (X ⊙ S)·H_b on tensor cores (±1 entries: exact operands, fp32 sums), then
    Y = Fᵀ·Y1 with Y1 and F each split into hi + lo parts in the activation dtype, so the second product is
    accurate to ~2^-16 (bf16) / 2^-22 (fp16) before the final rounding. ``fhi``/``flo`` hold Fᵀ zero-padded to
    A_PAD × A_PAD; ``prescale`` (a power of two) keeps Y1 inside the fp16 range.
    """
    t = tl.program_id(0)
    j = tl.program_id(1)
    dt = x_ptr.dtype.element_ty
    rows = tl.arange(0, A_PAD)
    rmask = rows < a
    cols = j * BN + tl.arange(0, BN)
    acc = tl.zeros((A_PAD, BN), dtype=tl.float32)
    for k0 in tl.static_range(0, BDIM, BK):
        ks = k0 + tl.arange(0, BK)
        offs = rows[:, None] * BDIM + ks[None, :]
        z = tl.load(x_ptr + t * n + offs, mask=rmask[:, None], other=0.0) * tl.load(s_ptr + offs, mask=rmask[:, None],
                                                                                   other=0.0)
        h = tl.load(h_ptr + ks[:, None] * BDIM + cols[None, :])
        acc += tl.dot(z, h)
    acc = acc * prescale
    hi = acc.to(dt)
    lo = (acc - hi.to(tl.float32)).to(dt)
    frows = rows[:, None] * A_PAD + rows[None, :]
    fhi = tl.load(fhi_ptr + frows)
    out = tl.dot(fhi, hi) + tl.dot(fhi, lo)
    if HAS_LO:
        out += tl.dot(tl.load(flo_ptr + frows), hi)
    out = out * scale
    tl.store(y_ptr + t * n + rows[:, None] * BDIM + cols[None, :], out.to(dt), mask=rmask[:, None])
