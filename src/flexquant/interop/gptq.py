"""GPTQ checkpoints in the AutoGPTQ / GPTQModel layout (``quant_method: "gptq"``), read by transformers
(through optimum + gptqmodel), vLLM and SGLang.

Per quantized linear (out m × in n, b bits, groups of g):
  ``qweight`` int32 [n·b/32, m]: codes packed along the input dimension, 32 codes in b words, code i
              at bit i·b (for 3 bits the codes straddle words, as AutoGPTQ packs them);
  ``qzeros``  int32 [n/g, m·b/32]: zero points packed along the output dimension, stored minus one
              in the original ("gptq", v1) checkpoint format, as they are in "gptq_v2";
  ``scales``  float16 [n/g, m];
  ``g_idx``   int32 [n]: the group of each input column (act-order: not i // g);
  ``bias``    [m] where the layer has one.
W[:, i] = scales[g_idx[i]] · (q[i] − z[g_idx[i]]). Per-layer differences from the model-wide setting (bits,
group size, symmetry) are GPTQModel ``dynamic`` overrides, which ``GPTQModel.load`` and vLLM read (transformers'
GPTQ integration through optimum does not: it sizes every layer by the model-wide setting); layers left
unquantized are named in ``modules_in_block_to_quantize`` (optimum) and GPTQModel's ``dynamic`` skips.
"""

from __future__ import annotations

import logging
import re

import torch

from .._version import __version__
from ..errors import CheckpointError, FlexQuantError
from ..quant.pack import pack_bits, unpack_bits
from .common import (
    DTYPES,
    EXPORT_INFO,
    GridLayer,
    Source,
    cast_rest,
    check_architecture,
    export_config,
    export_info,
    grid_bpw,
    stored_bits,
    write_folder,
)

