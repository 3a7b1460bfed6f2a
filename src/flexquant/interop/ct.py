"""compressed-tensors "pack-quantized" checkpoints (what llm-compressor writes for W4A16-style schemes).

Per quantized linear (out m × in n, groups of g input columns, b bits):
  ``weight_packed``     int32 [m, ceil(n·b/32)]: the codes q + 2^(b−1) (q is the signed code), 32
                        consecutive codes in b words, code i at bit i·b (the same dense layout as
                        flexquant's `pack_bits`);
  ``weight_scale``      [m, n/g] in the model dtype;
  ``weight_zero_point`` int32 [ceil(m·b/32), n/g] (asymmetric only): zero points + 2^(b−1), packed
                        the same way along the output dimension;
  ``weight_shape``      int64 [2] = (m, n).
W = (q − zp)·scale, which is flexquant's (c − z)·s with c = q + 2^(b−1), z = zp + 2^(b−1).
compressed-tensors 0.19+ has no per-column group index, so act-order permutations cannot be written.
"""

from __future__ import annotations

import logging
import re

import torch

from ..errors import FlexQuantError
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
FORMAT = "compressed-tensors"
CT_FORMAT = "pack-quantized"
CT_VERSION = "0.19.0"  # the oldest compressed-tensors with this dense packing and without g_idx
SERVING_BITS = (4, 8)  # vLLM's int weight-only kernels for compressed-tensors


def pack_dim1(codes: torch.Tensor, b: int) -> torch.Tensor:
    """Codes [r, N] -> int32 [r, ceil(N·b/32)] (flexquant's layout, trimmed of whole padding words)."""
    N = codes.shape[1]
    return pack_bits(codes, b)[:, : (N * b + 31) // 32].contiguous()


def unpack_dim1(packed: torch.Tensor, b: int, N: int) -> torch.Tensor:
    words = (N + 31) // 32 * b
    packed = torch.nn.functional.pad(packed, (0, words - packed.shape[1]))
    return unpack_bits(packed, b, N)


def weights_args(layer: GridLayer) -> dict:
    return {"num_bits": layer.bits, "type": "int", "symmetric": layer.sym, "strategy": "group",
            "group_size": layer.group_size, "dynamic": False, "observer": "minmax"}


EXPERT = re.compile(r".*\.experts\.\d+\.")  # a routed expert's linear in the hub layout (not shared_experts)


def _scheme_key(layer: GridLayer) -> tuple:
    return layer.bits, layer.group_size, layer.sym


def quantization_config(src: Source) -> dict:
    """One config group per distinct (bits, group size, symmetry); a uniform model gets the single
    ``targets: ["Linear"]`` group llm-compressor writes, with every other Linear in ``ignore``."""
    from transformers import AutoConfig

    from ..models.loader import meta_model

    schemes: dict[tuple, list[str]] = {}
    for name, layer in src.grids.items():
        schemes.setdefault(_scheme_key(layer), []).append(name)
    skeleton = meta_model(AutoConfig.from_pretrained(src.path))
    linears = [n for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)]
    groups = {}
    hub = {k: sorted(map(src.hub, names)) for k, names in schemes.items()}  # the names the export's files use
    experts = {k: [n for n in names if EXPERT.search(n)] for k, names in hub.items()}
    expert_schemes = {k for k, names in experts.items() if names}
    if len(expert_schemes) > 1:
        log.warning("the routed experts use %d schemes (bits, group size, symmetry): vLLM reads them per layer, but "
                    "transformers fuses all experts under one config group and would load them wrong; quantize "
                    "with --target vllm (one width for every expert) for a checkpoint transformers loads",
                    len(expert_schemes))
    for i, (k, names) in enumerate(sorted(schemes.items(), key=lambda kv: -len(kv[1]))):
        # experts under one regex target (how transformers finds the experts' group), other linears by name
        shared = experts[k] and len(expert_schemes) == 1
        targets = ["Linear"] if len(schemes) == 1 else [n for n in hub[k] if n not in experts[k]] + (
            [f"re:{EXPERT.pattern}"] if shared else experts[k])
        groups[f"group_{i}"] = {"targets": targets, "weights": weights_args(src.grids[names[0]]),
                                "input_activations": None, "output_activations": None, "format": CT_FORMAT}
    return {
        "quant_method": "compressed-tensors", "format": CT_FORMAT, "quantization_status": "compressed",
        "config_groups": groups, "ignore": sorted(src.hub(n) for n in linears if n not in src.grids),
        "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {},
        "transform_config": {}, "version": CT_VERSION,
    }


