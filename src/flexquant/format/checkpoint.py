"""Packed checkpoints: safetensors shards (``model-0000k-of-0000n.safetensors``, one per decoder block and one
for the rest, with ``model.safetensors.index.json``) + ``quant_config.json`` (+ HF config and tokenizer).

Written atomically: everything goes to a temporary sibling folder that is renamed into place, so an
interrupted save never leaves a half-written checkpoint. A streamed run writes each block's shard as the block
is finished (`CheckpointWriter`), so the packed model never sits in memory whole. ``quant_config.json``
records the format version, the library version, per-module settings and the sha256 of every shard;
``manifest.json`` (format 4) the sha256 of every file that decides decoding (`format.validate`). Loading verifies
them, checks each module's record against its tensors and every tensor for NaN/inf, and reads tensors from
safetensors only (no pickle). Formats 1-3 (without a manifest) still load.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from .._version import __version__
from ..actquant import runtime as actquant
from ..atomic import atomic_folder, recover
from ..errors import CheckpointError, FlexQuantError
from ..models.builtin import sha256_file
from ..nn.quant_linear import QuantLinear
from ..pipeline.progress import trim_heap
from ..tensorio import TensorFiles, all_finite, write_file, write_stream
from .validate import (
    DTYPES,
    MANIFEST,
    check_finite,
    check_layout,
    check_packed,
    read_manifest,
    torch_dtype,
    verify_manifest,
    write_manifest,
)

log = logging.getLogger(__name__)
# 2: optional compact metadata (scale_codes + scale_base, zeros_b4); 3: sharded by block; 4: manifest.json of
# every decoding-relevant file. 1-3 still load.
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
QUANT_CONFIG = "quant_config.json"
TENSORS = "model.safetensors"  # the single tensor file of formats 1-2
INDEX = "model.safetensors.index.json"
PROGRESS = "progress.json"  # in an unfinished run's folder: what `--resume` continues from


def shard_name(k: int, n: int) -> str:
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def _state_for_save(module: torch.nn.Module, prefix: str = "", skip: str | None = None) -> dict[str, torch.Tensor]:
    """The module's persistent tensors (names with ``prefix``), tied (shared-storage) duplicates dropped, those
    under ``skip`` (a child path) and those still on the meta device left out."""
    state, seen = {}, set()
    for name, t in module.state_dict().items():
        if (skip and name.startswith(skip + ".")) or t.is_meta:
            continue
        key = (t.data_ptr(), t.shape, t.dtype) if t.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        state[prefix + name] = t.detach().contiguous().cpu()
    return state


def module_records(module: torch.nn.Module, prefix: str = "", skip: str | None = None) -> dict[str, dict]:
    """quant_config.json's record of each `QuantLinear` under ``module`` (paths with ``prefix``; those under the
    child path ``skip`` left out)."""
    return {
        prefix + name: {"in_features": m.in_features, "out_features": m.out_features, "group_size": m.group_size,
                        "sym": m.sym, "bias": m.bias is not None,
                        "bits": sorted(set(m.packed_tensors()["group_bits"].tolist())),  # (refused when lean)
                        "bpw": round(m.bpw, 6), "rotation_order": m.rotation_order}
        for name, m in module.named_modules()
        if isinstance(m, QuantLinear) and not (skip and name.startswith(skip + "."))
    }


class CheckpointWriter:
    """Writes a checkpoint shard by shard into ``folder`` (a temporary one that the caller renames into place):
    `add` one block's tensors as shard k of n, then `finish` with the rest of the model."""

    def __init__(self, folder: Path, shards: int):
        self.folder, self.shards = Path(folder), shards
        self.weight_map: dict[str, str] = {}
        self.checksums: dict[str, str] = {}
        self.modules: dict[str, dict] = {}
        self.dtype: str | None = None

    def add(self, k: int, module: torch.nn.Module, prefix: str, skip: str | None = None) -> None:
        """Write ``module``'s tensors (paths ``prefix`` + name) as shard ``k``."""
        tensors = _state_for_save(module, prefix, skip)
        name = shard_name(k, self.shards)
        self.checksums[name] = write_file(self.folder / name, tensors,
                                          {"format": "pt", "flexquant": str(FORMAT_VERSION)})
        self.weight_map.update(dict.fromkeys(tensors, name))
        self.modules.update(module_records(module, prefix, skip))
        floats = [t.dtype for t in module.parameters() if t.is_floating_point() and not t.is_meta]
        self.dtype = self.dtype or (str(floats[0]).replace("torch.", "") if floats else None)

    def add_stream(self, k: int, layout: list, stream) -> None:
        """Write shard ``k`` from tensors that exist one at a time (`tensorio.write_stream`): the ends of a
        streamed model, so that only one of them is in memory while the shard is written."""
        name = shard_name(k, self.shards)
        self.checksums[name] = write_stream(self.folder / name, layout, stream,
                                            {"format": "pt", "flexquant": str(FORMAT_VERSION)})
        self.weight_map.update(dict.fromkeys((n for n, _, _ in layout), name))
        floats = [dt for _, dt, _ in layout if dt.is_floating_point]
        self.dtype = self.dtype or (str(floats[0]).replace("torch.", "") if floats else None)

    # ----- an unfinished run: its state after each shard, so that `--resume` can continue it -----
    def save_state(self, state: dict) -> None:
        """Record the shards written so far with the caller's ``state`` (atomically: temp file, rename)."""
        full = {"weight_map": self.weight_map, "checksums": self.checksums, "modules": self.modules,
                "dtype": self.dtype, **state}
        tmp = self.folder / f".{PROGRESS}.tmp"
        tmp.write_text(json.dumps(full))
        os.replace(tmp, self.folder / PROGRESS)

    @classmethod
    def resume(cls, folder: Path, shards: int) -> tuple[CheckpointWriter, dict]:
        """A writer over an unfinished run's folder and the state it saved (each kept shard checked)."""
        try:
            state = json.loads((Path(folder) / PROGRESS).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{folder} holds no readable record of an unfinished run ({e}); "
                                  "run again without --resume") from e
        self = cls(folder, shards)
        self.weight_map, self.checksums = state.pop("weight_map"), state.pop("checksums")
        self.modules, self.dtype = state.pop("modules"), state.pop("dtype")
        for name in self.checksums:
            verify_file(Path(folder) / name, {"checksums": self.checksums})
        return self, state

    def read_block(self, k: int) -> dict[str, torch.Tensor]:
        """The tensors of shard ``k`` (a finished block)."""
        return read_file(self.folder / shard_name(k, self.shards))

    def finish(self, model, tokenizer, meta: dict) -> None:
        """The index, HF config, tokenizer and quant_config.json (after every shard is written)."""
        index = {"metadata": {"total_size": sum((self.folder / f).stat().st_size for f in self.checksums)},
                 "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2))
        model.config.save_pretrained(self.folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(self.folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.folder)
        qc = {"format_version": FORMAT_VERSION, "library_version": __version__,
              "torch_dtype": self.dtype or "float32", "modules": dict(sorted(self.modules.items())),
              "checksums": self.checksums, **meta}
        runtime = getattr(model, actquant.ATTRIBUTE, None)
        if runtime is not None:  # online transforms + activation/KV quantizers, re-attached by load
            qc["actquant"] = {**runtime.describe(), "stored_bits": runtime.stored_bits()}
        (self.folder / QUANT_CONFIG).write_text(json.dumps(qc, indent=2))
        (self.folder / PROGRESS).unlink(missing_ok=True)
        write_manifest(self.folder, self.checksums)


def save_checkpoint(model, tokenizer, path: str | Path, meta: dict, overwrite: bool = False,
                    extras: Callable[[Path], None] | None = None, layers: str = "model.layers") -> Path:
    """Write a packed model held in memory to ``path`` atomically, a shard per decoder block (at ``layers``)
    and one for the rest. ``meta`` goes into quant_config.json; ``extras(folder)`` writes further files
    (recipe, report) into the folder before it is renamed into place."""
    blocks = model.get_submodule(layers)
    with atomic_folder(path, overwrite, QUANT_CONFIG, "flexquant checkpoint") as tmp:
        writer = CheckpointWriter(tmp, len(blocks) + 1)
        for k, block in enumerate(blocks):
            writer.add(k, block, f"{layers}.{k}.")
        writer.add(len(blocks), model, "", skip=layers)
        writer.finish(model, tokenizer, meta)
        if extras is not None:
            extras(tmp)
    return Path(path)


def read_quant_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        recover(path, QUANT_CONFIG)  # a save of ``path`` that a kill interrupted: the old or the new checkpoint
    f = path / QUANT_CONFIG
    if not f.is_file():
        raise CheckpointError(f"{path} is not a flexquant checkpoint: {QUANT_CONFIG} is missing")
    try:
        qc = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f} is not valid JSON ({e}); the checkpoint is corrupted") from e
    if not isinstance(qc, dict) or not isinstance(qc.get("modules", {}), dict) \
            or not isinstance(qc.get("checksums", {}), dict):
        raise CheckpointError(f"{f} is not a flexquant quant_config (no 'modules' map); the checkpoint is "
                              "corrupted")
    version = qc.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}; this flexquant reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}: upgrade flexquant or re-quantize"
        )
    return qc