log = logging.getLogger(__name__)
FORMAT = "gptq"
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def _pack_rows(codes: torch.Tensor, b: int, what: str, name: str) -> torch.Tensor:
    """Codes [r, N] packed along N into int32 [r, N·b/32] (N·b must be a whole number of words)."""
    N = codes.shape[1]
    if (N * b) % 32:
        raise FlexQuantError(f"{name}: GPTQ packs {what} into whole int32 words, but {N} values of {b} bits "
                             f"are {N * b} bits; export with --format compressed-tensors")
    return pack_bits(codes, b)[:, : N * b // 32]


def _unpack_rows(packed: torch.Tensor, b: int, N: int) -> torch.Tensor:
    words = (N + 31) // 32 * b
    return unpack_bits(torch.nn.functional.pad(packed, (0, words - packed.shape[1])), b, N)


def _lift_zero_points(layer: GridLayer, codes: torch.Tensor, zeros: torch.Tensor):
    """The v1 format stores zero − 1, so a zero point of 0 cannot be written. Where the group's codes leave
    room (no code at the top of the grid), (c, z) -> (c + 1, 1) is the same weight; elsewhere: an error."""
    if not bool((zeros == 0).any()):
        return codes, zeros
    m, n = codes.shape
    gi = layer.group_index().long()
    top = torch.zeros(zeros.shape, dtype=torch.int64).scatter_reduce_(1, gi.expand(m, n), codes.long(), "amax")
    lift = (zeros == 0) & (top < 2**layer.bits - 1)
    stuck = int(((zeros == 0) & ~lift).sum())
    if stuck:
        raise FlexQuantError(
            f"{layer.name}: {stuck} groups have a zero point of 0 and use the whole {layer.bits}-bit range, which the "
            "original GPTQ format (it stores zero − 1) cannot hold; pass --gptq-format gptq_v2 (GPTQModel reads it), "
            "export with --format compressed-tensors, or requantize with --sym")
    return (codes.long() + lift.long()[:, gi]).to(torch.uint8), zeros + lift.long()


def layer_tensors(layer: GridLayer, checkpoint_format: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    m, n = layer.shape
    b = layer.bits
    zeros = layer.zeros.to(torch.int64)
    codes = layer.codes
    if checkpoint_format == "gptq":
        codes, zeros = _lift_zero_points(layer, codes, zeros)
        zeros = zeros - 1
    if int(zeros.max()) >= 2**b:
        raise FlexQuantError(f"{layer.name}: a stored zero point of {int(zeros.max())} does not fit {b} bits")
    out = {
        "qweight": _pack_rows(codes, b, "the codes of each output row", layer.name).T.contiguous(),
        "qzeros": _pack_rows(zeros.T.contiguous(), b, "the zero points of each group", layer.name).contiguous(),
        "scales": layer.scales.T.contiguous().half(),
        "g_idx": layer.group_index().to(torch.int32).contiguous(),
    }
    if layer.bias is not None:
        out["bias"] = layer.bias.to(dtype)
    return out


def _key(layer: GridLayer) -> tuple:
    return layer.bits, layer.group_size, layer.sym


def _block_modules(src: Source) -> list[list[str]] | None:
    """optimum's ``modules_in_block_to_quantize`` (block-relative names by linear group) when some linears
    are written dense; None when all are quantized. The same set must be quantized in every block."""
    if not src.dense:
        return None
    from ..models import get_spec

    spec = get_spec(src.config.get("model_type"), src.config)
    per_block: dict[str, set[str]] = {}
    for name in src.grids:
        block, _, rel = name.removeprefix(spec.layers + ".").partition(".")
        per_block.setdefault(block, set()).add(rel)
    sets = {frozenset(v) for v in per_block.values()}
    if len(sets) != 1 or len(per_block) != src.config.get("num_hidden_layers"):
        raise FlexQuantError("the GPTQ format (through optimum) leaves the same linears unquantized in every block; "
                             "here the dense (online-rotation) layers differ between blocks: export with "
                             "--format compressed-tensors")
    keep = next(iter(sets))
    return [[n for n in group if n in keep] for group in spec.linear_groups if any(n in keep for n in group)]


def quantize_config(src: Source, checkpoint_format: str) -> dict:
    """The model-wide setting (the most common one), GPTQModel ``dynamic`` overrides (``+:^name$``) for linears
    with another bit-width, group size or symmetry (GPTQModel and vLLM's gptq methods read them), and layers
    written dense named in ``modules_in_block_to_quantize`` (optimum) and as ``dynamic`` skips."""
    counts: dict[tuple, int] = {}
    for layer in src.grids.values():
        counts[_key(layer)] = counts.get(_key(layer), 0) + 1
    bits, group_size, sym = max(counts, key=lambda k: (counts[k], k))
    dynamic = {f"+:^{re.escape(src.hub(name))}$": {"bits": layer.bits, "group_size": layer.group_size, "sym": layer.sym}
               for name, layer in src.grids.items() if _key(layer) != (bits, group_size, sym)}
    if dynamic:
        log.warning("%d linears differ from the model-wide %d-bit setting: written as GPTQModel `dynamic` overrides, "
                    "which GPTQModel.load and vLLM read; transformers' GPTQ integration (optimum) and AutoGPTQ do not",
                    len(dynamic), bits)
    qc = {
        "bits": bits, "group_size": group_size, "sym": sym,
        "desc_act": any(layer.g_idx is not None for layer in src.grids.values()),
        "static_groups": False, "true_sequential": True, "lm_head": False,
        "damp_percent": ((src.qc.get("quant_config") or {}).get("gptq") or {}).get("damp", 0.01),
        "quant_method": "gptq", "checkpoint_format": checkpoint_format,
        "meta": {"quantizer": [f"flexquant:{__version__}"]},
    }
    blocks = _block_modules(src)
    if blocks is not None:
        qc["modules_in_block_to_quantize"] = blocks
        dynamic.update({f"-:^{re.escape(src.hub(name))}$": {} for name in src.dense})
    if dynamic:
        qc["dynamic"] = dynamic
    return qc


def export(src: Source, out, dtype: str | None = None, overwrite: bool = False,
           checkpoint_format: str = "gptq") -> dict:
    """Write ``src`` as a GPTQ folder (``checkpoint_format`` "gptq" = v1, or "gptq_v2")."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise FlexQuantError(f"gptq checkpoint format {checkpoint_format!r} must be one of {CHECKPOINT_FORMATS}")
    dtype = dtype or src.dtype
    tdtype = DTYPES[dtype]
    check_architecture(src)
    if dtype != "float16":
        log.info("GPTQ kernels usually run in float16; this export keeps the %s model dtype (pass --dtype float16 "
                 "to change it)", dtype)
    tensors = cast_rest(src, tdtype)
    stored = 0
    for name, layer in src.grids.items():
        own = layer_tensors(layer, checkpoint_format, tdtype)
        stored += stored_bits(own)
        tensors.update({f"{name}.{k}": v for k, v in own.items()})
    for name, layer in src.dense.items():
        tensors[f"{name}.weight"] = layer.weight.to(tdtype)
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.to(tdtype)
    qc = quantize_config(src, checkpoint_format)
    path = write_folder(out, src, tensors,
                        {"config.json": export_config(src, dtype, qc), "quantize_config.json": qc,
                         EXPORT_INFO: export_info(src, FORMAT, dtype, "dense" if src.dense else "none")},
                        overwrite=overwrite)
    return {"out": str(path), "format": FORMAT, "checkpoint_format": checkpoint_format, "dtype": dtype,
            "quantized_layers": len(src.grids), "dense_layers": len(src.dense), "bpw": grid_bpw(src, stored)}


# ----- reading GPTQ checkpoints written by AutoGPTQ, GPTQModel, optimum or flexquant -----

def settings_for(name: str, qc: dict) -> dict | None:
    """bits/group_size/sym of module ``name`` after GPTQModel's ``dynamic`` rules (None: not quantized)."""
    s = {"bits": qc["bits"], "group_size": qc.get("group_size", 128), "sym": qc.get("sym", True)}
    for pattern, override in (qc.get("dynamic") or {}).items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], name):
                return None
            continue
        if re.match(pattern[2:] if pattern.startswith("+:") else pattern, name):
            s.update({k: v for k, v in override.items() if k in s})
    return s