def layer_tensors(layer: GridLayer, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    m, n = layer.shape
    out = {"weight_packed": pack_dim1(layer.codes, layer.bits),
           "weight_scale": layer.scales.to(scale_dtype),
           "weight_shape": torch.tensor([m, n], dtype=torch.int64)}
    if not layer.sym:
        if int(layer.zeros.max()) >= 2**layer.bits:
            raise FlexQuantError(f"{layer.name}: a zero point of {int(layer.zeros.max())} does not fit the "
                                 f"{layer.bits}-bit zero points of {FORMAT}")
        out["weight_zero_point"] = pack_dim1(layer.zeros.T.contiguous(), layer.bits).T.contiguous()
    return out


def export(src: Source, out, dtype: str | None = None, overwrite: bool = False) -> dict:
    """Write ``src`` as a compressed-tensors pack-quantized folder. Returns a summary."""
    dtype = dtype or src.dtype
    tdtype = DTYPES[dtype]
    perm = [n for n, layer in src.grids.items() if layer.g_idx is not None]
    if perm:
        raise FlexQuantError(
            f"{src.path} cannot be exported to {FORMAT}: {len(perm)} layers ({', '.join(perm[:3])}, ...) use an "
            "act-order column permutation, and compressed-tensors (0.19 and later) has no per-column group index "
            "(g_idx) to express it; export with --format gptq (which has g_idx), or requantize with --no-act-order "
            "(FlexibleLLM: also --protect none)")
    check_architecture(src)
    if dtype == "bfloat16":
        log.warning("bfloat16 export: the float16 scales are rounded to bfloat16 (relative error up to 2^-9)")
    odd = sorted({layer.bits for layer in src.grids.values()} - set(SERVING_BITS))
    if odd:
        log.warning("%s-bit layers: transformers loads them, but vLLM's compressed-tensors int kernels take "
                    "4 and 8 bits only", "/".join(map(str, odd)))
    tensors = cast_rest(src, tdtype)
    stored = 0
    for name, layer in src.grids.items():
        own = layer_tensors(layer, tdtype)
        stored += stored_bits(own)
        tensors.update({f"{name}.{k}": v for k, v in own.items()})
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.to(tdtype)
    for name, layer in src.dense.items():
        tensors[f"{name}.weight"] = layer.weight.to(tdtype)
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.to(tdtype)
    qcfg = quantization_config(src)
    path = write_folder(out, src, tensors,
                        {"config.json": export_config(src, dtype, qcfg),
                         EXPORT_INFO: export_info(src, FORMAT, dtype, "dense" if src.dense else "none")},
                        overwrite=overwrite)
    return {"out": str(path), "format": FORMAT, "dtype": dtype, "quantized_layers": len(src.grids),
            "dense_layers": len(src.dense), "config_groups": len(qcfg["config_groups"]), "bpw": grid_bpw(src, stored)}


# ----- reading checkpoints written by compressed-tensors / llm-compressor -----

def _matches(name: str, target: str, cls_name: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target in (name, cls_name)


def scheme_for(name: str, cls_name: str, qcfg: dict) -> dict | None:
    """The weights args of the config group that targets module ``name`` (None if ignored or untargeted)."""
    if any(_matches(name, t, cls_name) for t in qcfg.get("ignore") or []):
        return None
    found = None
    for gname, group in qcfg.get("config_groups", {}).items():
        if any(_matches(name, t, cls_name) for t in group.get("targets", [])):
            found = (gname, group)
    if found is None:
        return None
    gname, group = found
    if group.get("input_activations") or group.get("output_activations"):
        raise FlexQuantError(f"config group {gname} also quantizes activations; flexquant imports weight-only "
                             "int schemes (W4A16-style) only")
    return group.get("weights")


def read_layers(qcfg: dict, tensors: dict[str, torch.Tensor], linears: dict[str, str]) -> dict[str, GridLayer]:
    """`GridLayer`s of the pack-quantized linears; their tensors are removed from ``tensors``.

    ``linears``: module name -> class name of every Linear of the architecture.
    """
    fmt = qcfg.get("format")
    if qcfg.get("transform_config"):
        raise FlexQuantError("this compressed-tensors checkpoint has online transforms (transform_config); "
                             "flexquant cannot apply them")
    layers = {}
    for name, cls_name in linears.items():
        if f"{name}.weight_packed" not in tensors:
            if f"{name}.weight" in tensors and f"{name}.weight_scale" in tensors:
                raise FlexQuantError(f"{name} is stored as {fmt or 'an unpacked'} format; flexquant reads "
                                     f"{CT_FORMAT} (int weights packed into int32) only")
            continue
        w = scheme_for(name, cls_name, qcfg)
        if w is None:
            raise FlexQuantError(f"{name} has packed weights but no config group targets it; the config is corrupt")
        if w.get("type", "int") != "int":
            raise FlexQuantError(f"{name}: {w.get('type')} weights are not supported; flexquant reads int schemes")
        b = int(w["num_bits"])
        m, n = (int(v) for v in tensors.pop(f"{name}.weight_shape").tolist())
        scale = tensors.pop(f"{name}.weight_scale")
        strategy = w.get("strategy") or ("group" if w.get("group_size") else "tensor")
        if strategy not in ("group", "channel"):
            raise FlexQuantError(f"{name}: strategy {strategy!r} is not supported; flexquant reads group and "
                                 "channel strategies")
        if scale.shape[0] != m or n % scale.shape[1]:
            raise FlexQuantError(f"{name}: weight_scale {list(scale.shape)} does not fit the weight shape {[m, n]}")
        g = n // scale.shape[1]
        if strategy == "group" and int(w["group_size"]) != g:
            raise FlexQuantError(f"{name}: group_size {w['group_size']} does not match weight_scale "
                                 f"{list(scale.shape)}")
        codes = unpack_dim1(tensors.pop(f"{name}.weight_packed"), b, n).to(torch.uint8)
        sym = bool(w.get("symmetric", True))
        zp = tensors.pop(f"{name}.weight_zero_point", None)
        if sym:
            zeros = torch.full(scale.shape, 2 ** (b - 1), dtype=torch.uint8)
        elif zp is None:
            raise FlexQuantError(f"{name}: asymmetric scheme without weight_zero_point; the checkpoint is incomplete")
        elif zp.dtype == torch.int32:  # packed along the output dimension
            zeros = unpack_dim1(zp.T.contiguous(), b, m).T.to(torch.uint8)
        else:  # unpacked signed zero points
            zeros = (zp.to(torch.int32) + 2 ** (b - 1)).to(torch.uint8)
        g_idx = tensors.pop(f"{name}.weight_g_idx", None)  # written by compressed-tensors before 0.19
        if g_idx is not None and bool((g_idx < 0).any()):
            g_idx = None
        layers[name] = GridLayer(name, b, g, sym, codes.contiguous(), scale.float(), zeros.contiguous(),
                                 None if g_idx is None else g_idx.to(torch.int32), tensors.pop(f"{name}.bias", None))
    return layers
