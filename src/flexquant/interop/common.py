"""What every exporter shares: reading a flexquant checkpoint into per-layer integer grids, checking
that a target format can hold them, and writing a Hugging Face folder atomically.

A layer exports when it is one uniform integer grid: one bit-width for all its groups, fp16 scales
(16-bit metadata), integer zero points (8- or 4-bit storage: both are plain integers) or a symmetric
grid, and optionally an act-order permutation (expressed as per-column group indices, ``g_idx``).
Everything else (mixed bits within a layer, fp16 kept columns, 8-bit log-coded scales, online input
rotations) is named in one error with the fix.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .._version import __version__
from ..atomic import atomic_folder
from ..errors import CheckpointError, FlexQuantError
from ..format.checkpoint import INDEX, QUANT_CONFIG, TENSORS, read_verified
from ..nn.quant_linear import ROTATION_BUFFERS, rotation_from_tensors
from ..quant.pack import tensors_to_result
from ..quant.result import FP16_BITS

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The only files of a source checkpoint an export copies as they are (tokenizer, generation settings, chat
# template); the exporter writes the weights and its configs itself. Nothing else is copied: no pickles
# (pytorch_model.bin, training_args.bin, *.pt), no stray files. Foreign imports read these (through the
# tokenizer) and nothing else beside their configs and safetensors.
COPIED_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja", "chat_template.json"})
# Files of a flexquant checkpoint that describe flexquant's own layout (not copied, and not worth a warning).
OWN_FILES = {TENSORS, INDEX, QUANT_CONFIG, "config.json", "report.json", "report.png", "report_flexible.png",
             "report.md", "report.html", "recipe.yaml", "manifest.json", "progress.json"}
SHARD_BYTES = 4 * 2**30  # tensors per safetensors file before the export is sharded (with an index)
EXPORT_INFO = "flexquant_export.json"


@dataclass
class GridLayer:
    """One linear on a uniform integer grid, columns in the original input order.

    W[:, i] = (codes[:, i] − zeros[:, g_idx[i]]) · scales[:, g_idx[i]] (zeros = 2^(bits−1) when
    symmetric); ``g_idx`` None means contiguous groups (g_idx[i] = i // group_size).
    """

    name: str
    bits: int
    group_size: int
    sym: bool
    codes: torch.Tensor  # [m, n] uint8
    scales: torch.Tensor  # [m, ng] float32, float16-exact
    zeros: torch.Tensor  # [m, ng] uint8 (for symmetric grids: 2^(bits-1) everywhere)
    g_idx: torch.Tensor | None  # [n] int32
    bias: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def group_index(self) -> torch.Tensor:
        n = self.codes.shape[1]
        return self.g_idx if self.g_idx is not None else torch.arange(n, dtype=torch.int32) // self.group_size

    def dequantize(self) -> torch.Tensor:
        gi = self.group_index().long()
        return (self.codes.float() - self.zeros.float()[:, gi]) * self.scales[:, gi]


@dataclass
class DenseLayer:
    """A quantized linear written unquantized (its online rotation folded exactly into the weight)."""

    name: str
    weight: torch.Tensor  # [m, n] float64
    bias: torch.Tensor | None = None


@dataclass
class Source:
    """A flexquant checkpoint read for export."""

    path: Path
    qc: dict
    config: dict
    grids: dict[str, GridLayer] = field(default_factory=dict)
    dense: dict[str, DenseLayer] = field(default_factory=dict)
    rest: dict[str, torch.Tensor] = field(default_factory=dict)  # embeddings, norms, lm_head, ...

    @property
    def dtype(self) -> str:
        return self.qc.get("torch_dtype", "float32")

    def hub(self, name: str) -> str:
        """A tensor's or module's name as the family's hub checkpoints spell it (`ModelSpec.checkpoint_names`):
        what exported files and their configs use."""
        from ..models import get_spec

        return get_spec(self.config["model_type"]).to_checkpoint(name)


def one_line(e: BaseException) -> str:
    """An exception's message on one line (library messages may span several)."""
    return " ".join(str(e).split()) or type(e).__name__


def shown(name: str) -> str:
    """A file name for a one-line message (repr when it holds control characters)."""
    return name if name.isprintable() else repr(name)


def inside(folder: Path, name: str, named_by: str | None = None) -> Path:
    """``folder / name`` resolved (symlinks too), refused with a `CheckpointError` unless it lies inside ``folder``.

    ``named_by``: the file whose entry ``name`` is (an index or a config), for the message; None for a file
    flexquant looks up by its fixed name."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{named_by or folder} names {name!r}, which is not a file name; the file is corrupt")
    ref = f"{named_by} names {shown(name)}, " if named_by else f"{shown(name)} is "
    root = folder.resolve()
    try:
        target = (root / name).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise CheckpointError(f"{folder}: {ref}a path that cannot be resolved ({one_line(e)}); "
                              "refusing to read it") from e
    if target == root or not target.is_relative_to(root):
        lexical = Path(os.path.normpath(root / name))
        what = (f"a symlink to {target}, outside {folder}" if lexical.is_relative_to(root) and lexical != root
                else f"a file outside {folder}")
        raise CheckpointError(f"{ref}{what}; refusing to read it")
    return target


def read_json(path: Path, name: str) -> dict:
    """The JSON object in ``path / name`` (which must lie inside ``path``); anything else is a `CheckpointError`."""
    f = inside(path, name)
    try:
        obj = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointError(f"{path / name} is not valid JSON ({one_line(e)}); the file is corrupt") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path / name} holds a JSON {type(obj).__name__}, not an object; the file is corrupt")
    return obj


def side_files(folder: Path, skip: set[str] | frozenset[str] = frozenset()) -> dict[str, Path]:
    """{name: resolved file} of the `COPIED_FILES` present in ``folder`` (but not in ``skip``), each checked to
    lie inside it."""
    present = [name for name in sorted(COPIED_FILES - set(skip))
               if (folder / name).is_file() or (folder / name).is_symlink()]
    found = {name: inside(folder, name) for name in present}
    return {name: f for name, f in found.items() if f.is_file()}


def _problem_list(problems: dict[str, list[str]]) -> str:
    lines = []
    for what, names in problems.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        lines.append(f"{what} ({len(names)} layer{'s' * (len(names) > 1)}: {shown})")
    return "; ".join(lines)


def _group_index(perm: torch.Tensor | None, n: int, g: int) -> torch.Tensor | None:
    """Per-column group index of an act-order permutation (None for no or the identity permutation)."""
    if perm is None or torch.equal(perm.cpu(), torch.arange(n)):
        return None
    gi = torch.empty(n, dtype=torch.int32)
    gi[perm.cpu()] = (torch.arange(n) // g).to(torch.int32)  # column perm[j] sits in group j // g
    return gi


def _online_rotation_matrix(own: dict[str, torch.Tensor], n: int, order: int) -> torch.Tensor:
    """Q [n, n] float64 with x ↦ x·Q the layer's online input rotation."""
    R = rotation_from_tensors(own, n, order)
    return R.apply(torch.eye(n, dtype=torch.float64))


def read_source(path: str | Path, format_name: str, online_rotation: str = "error") -> Source:
    """Read a flexquant checkpoint into `GridLayer`s (and `DenseLayer`s for ``online_rotation="dense"``).

    Raises one `FlexQuantError` listing every layer the target format cannot hold, with the fix.
    """
    path = Path(path)
    if not path.is_dir():
        raise FlexQuantError(f"{path} is not a folder; pass a flexquant checkpoint folder (made by flexquant quantize)")
    qc, tensors, _ = read_verified(path)  # manifest, checksums, records against tensors and config
    config = read_json(path, "config.json") if (path / "config.json").is_file() else None
    if config is None:
        raise FlexQuantError(f"{path} has no config.json; the checkpoint is incomplete: re-save it")
    src = Source(path, qc, config)
    problems: dict[str, list[str]] = {}
    for name, spec in qc["modules"].items():
        prefix = name + "."
        own = {k[len(prefix):]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)}
        bias = own.pop("bias", None)
        if "group_bits" not in own:
            raise FlexQuantError(f"{path}: the tensors of quantized module {name} are missing; re-save the checkpoint")
        m, n, g = spec["out_features"], spec["in_features"], spec["group_size"]
        bits = sorted(set(own["group_bits"].tolist()))
        if FP16_BITS in bits or "fp16_cols" in own:
            problems.setdefault("fp16 kept columns (16-bit groups): requantize without kept columns, e.g. "
                                "--protect-bits 4 or --protect none", []).append(name)
            continue
        if len(bits) > 1:
            problems.setdefault(f"mixed bit-widths within a layer ({'/'.join(map(str, bits))} bits): "
                                f"{format_name} holds one bit-width per layer; requantize with one bit-width "
                                "per layer (--no-sbgbs, or a single --candidates)", []).append(name)
            continue
        if "scale_codes" in own:
            problems.setdefault(f"8-bit log-coded scales (scale_codes): {format_name} stores one float16 "
                                "scale per group; requantize with --scale-bits 16", []).append(name)
            continue
        order = spec.get("rotation_order", 0)
        rot = {k: own.pop(k) for k in ROTATION_BUFFERS if k in own}
        r = tensors_to_result(own, m, n, g, spec["sym"])
        if order:
            if online_rotation != "dense":
                problems.setdefault(
                    f"an online input rotation (FlexibleLLM's DOSA Hadamard before {name.rsplit('.', 1)[-1]}), which "
                    f"{format_name} cannot express and which does not fold into a quantized weight exactly; pass "
                    "--online-rotation dense to write these layers unquantized with the rotation folded in (exact, "
                    "larger), or requantize with --no-dosa", []).append(name)
                continue
            Q = _online_rotation_matrix(rot, n, order)
            src.dense[name] = DenseLayer(name, r.dequantize(torch.float64) @ Q.T, bias)  # x·Q·Wᵀ = x·(W·Qᵀ)ᵀ
            continue
        b = bits[0]
        zeros = r.zeros if r.zeros is not None else torch.full_like(r.scales, 2 ** (b - 1), dtype=torch.uint8)
        codes = r.codes
        if r.perm is not None:  # back to the original column order
            codes = torch.empty_like(r.codes)
            codes[:, r.perm] = r.codes
        src.grids[name] = GridLayer(name, b, g, spec["sym"], codes, r.scales.float(), zeros.to(torch.uint8),
                                    _group_index(r.perm, n, g), bias)
    if problems:
        raise FlexQuantError(f"{path} cannot be exported to {format_name}: " + _problem_list(problems))
    src.rest = tensors
    return src