def read_layers(qc: dict, tensors: dict[str, torch.Tensor], linears: dict[str, str]) -> dict[str, GridLayer]:
    """`GridLayer`s of the GPTQ-packed linears; their tensors are removed from ``tensors``."""
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in CHECKPOINT_FORMATS:
        raise FlexQuantError(f"GPTQ checkpoint_format {fmt!r} is not supported; flexquant reads {CHECKPOINT_FORMATS}")
    layers = {}
    for name in linears:
        if f"{name}.qweight" not in tensors:
            continue
        s = settings_for(name, qc)
        lacking = [f"{name}.{k}" for k in ("qzeros", "scales") if f"{name}.{k}" not in tensors]
        if lacking:
            raise CheckpointError(f"{name} has a qweight but no {', '.join(lacking)}; the GPTQ checkpoint is "
                                 "incomplete")
        qweight = tensors.pop(f"{name}.qweight")
        qzeros, scales = tensors.pop(f"{name}.qzeros"), tensors.pop(f"{name}.scales")
        g_idx = tensors.pop(f"{name}.g_idx", None)
        b = int((s or qc)["bits"])
        if b not in (2, 3, 4, 8):
            raise FlexQuantError(f"{name}: {b}-bit GPTQ weights are not supported (2, 3, 4 or 8)")
        m = scales.shape[1]
        n = qweight.shape[0] * 32 // b
        ng = scales.shape[0]
        if n % ng or qzeros.shape != (ng, m * b // 32):
            raise FlexQuantError(f"{name}: qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)} and scales "
                                 f"{list(scales.shape)} do not fit {b}-bit GPTQ; the checkpoint is corrupt")
        g = n // ng
        declared = (s or qc).get("group_size", 128)
        if declared not in (g, -1 if g == n else None):
            raise CheckpointError(f"{name}: the GPTQ config says group_size {declared!r} but the tensors hold groups "
                                 f"of {g} columns; the checkpoint's quantize_config is wrong or was edited")
        codes = _unpack_rows(qweight.T.contiguous(), b, n).to(torch.uint8)
        zeros = _unpack_rows(qzeros, b, m).T.contiguous()  # [m, ng]
        if fmt == "gptq":  # v1 stores zero − 1; its kernels add the 1 back (a stored 2^b − 1 means 2^b)
            zeros = zeros + 1
        if int(zeros.max()) > 255:
            raise FlexQuantError(f"{name}: an 8-bit zero point of 256 (the v1 format's zero − 1 = 255) does not fit "
                                 "flexquant's byte zero points")
        if g_idx is not None:
            g_idx = g_idx.to(torch.int32)
            if torch.equal(g_idx, torch.arange(n, dtype=torch.int32) // g):
                g_idx = None
        sym = bool(s["sym"]) if s else False
        layers[name] = GridLayer(name, b, g, sym and bool((zeros == 2 ** (b - 1)).all()), codes,
                                 scales.float().T.contiguous(), zeros.to(torch.uint8), g_idx,
                                 tensors.pop(f"{name}.bias", None))
    return layers
