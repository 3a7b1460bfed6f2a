"""Import of GPTQ and compressed-tensors checkpoints written by other tools (llm-compressor, AutoGPTQ,
GPTQModel, flexquant's own exporters), so that ``flexquant eval`` and ``info`` compare them with flexquant's
models on the same windows.

The foreign integer grids become flexquant `QuantLinear`s exactly (codes, zero points and scales as stored,
g_idx as a column permutation), so the model runs through flexquant's kernels. Only safetensors and JSON
are read, never pickles.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError, FlexQuantError
from ..format.checkpoint import attention_for
from ..models import get_spec
from ..nn.quant_linear import QuantLinear
from ..quant.pack import pack_bits
from . import ct, gptq
from .common import GridLayer, inside, one_line, read_json, shown

log = logging.getLogger(__name__)
READERS = {"gptq": gptq.read_layers, "compressed-tensors": ct.read_layers}
INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _present(f: Path) -> bool:
    return f.is_file() or f.is_symlink()  # a symlink is checked (and refused when it leads outside), not skipped


def _config(path: Path) -> dict | None:
    return read_json(path, "config.json") if _present(path / "config.json") else None


def _quantization_config(path: Path, cfg: dict) -> dict:
    qcfg = cfg.get("quantization_config") or {}
    if not isinstance(qcfg, dict):
        raise CheckpointError(f"{path / 'config.json'}: quantization_config is a JSON {type(qcfg).__name__}, "
                              "not an object; the file is corrupt")
    return qcfg


def foreign_format(path: str | Path) -> str | None:
    """"gptq" or "compressed-tensors" for a Hugging Face folder quantized in that format, else None."""
    path = Path(path)
    if not path.is_dir():
        return None
    cfg = _config(path) or {}
    method = _quantization_config(path, cfg).get("quant_method")
    if method is None and _present(path / "quantize_config.json"):
        method = "gptq"
    return method if isinstance(method, str) and method in READERS else None


def quant_settings(path: Path, cfg: dict) -> dict:
    qcfg = dict(_quantization_config(path, cfg))
    if _present(path / "quantize_config.json"):  # AutoGPTQ writes its settings here
        qcfg = {**read_json(path, "quantize_config.json"), **qcfg}
    return qcfg


def _shard(path: Path, name) -> Path:
    """The safetensors file the index names ``name``: inside ``path``, a .safetensors file, present."""
    if isinstance(name, str) and not name.endswith(".safetensors"):
        raise CheckpointError(f"{INDEX} names {name!r}, which is not a .safetensors file; flexquant reads weights "
                              "from safetensors only and never loads pickles: convert the checkpoint to safetensors")
    f = inside(path, name, INDEX)
    if not f.is_file():
        raise CheckpointError(f"{INDEX} names {shown(name)}, which is missing from {path}; "
                              "the checkpoint is incomplete")
    return f


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a Hugging Face folder (one file, or the shards its index names), each checked
    to lie inside the folder; only safetensors are ever read, never pickles."""
    if _present(path / INDEX):
        weight_map = read_json(path, INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{path / INDEX} has no weight_map (tensor name -> file); the index is corrupt")
        bad = [v for v in weight_map.values() if not isinstance(v, str)]
        if bad:
            raise CheckpointError(f"{INDEX} names {bad[0]!r} as a file, which is not a file name; the index is corrupt")
        return [_shard(path, name) for name in dict.fromkeys(weight_map.values())]
    if _present(path / "model.safetensors"):
        return [inside(path, "model.safetensors")]
    pickles = sorted(f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES)
    hint = (f" ({', '.join(pickles)} are pickles, which flexquant never loads: convert them to safetensors)"
            if pickles else "")
    raise CheckpointError(f"{path} has no model.safetensors or {INDEX}: flexquant reads weights from safetensors "
                          f"only{hint}")


def read_hf_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors ``files`` (from `weight_files`)."""
    out = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as sf:
                out.update({k: sf.get_tensor(k) for k in sf.keys()})
        except Exception as e:  # safetensors raises its own error types for malformed files
            raise CheckpointError(f"{f} could not be read as safetensors ({one_line(e)})") from e
    return out


def grid_to_tensors(layer: GridLayer) -> tuple[dict[str, torch.Tensor], bool]:
    """flexquant's packed tensors for a `GridLayer` (and whether the grid is symmetric)."""
    m, n = layer.shape
    g, b = layer.group_size, layer.bits
    perm = None
    codes = layer.codes
    if layer.g_idx is not None:
        gi = layer.g_idx.long()
        if gi.min() < 0 or gi.max() >= n // g or not bool((torch.bincount(gi, minlength=n // g) == g).all()):
            raise FlexQuantError(f"{layer.name}: g_idx does not put exactly {g} columns in each group; "
                                 "flexquant cannot represent this grouping")
        perm = torch.argsort(gi, stable=True)  # columns of group 0 first, then group 1, ...
        codes = codes[:, perm]
    t: dict[str, torch.Tensor] = {"group_bits": torch.full((n // g,), b, dtype=torch.uint8),
                                  f"qweight_b{b}": pack_bits(codes, b)}
    half = layer.scales.half()
    exact = bool(torch.equal(half.float(), layer.scales.float())) and bool(torch.isfinite(half).all())
    t["scales"] = half if exact else layer.scales.float()  # float32 scales are kept (and counted) as such
    if not layer.sym:
        t["zeros"] = layer.zeros.to(torch.uint8)
    if perm is not None:
        t["perm"] = perm.to(torch.int16 if n <= 2**15 else torch.int32)
    return {k: v.contiguous() for k, v in t.items()}, layer.sym


def stored_bits(tensors: dict[str, torch.Tensor], name: str) -> int:
    return sum(v.numel() * v.element_size() * 8 for k, v in tensors.items()
               if k.startswith(name + ".") and not k.endswith(".bias"))


def _skeleton(path: Path, cfg: dict):
    from transformers import AutoConfig

    from ..models.loader import meta_model

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path / 'config.json'} does not describe a model transformers can build "
                              f"({one_line(e)})") from e
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # build plain Linears; flexquant swaps in its own layers
    spec = get_spec(config.model_type)  # unsupported families fail with the list of supported ones
    config.use_cache = False
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float16"
    dtype = getattr(torch, str(name).replace("torch.", ""), torch.float16)
    model = meta_model(config, dtype=dtype, attn_implementation=attention_for(config.model_type))
    return model, config, dtype, spec


def read_foreign(path: str | Path):
    """(skeleton model, its config, dtype, format, `GridLayer`s, other tensors, file bits per layer)."""
    path = Path(path)
    fmt = foreign_format(path)
    if fmt is None:
        raise FlexQuantError(f"{path} is neither a flexquant checkpoint nor a GPTQ or compressed-tensors folder")
    cfg = _config(path)
    if cfg is None:
        raise CheckpointError(f"{path} has no config.json (the model's Hugging Face config); the checkpoint is "
                              "incomplete")
    qcfg = quant_settings(path, cfg)
    files = weight_files(path)  # every path checked before anything is built or read
    model, config, dtype, spec = _skeleton(path, cfg)
    tensors = read_hf_tensors(files)
    # configs and tensors are read under the file's names (a family's hub names: ModelSpec.checkpoint_names)
    linears = {spec.to_checkpoint(n): type(m).__name__ for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)}
    file_bits = {n: stored_bits(tensors, n) for n in linears}
    layers = READERS[fmt](qcfg, tensors, linears)
    if not layers:
        raise FlexQuantError(f"{path}: no quantized layers found for its {fmt} config; the checkpoint is incomplete")
    ours = spec.from_checkpoint
    file_bits = {ours(n): file_bits[n] for n in layers}
    layers = {ours(n): replace(layer, name=ours(n)) for n, layer in layers.items()}
    tensors = {ours(k): v for k, v in tensors.items()}
    return model, config, dtype, fmt, layers, tensors, file_bits