def check_architecture(src: Source) -> None:
    """The export is read by the stock architecture: every quantized module must be a Linear there, with
    a bias exactly when the checkpoint has one (LFD's bias denoising adds biases Llama has no place for)."""
    from transformers import AutoConfig

    from ..models.loader import meta_model

    skeleton = meta_model(AutoConfig.from_pretrained(src.path))  # (experts exported one linear each)
    config = skeleton.config
    state = set(skeleton.state_dict())
    extra_bias = []
    for name, layer in {**src.grids, **src.dense}.items():
        try:
            mod = skeleton.get_submodule(name)
        except AttributeError as e:
            raise FlexQuantError(f"{src.path}: quantized module {name} is not part of the {config.model_type} "
                                 "architecture; the checkpoint does not match its config.json") from e
        if layer.bias is not None and getattr(mod, "bias", None) is None:
            extra_bias.append(name)
    if extra_bias:
        raise FlexQuantError(
            f"{src.path} cannot be exported: {len(extra_bias)} layers ({', '.join(extra_bias[:3])}, ...) carry a bias "
            f"(LFD's bias denoising) that the {config.model_type} architecture has no place for; requantize with "
            "--denoise off")
    unknown = [k for k in src.rest if k not in state]
    if unknown:
        raise FlexQuantError(f"{src.path}: tensors {unknown[:3]} do not belong to the {config.model_type} "
                             "architecture; the checkpoint does not match its config.json")