def tensor_files(path: str | Path, qc: dict) -> list[Path]:
    """The checkpoint's tensor files (shards of format 3, the single file of formats 1-2), each checked to
    exist (and, in `read_tensors`, against its recorded sha256)."""
    path = Path(path)
    names = sorted(qc.get("checksums", {})) if qc.get("format_version", 2) >= 3 else [TENSORS]
    if not names:
        raise CheckpointError(f"{path}/{QUANT_CONFIG} names no tensor files; the checkpoint is incomplete")
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
            raise CheckpointError(f"{path}/{QUANT_CONFIG} names {name!r} as a tensor file; only .safetensors files "
                                  "of the folder itself are read: the checkpoint was edited")
        if not (path / name).is_file():
            raise CheckpointError(f"{path} is missing {name}; the checkpoint is incomplete")
    return [path / n for n in names]


def verify_file(f: Path, qc: dict) -> None:
    want = qc.get("checksums", {}).get(f.name)
    if want is None or sha256_file(f) != want:
        raise CheckpointError(
            f"{f} does not match the checksum in {QUANT_CONFIG}: the file is truncated or was modified; "
            "re-save or re-download the checkpoint"
        )


def read_tensors(path: str | Path, qc: dict, verify: bool = True, ends_dtype: torch.dtype | None = None,
                 converted: dict[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, after checking each file against its recorded sha256 (plain reads, no map).
    ``ends_dtype``: large full-precision tensors outside the quantized modules (embedding, head) converted to it
    as they are read, where their values fit it; ``converted`` receives their stored dtypes."""
    out: dict[str, torch.Tensor] = {}
    packed = tuple(name + "." for name in qc["modules"])
    for f in tensor_files(path, qc):
        if verify:
            verify_file(f, qc)
        out.update(read_file(f, ends_dtype, packed, converted))
    return out


END_NUMEL = 1 << 20  # a full-precision tensor this large is an end (embedding, head), not a norm or bias


def read_file(f: Path, ends_dtype: torch.dtype | None = None, packed: tuple[str, ...] = (),
              converted: dict[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file (plain reads); a malformed file is a `CheckpointError`."""
    try:
        files = TensorFiles.single(f)
        out = {}
        for k in files.names():
            e = files.entries[k]
            end = (ends_dtype is not None and e.dtype.is_floating_point and e.dtype.itemsize > ends_dtype.itemsize
                   and e.nbytes // e.dtype.itemsize >= END_NUMEL and not k.startswith(packed))
            t = files.get(k, ends_dtype) if end else None
            if t is not None and all_finite(t):
                out[k] = t
                if converted is not None:
                    converted[k] = e.dtype
            else:  # not an end, or its values overflow ends_dtype: as stored
                out[k] = files.get(k)
        return out
    except FlexQuantError as e:
        raise CheckpointError(f"{f} could not be read as safetensors ({e})") from e


def install_packed(model: torch.nn.Module, modules: dict[str, dict], tensors: dict[str, torch.Tensor],
                   kernel: str | None = None, where: str | Path = "", prefix: str = "", release: bool = False) -> None:
    """Put a `QuantLinear` at each path of ``modules`` (records of quant_config.json) under ``model``, built from
    (and popping) its tensors; ``prefix`` is stripped from the recorded paths. ``release``: each layer keeps only
    its kernel's layout, made as it is installed (`QuantLinear.release_packed`; a lean load)."""
    for name, spec in modules.items():
        if not name.startswith(prefix):
            continue
        local, mine = name[len(prefix):], name + "."
        own = {k[len(mine):]: tensors.pop(k) for k in list(tensors) if k.startswith(mine)}
        if "group_bits" not in own:
            raise CheckpointError(f"{where}: tensors of quantized module {name} are missing")
        check_packed(where, name, spec, own)  # (a loaded checkpoint was checked already; a caller's tensors not)
        bias = own.pop("bias", None)
        try:
            q = QuantLinear(spec["in_features"], spec["out_features"], spec["group_size"], spec["sym"], own, bias,
                            spec.get("rotation_order", 0))
        except (RuntimeError, ValueError, KeyError, IndexError) as e:
            raise CheckpointError(f"{where}: quantized module {name} cannot be rebuilt from its tensors ({e}); "
                                  "the checkpoint is damaged (re-save it)") from e
        q.set_kernel(kernel)
        if release:
            q.release_packed()
            trim_heap()  # the freed buffers and the layout's temporaries are small blocks glibc would keep
        parent, _, child = local.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)


def verify_checkpoint(path: Path, qc: dict) -> None:
    """The manifest of a format-4 checkpoint (the tensor shards are checked as they are read); older formats
    had none, which is said once."""
    files = read_manifest(path)
    if files is None and qc.get("format_version", 0) >= 4:
        raise CheckpointError(f"{path} has no {MANIFEST} (format {qc['format_version']} writes one): the folder "
                              "is incomplete or was tampered with; re-save the checkpoint")
    if files is None:
        log.warning("%s was written before checkpoints had a manifest (format %s): only its tensor files are "
                    "verified", path, qc.get("format_version"))
        return
    verify_manifest(path, files, skip=tuple(qc.get("checksums", {})))
    for name, want in qc.get("checksums", {}).items():
        if files.get(name) != want:
            raise CheckpointError(f"{path}: {name} has different checksums in {QUANT_CONFIG} and {MANIFEST}; the "
                                  "checkpoint was edited: re-save it")


def read_verified(path: str | Path, verify: bool = True, ends_dtype: torch.dtype | None = None
                  ) -> tuple[dict, dict[str, torch.Tensor], torch.nn.Module]:
    """(quant_config, tensors, meta skeleton) of a checkpoint once everything it says has been checked: the
    manifest and checksums (``verify``), every tensor finite, every module record against its tensors and all
    of them against the model config.json describes. `load`, `info` and `export` read through this.
    ``ends_dtype``: see `read_tensors`."""
    path = Path(path)
    qc = read_quant_config(path)
    if verify:
        verify_checkpoint(path, qc)
    converted: dict[str, torch.dtype] = {}
    tensors = read_tensors(path, qc, verify, ends_dtype, converted)
    check_finite(path, tensors)
    model = _skeleton(path, torch_dtype(qc, path))
    if qc.get("actquant"):  # its tensors are in the file: the runtime is part of the skeleton
        try:
            setattr(model, actquant.ATTRIBUTE, actquant.ActQuantRuntime.from_description(qc["actquant"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{path}: the activation/KV quantization record of {QUANT_CONFIG} is malformed "
                                  f"({e}); the checkpoint is damaged or was edited") from e
    for name, spec in qc["modules"].items():
        if not isinstance(spec, dict):
            raise CheckpointError(f"{path}: the record of quantized module {name} is not a mapping; the "
                                  "checkpoint is damaged")
        mine = name + "."
        check_packed(path, name, spec, {k[len(mine):]: t for k, t in tensors.items() if k.startswith(mine)})
    check_layout(path, model, qc["modules"], tensors, bool(getattr(model.config, "tie_word_embeddings", False)),
                 converted)
    return qc, tensors, model


def attention_for(model_type: str) -> str:
    """The attention implementation a family runs with (its ModelSpec's, built in or discovered; sdpa for a family
    without one)."""
    from ..models.spec import find_spec

    spec = find_spec(model_type)
    return spec.attn_implementation if spec is not None else "sdpa"


def _skeleton(path: Path, dtype: torch.dtype):
    from transformers import AutoConfig

    from ..models.loader import meta_model

    try:
        config = AutoConfig.from_pretrained(path)
        config.use_cache = False
        declared = getattr(config, "dtype", None)
        if declared is not None and str(declared).replace("torch.", "") not in DTYPES:
            raise ValueError(f"dtype {declared} is not one of {', '.join(DTYPES)}")
        return meta_model(config, dtype=dtype, attn_implementation=attention_for(config.model_type))
    except Exception as e:  # noqa: BLE001 - transformers validates a config with many error types
        raise CheckpointError(f"{path}/config.json does not describe a model this flexquant can build "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the checkpoint "
                              "is damaged or was edited") from e


def load_checkpoint(path: str | Path, kernel: str | None = None, verify: bool = True, lean: bool = False):
    """(model, tokenizer, quant_config) of a packed checkpoint; linears are `QuantLinear`s. With ``verify``
    (the default) the manifest and checksums are checked first; the module records are always checked
    against their tensors and every tensor for NaN/inf. ``lean``: see `nn.lean` (CPU, inference only)."""
    from transformers import AutoTokenizer

    path = Path(path)
    qc, tensors, model = read_verified(path, verify, torch.float16 if lean else None)
    config = model.config
    install_packed(model, qc["modules"], tensors, kernel, path, release=lean)
    runtime = getattr(model, actquant.ATTRIBUTE, None)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as e:  # shapes that do not match config.json
        raise CheckpointError(f"{path}: its tensors do not fit the model config.json describes "
                              f"({str(e).splitlines()[-1].strip()[:200]}); the checkpoint is damaged") from e
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still_meta:
        raise CheckpointError(f"{path}: tensors missing from the checkpoint: {still_meta[:5]}")
    if runtime is not None:
        actquant.install(model, runtime)
    if lean:
        from ..nn.lean import make_lean

        make_lean(model, torch_dtype(qc, path))
    tok = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model.eval(), tok, qc
