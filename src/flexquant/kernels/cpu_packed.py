"""The packed CPU kernel (``packed-cpu``; ``dense-cache`` stays the CPU default): weights stay packed in memory and are
dequantized group by group inside the matmul (`cpu_packed.cpp`, compiled once per machine with torch's extension
builder and cached under ~/.cache/flexquant/ext).

At first use a layer's codes are laid out for the kernel: in a lean load, 3 bits per code when every quantized group
has at most 3 bits and the group size is a multiple of 32 (per 32 columns, 8 bytes of low bit pairs, then a 32-bit
word of high bits: unpacked eight columns at a time with AVX2); else two 4-bit codes per byte when every group has
at most 4 bits (per group, byte t holds columns t and t + g/2), else one byte per code; per row and group a float32
scale and offset (w = code·scale + offset, offset = −zero·scale: the reference kernel's arithmetic reordered);
columns in the layer's quantization order (the input is gathered by its permutation); kept float16 columns as a
small dense matmul. That is 3, 4 or 8 + 64/g bits per weight, beside the checkpoint's own packed buffers (a lean
load, `flexquant.nn.lean`, keeps this layout alone). Where the compiler or the headers are missing the build fails
once with a warning and `dense-cache` serves instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.builtin import cache_dir

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("cpu_packed.cpp")
GEMV_MAX_BATCH = 4  # up to this many rows of x: the fused loop; above: tiles of dequantized rows + BLAS
TILE_ROWS = 256
_EXT: dict[str, object] = {}


def extension():
    """The compiled extension, or None (built once; a failure is logged once and remembered)."""
    if "ext" in _EXT:
        return _EXT["ext"]
    _EXT["ext"] = None
    try:
        from torch.utils import cpp_extension

        if shutil.which("ninja") is None:
            try:
                import ninja  # the PyPI package's binary

                os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
            except ImportError:
                pass
        digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
        build = cache_dir() / "ext" / digest
        build.mkdir(parents=True, exist_ok=True)
        _EXT["ext"] = cpp_extension.load(name=f"flexquant_cpu_packed_{digest}", sources=[str(SOURCE)],
                                         build_directory=str(build), verbose=False,
                                         extra_cflags=["-O3", "-march=native", "-fopenmp-simd"])
    except Exception as e:  # noqa: BLE001 - any build failure means: use dense-cache
        log.warning("the packed CPU kernel could not be built (%s); using dense-cache (dequantized weights)",
                    " ".join(str(e).split())[:300])
    return _EXT["ext"]


@dataclass
class PackedState:
    codes: torch.Tensor  # uint8 [m, n·bits/8], quantization order
    sz: torch.Tensor  # float32 [m, ng, 2]
    bits: int  # 3, 4 or 8
    group_size: int
    perm: torch.Tensor | None
    kept_cols: torch.Tensor | None  # positions (quantization order) of float16 columns
    kept: torch.Tensor | None  # float32 [m, n16]


def prepare(layer, compact: bool = False) -> PackedState:
    """The kernel's layout of ``layer``. ``compact`` (a lean load): 3-bit codes where every group has ≤ 3 bits and
    g is a multiple of 32 (a quarter smaller than nibbles, a decode product ~1.5× their time); else nibbles or
    bytes."""
    r = layer.to_result()
    m, n = r.shape
    g = r.group_size
    q = r.quantized_groups
    top = int(r.group_bits[q].max()) if q.any() else 0
    bits = 3 if compact and top <= 3 and g % 32 == 0 else 4 if top <= 4 else 8
    ng = n // g
    scale = torch.zeros(m, ng)
    offset = torch.zeros(m, ng)
    if q.any():
        scale[:, q] = r.scales.float()
        offset[:, q] = -r.zero_points().float() * r.scales.float()
    codes = r.codes.to(torch.uint8)
    if bits == 4:  # per group: byte t = column t (low nibble) | column t + g/2 (high nibble)
        c = codes.view(m, ng, 2, g // 2)
        codes = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(m, n // 2)
    elif bits == 3:  # per 32 columns: 8 bytes of low bit pairs (byte t: columns t + 8k), a 32-bit word of high bits
        c = codes.view(m, n // 32, 4, 8)
        lo = sum((c[:, :, k] & 3) << (2 * k) for k in range(4)).to(torch.uint8)
        hi = sum(((c[:, :, :, t] >> 2) & 1) << t for t in range(8)).to(torch.uint8)  # byte k: columns 8k..8k+7
        codes = torch.cat([lo, hi], 2).reshape(m, n * 3 // 8)
    kept_cols = kept = None
    if not bool(q.all()):
        cols = torch.arange(n).view(ng, g)[~q].reshape(-1)
        kept_cols, kept = cols, r.fp16_cols.float()
    return PackedState(codes.contiguous(), torch.stack([scale, offset], -1).contiguous(), bits, g, r.perm,
                       kept_cols, kept)


def packed_forward(st: PackedState, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    ext = extension()
    shape, dtype = x.shape, x.dtype
    x2 = x.reshape(-1, shape[-1]).float()
    if st.perm is not None:
        x2 = x2.index_select(1, st.perm)
    x2 = x2.contiguous()
    y = ext.packed_matmul(x2, st.codes, st.sz, st.bits, st.group_size, GEMV_MAX_BATCH, TILE_ROWS)
    if st.kept is not None:
        y += x2.index_select(1, st.kept_cols) @ st.kept.T
    if bias is not None:
        y += bias.float()
    return y.to(dtype).reshape(*shape[:-1], y.shape[-1])