def export_config(src: Source, dtype: str, quantization_config: dict) -> dict:
    """config.json of the export: the model's own, with the quantization config, the dtype and the KV cache on."""
    cfg = dict(src.config)
    cfg["quantization_config"] = quantization_config
    cfg["torch_dtype"] = dtype  # read by older transformers and by vLLM
    cfg["dtype"] = dtype
    cfg["use_cache"] = True  # flexquant turns it off while quantizing; serving wants it
    return cfg


def cast_rest(src: Source, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in src.rest.items()}


def write_folder(out: str | Path, src: Source, tensors: dict[str, torch.Tensor], json_files: dict[str, dict],
                 overwrite: bool = False, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write a Hugging Face folder atomically: tensors (sharded with an index past ``shard_bytes``) under the
    names the family's hub checkpoints use (`ModelSpec.checkpoint_names`), JSON files, and the source's tokenizer
    and generation files. A temporary sibling folder is renamed into place."""
    out = Path(out)
    tensors = {src.hub(k): v for k, v in tensors.items()}
    if out.resolve() == src.path.resolve():
        raise FlexQuantError("--out must differ from the source checkpoint folder")
    copies = side_files(src.path, set(json_files))  # checked before anything is written
    left = sorted(f.name for f in src.path.iterdir()
                  if f.name not in copies and f.name not in OWN_FILES and f.name not in json_files
                  and not (f.name.startswith("model-") and f.name.endswith(".safetensors")))
    if left:
        log.warning("%s: not copied into the export (only tokenizer, generation and chat-template files are): %s",
                    src.path, ", ".join(map(shown, left)))
    with atomic_folder(out, overwrite, EXPORT_INFO, "flexquant export") as tmp:
        _write_tensors(tmp, tensors, shard_bytes)
        for fname, obj in json_files.items():
            (tmp / fname).write_text(json.dumps(obj, indent=2) + "\n")
        for name, f in copies.items():
            shutil.copy2(f, tmp / name)
    return out


def _write_tensors(folder: Path, tensors: dict[str, torch.Tensor], shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        t = tensors[k]
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata=meta)
        return
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": {}}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / fname, metadata=meta)
        index["weight_map"].update({k: fname for k in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def stored_bits(tensors: dict[str, torch.Tensor]) -> int:
    """Bits the exported files store for one quantized linear's tensors, its bias excluded."""
    return sum(t.numel() * t.element_size() * 8 for k, t in tensors.items() if k != "bias")


def grid_bpw(src: Source, stored: int) -> float:
    """Bits per weight of the quantized linears as exported (``stored`` bits over their weights)."""
    weights = sum(layer.shape[0] * layer.shape[1] for layer in src.grids.values())
    return round(stored / weights, 6) if weights else 0.0


def export_info(src: Source, format_name: str, dtype: str, online_rotation: str) -> dict:
    return {"flexquant_version": __version__, "format": format_name, "dtype": dtype,
            "source": str(src.path), "source_checksums": src.qc.get("checksums", {}),
            "source_method": (src.qc.get("quant_config") or {}).get("method"),
            "quantized_layers": len(src.grids),
            "dense_layers": {"names": sorted(src.dense), "why": "online input rotation folded into the weight"}
            if src.dense else {},
            "online_rotation": online_rotation}
