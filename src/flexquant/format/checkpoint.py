"""Packed checkpoints: ``model.safetensors`` + ``quant_config.json`` (+ HF config and tokenizer).

Written atomically: everything goes to a temporary sibling folder that is renamed into place, so
an interrupted save never leaves a half-written checkpoint. ``quant_config.json`` records the
format version, the library version, per-module settings and sha256 checksums of the tensor file;
loading verifies them and reads tensors from safetensors only (no pickle).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .._version import __version__
from ..actquant import runtime as actquant
from ..atomic import atomic_folder
from ..errors import CheckpointError
from ..models.builtin import sha256_file
from ..nn.quant_linear import QuantLinear

log = logging.getLogger(__name__)
# 2: optional compact metadata (scale_codes + scale_base, zeros_b4); version-1 checkpoints still load.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
QUANT_CONFIG = "quant_config.json"
TENSORS = "model.safetensors"


def _state_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """All persistent tensors, with tied (shared-storage) duplicates dropped."""
    state, seen = {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype) if t.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = name
        state[name] = t.detach().contiguous().cpu()
    return state


def save_checkpoint(model, tokenizer, path: str | Path, meta: dict, overwrite: bool = False,
                    extras: Callable[[Path], None] | None = None) -> Path:
    """Write a packed model to ``path`` atomically. ``meta`` goes into quant_config.json; ``extras(folder)``
    writes further files (recipe, report) into the folder before it is renamed into place."""
    with atomic_folder(path, overwrite, QUANT_CONFIG, "flexquant checkpoint") as tmp:
        modules = {
            name: {"in_features": m.in_features, "out_features": m.out_features,
                   "group_size": m.group_size, "sym": m.sym, "bias": m.bias is not None,
                   "bits": sorted(set(m.group_bits.tolist())), "bpw": round(m.bpw, 6),
                   "rotation_order": m.rotation_order}
            for name, m in model.named_modules() if isinstance(m, QuantLinear)
        }
        save_file(_state_for_save(model), tmp / TENSORS, metadata={"format": "pt", "flexquant": str(FORMAT_VERSION)})
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        qc = {
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "torch_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "modules": modules,
            "checksums": {TENSORS: sha256_file(tmp / TENSORS)},
            **meta,
        }
        runtime = getattr(model, actquant.ATTRIBUTE, None)
        if runtime is not None:  # online transforms + activation/KV quantizers, re-attached by load
            qc["actquant"] = {**runtime.describe(), "stored_bits": runtime.stored_bits()}
        (tmp / QUANT_CONFIG).write_text(json.dumps(qc, indent=2))
        if extras is not None:
            extras(tmp)
    return Path(path)


def read_quant_config(path: str | Path) -> dict:
    path = Path(path)
    f = path / QUANT_CONFIG
    if not f.is_file():
        raise CheckpointError(f"{path} is not a flexquant checkpoint: {QUANT_CONFIG} is missing")
    try:
        qc = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON ({e}); the checkpoint is corrupted") from e
    version = qc.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}; this flexquant reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}: upgrade flexquant or re-quantize"
        )
    return qc


def read_tensors(path: str | Path, qc: dict, verify: bool = True) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, after checking the file against the recorded sha256."""
    f = Path(path) / TENSORS
    if not f.is_file():
        raise CheckpointError(f"{path} is missing {TENSORS}; the checkpoint is incomplete")
    if verify:
        want = qc.get("checksums", {}).get(TENSORS)
        if want is None or sha256_file(f) != want:
            raise CheckpointError(
                f"{f} does not match the checksum in {QUANT_CONFIG}: the file is truncated or was modified; "
                "re-save or re-download the checkpoint"
            )
    try:
        with safe_open(f, framework="pt") as sf:
            return {k: sf.get_tensor(k) for k in sf.keys()}
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise CheckpointError(f"{f} could not be read as safetensors ({e})") from e


def load_checkpoint(path: str | Path, kernel: str | None = None, verify: bool = True):
    """(model, tokenizer, quant_config) of a packed checkpoint; linears are `QuantLinear`s."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    qc = read_quant_config(path)
    tensors = read_tensors(path, qc, verify)
    dtype = getattr(torch, qc.get("torch_dtype", "float32"))
    config = AutoConfig.from_pretrained(path)
    config.use_cache = False
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    for name, spec in qc["modules"].items():
        prefix = name + "."
        own = {k[len(prefix):]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)}
        bias = own.pop("bias", None)
        if "group_bits" not in own:
            raise CheckpointError(f"{path}: tensors of quantized module {name} are missing")
        q = QuantLinear(spec["in_features"], spec["out_features"], spec["group_size"], spec["sym"], own, bias,
                        spec.get("rotation_order", 0))
        q.set_kernel(kernel)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    runtime = None
    if qc.get("actquant"):  # its tensors are in the file: build the skeleton before loading them
        runtime = actquant.ActQuantRuntime.from_description(qc["actquant"])
        setattr(model, actquant.ATTRIBUTE, runtime)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still_meta:
        raise CheckpointError(f"{path}: tensors missing from {TENSORS}: {still_meta[:5]}")
    if runtime is not None:
        actquant.install(model, runtime)
    tok = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model.eval(), tok, qc
