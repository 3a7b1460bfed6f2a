"""Serving targets (`--target`): what the format a checkpoint is meant for can carry, and the bits its files store.

A method searches only inside its target: the bit-widths the target's kernels run, one width per linear when
its format holds one per layer, float16 scales, a column permutation only where the format stores one, online
rotations only where the format can express them. ``stored_bits`` counts a linear as the exported files store
it (`interop.ct.layer_tensors`, `interop.gptq.layer_tensors`), so that a ``--bpw`` budget is the exported one.

* ``flexquant``: flexquant's own packed format, no constraint (mixed widths per group, log-coded scales, ...).
* ``vllm``: compressed-tensors ``pack-quantized``, the layout llm-compressor writes and vLLM serves with its
  WNA16 kernels, which run 4- and 8-bit weights only; per-layer config groups; no per-column group index, so no
  act-order permutation; all routed experts of a mixture-of-experts model at one width (transformers fuses them
  under one config group).
* ``gptqmodel``: the GPTQ layout with GPTQModel's per-module ``dynamic`` overrides (bits per linear), read by
  GPTQModel and by vLLM's ``gptq`` method (2, 3, 4 and 8 bits); ``g_idx`` carries act-order; no online rotation.
* ``gguf``: a GGUF file for llama.cpp (`interop.gguf`), each linear one of GGML's 32-weight block types whose grid
  is exactly flexquant's symmetric grid with a float16 scale per group: Q4_0, Q5_0, Q8_0 (4, 5, 8 bits; 4.5, 5.5,
  8.5 bits per weight as stored); group size 32 and symmetric grids forced; no column permutation, no online
  rotation. Linears whose rows are a multiple of 256 may also take the K-quants Q3_K and Q6_K (3 and 6 bits in
  groups of 16 whose scales are multiples of one float16 step per 256 columns: 3.4375 and 6.5625 bits per
  weight as stored; `quant.superblock`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FlexQuantError
from .superblock import SUPERBLOCK

KQUANT_GROUP = 16
KQUANT_BITS = {3: 110 * 8, 6: 210 * 8}  # width -> bits per 256-weight K-quant block (Q3_K, Q6_K)


def _words(values: int, bits: int) -> int:
    return -(-values * bits // 32) * 32


@dataclass(frozen=True)
class Target:
    name: str
    format: str | None  # the `flexquant export --format` it is meant for (None: flexquant's own)
    bits: tuple[int, ...] | None  # widths the serving kernels run (None: any)
    per_layer: bool  # one bit-width per linear
    permutation: bool  # an act-order column permutation can be stored (g_idx)
    online_rotation: bool  # an online input rotation can be expressed
    note: str
    group_size: int | None = None  # the one group size the format stores (None: any)
    sym: bool | None = None  # the grid symmetry the format stores (None: either)
    # One width for all routed experts: loaders that fuse the experts into 3-D tensors (transformers 5's
    # compressed-tensors path) read a single config group for them.
    shared_experts: bool = False

    def stored_bits(self, m: int, n: int, g: int, sym: bool, b: int) -> int:
        """Bits the exported files store for an m×n linear of width ``b`` (groups of ``g``), bias excluded."""
        ng = n // g
        if self.name == "vllm":  # weight_packed [m, ⌈n·b/32⌉], weight_scale fp16 [m, ng], zero points, weight_shape
            return m * _words(n, b) + 16 * m * ng + (0 if sym else _words(m, b) * ng) + 128
        if self.name == "gptqmodel":  # qweight [n·b/32, m], qzeros [ng, m·b/32] (always), scales fp16, g_idx int32
            return m * n * b + ng * m * b + 16 * m * ng + 32 * n
        if self.name == "gguf":  # per block of 32 weights: a float16 scale and 32 codes of b bits
            if g == KQUANT_GROUP:  # per 256 weights: Q3_K 110 bytes, Q6_K 210 bytes
                return m * n // SUPERBLOCK * KQUANT_BITS[b]
            return m * n * b + 16 * m * ng
        raise FlexQuantError(f"target {self.name!r} has no exported layout to count")

    def layer_options(self, n: int, widths: tuple[int, ...], group_sizes: tuple[int, ...]) -> list[tuple[int, int]]:
        """The (width, group size) pairs a linear with ``n`` input columns may take under a per-layer target:
        every width at every group size dividing n, plus, for gguf rows of a multiple of 256, Q3_K and Q6_K."""
        opts = [(b, g) for g in dict.fromkeys(group_sizes) if n % g == 0 for b in widths]
        if self.name == "gguf" and n % SUPERBLOCK == 0:
            opts += [(b, KQUANT_GROUP) for b in sorted(KQUANT_BITS)]
        return opts

    def superblock(self, group_size: int) -> int:
        """``GridConfig.superblock`` for a linear quantized at ``group_size`` under this target."""
        return SUPERBLOCK if self.name == "gguf" and group_size == KQUANT_GROUP else 0

    def candidates(self, wanted: tuple[int, ...]) -> tuple[int, ...]:
        """The bit-widths of ``wanted`` the target runs; an error naming the target's widths if none is left."""
        if self.bits is None:
            return wanted
        kept = tuple(b for b in wanted if b in self.bits)
        if not kept:
            raise FlexQuantError(f"--target {self.name} runs {'/'.join(map(str, self.bits))}-bit weights only "
                                 f"({self.note}); none of the candidate widths {wanted} is one: pass --candidates "
                                 f"{' '.join(map(str, self.bits))}")
        return kept


TARGETS = {
    "flexquant": Target("flexquant", None, None, False, True, True, "flexquant's own packed format"),
    "vllm": Target("vllm", "compressed-tensors", (4, 8), True, False, False,
                   "vLLM's compressed-tensors WNA16 kernels", shared_experts=True),
    "gptqmodel": Target("gptqmodel", "gptq", (2, 3, 4, 8), True, True, False,
                        "GPTQModel and vLLM's gptq kernels"),
    "gguf": Target("gguf", "gguf", (4, 5, 8), True, False, False, "llama.cpp's Q4_0 / Q5_0 / Q8_0 block types",
                   group_size=32, sym=True),
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise FlexQuantError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]