def load_foreign(path: str | Path, kernel: str | None = None):
    """(model, tokenizer, info) of a GPTQ / compressed-tensors folder; quantized linears are `QuantLinear`s."""
    from transformers import AutoTokenizer

    path = Path(path)
    model, config, dtype, fmt, layers, rest, file_bits = read_foreign(path)
    for name, layer in layers.items():
        t, sym = grid_to_tensors(layer)
        bias = None if layer.bias is None else layer.bias.to(dtype)
        q = QuantLinear(layer.shape[1], layer.shape[0], layer.group_size, sym, t, bias)
        q.set_kernel(kernel)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    rest = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in rest.items()}
    _, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    if unexpected:
        raise CheckpointError(f"{path}: tensors {unexpected[:5]} do not belong to the {config.model_type} "
                              "architecture or to its quantized layers")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still_meta:
        raise CheckpointError(f"{path}: tensors missing from the checkpoint: {still_meta[:5]}")
    tok = None
    if (path / "tokenizer_config.json").is_file():
        _check_links(path)  # transformers picks the tokenizer files it reads: none may lead outside the folder
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path}: the tokenizer could not be loaded ({one_line(e)}); the tokenizer "
                                  "files are corrupt or incomplete") from e
    return model.eval(), tok, info_from(path, fmt, layers, file_bits)


def _check_links(path: Path) -> None:
    """Every entry of ``path`` (and of its subfolders, one level down) must lie inside it, symlinks resolved."""
    for f in path.iterdir():
        inside(path, f.name)
        if f.is_dir():
            for g in f.iterdir():
                inside(path, f"{f.name}/{g.name}")


def info_from(path: Path, fmt: str, layers: dict[str, GridLayer], file_bits: dict[str, int]) -> dict:
    weights = {n: layer.shape[0] * layer.shape[1] for n, layer in layers.items()}
    total = sum(weights.values())
    return {
        "path": str(path), "format": fmt,
        "bpw": sum(file_bits.values()) / total,  # bits the foreign file stores for these layers
        "quantized_weights": total,
        "modules": {n: {"in_features": layer.shape[1], "out_features": layer.shape[0],
                        "group_size": layer.group_size, "sym": layer.sym, "bits": [layer.bits],
                        "act_order": layer.g_idx is not None, "bpw": round(file_bits[n] / weights[n], 6)}
                    for n, layer in layers.items()},
    }


def foreign_info(path: str | Path) -> dict:
    """What ``flexquant info`` shows for a foreign checkpoint (no model weights are materialised)."""
    path = Path(path)
    _, _, _, fmt, layers, _, file_bits = read_foreign(path)
    info = info_from(path, fmt, layers, file_bits)
    root = path.resolve()
    info["file_bytes"] = sum(f.stat().st_size for f in path.iterdir()
                             if f.is_file() and f.resolve().is_relative_to(root))  # not what links lead to
    return info
