"""Quantized classifier checkpoints: ``model.safetensors`` (integer codes, scales, zeros, steps, biases)
plus ``quant_config.json`` (format version, config, per-layer bits, architecture, report).

Only safetensors and JSON are read back, never pickle, so a downloaded checkpoint cannot run code.
Writes go to a temporary folder beside the target that is then renamed, so a crash leaves no half file.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_folder
from .config import VISION_FORMAT_VERSION, VisionQuantConfig
from .errors import VisionError
from .graph import fold_batchnorm, quant_layers, split_model, wrap_layers

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "quant_config.json"
KIND = "flexquant.vision.QuantizedClassifier"


def _library_version() -> str:
    try:
        from importlib.metadata import version

        return version("flexquant")
    except Exception:  # noqa: BLE001 - running from a source tree without an install
        return "unknown"


def _is_ours(folder: Path) -> bool:
    """True for a folder holding a vision checkpoint (the LLM checkpoints use the same JSON file name)."""
    try:
        return json.loads((folder / CONFIG_FILE).read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def save_quantized(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a `QuantizedClassifier` to the folder `path` atomically; returns the folder.

    An existing folder is replaced only if it is a checkpoint of this kind (or empty).
    """
    from safetensors.torch import save_file

    from .api import QuantizedClassifier

    if not isinstance(model, QuantizedClassifier):
        raise VisionError(f"save_quantized expects a QuantizedClassifier, got {type(model).__name__}")
    target = Path(path)
    if target.exists() and not (target.is_dir() and (not any(target.iterdir()) or _is_ours(target))):
        raise VisionError(f"{target} exists and is not a flexquant vision checkpoint; choose another output folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.seq.state_dict().items()}
    meta = {
        "kind": KIND,
        "format_version": VISION_FORMAT_VERSION,
        "library_version": _library_version(),
        "arch": model.arch,
        "input_shape": list(model.input_shape),
        "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
        "config": model.config.to_dict(),
        "layers": model.settings,
        "storage": model.storage_bits(),
        "report": model.report,
        "metrics": model.metrics,
    }
    with atomic_folder(target, True, CONFIG_FILE, "flexquant vision checkpoint") as tmp:
        save_file(
            tensors, str(tmp / WEIGHTS_FILE), metadata={"kind": KIND, "format_version": str(VISION_FORMAT_VERSION)}
        )
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return target


def _read_meta(folder: Path) -> dict:
    cfg_path = folder / CONFIG_FILE
    if not folder.is_dir() or not cfg_path.is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise VisionError(f"{folder} is not a quantized classifier checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VisionError(f"{cfg_path} is corrupted: {exc}") from None
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise VisionError(f"{cfg_path} is not a flexquant vision checkpoint")
    if meta.get("format_version") != VISION_FORMAT_VERSION:
        raise VisionError(
            f"{cfg_path} has format_version {meta.get('format_version')!r}; "
            f"this flexquant reads {VISION_FORMAT_VERSION}"
        )
    for key in ("layers", "config", "input_shape", "dtype"):
        if key not in meta:
            raise VisionError(f"{cfg_path} is corrupted: the {key!r} entry is missing")
    return meta


def load_quantized(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a checkpoint written by `save_quantized` into a `QuantizedClassifier`.

    model: the FP architecture to use as a skeleton (its weights are ignored); needed only when the model
    was not built by name (`flexquant.vision.build_model`), since then the file cannot say how to build it.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .api import QuantizedClassifier
    from .models import build_model

    folder = Path(path)
    meta = _read_meta(folder)
    config = VisionQuantConfig.from_dict(meta["config"])
    dtype = getattr(torch, meta["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise VisionError(f"{folder / CONFIG_FILE}: unknown dtype {meta['dtype']!r}")
    if model is None:
        arch = meta.get("arch")
        if not arch:
            raise VisionError(
                f"{folder} holds a model that was not built by name; "
                "pass its architecture: load_quantized(path, model=MyNet())"
            )
        model = build_model(arch["name"], arch["num_classes"], arch.get("in_channels", 3))
    skeleton = fold_batchnorm(copy.deepcopy(model).to(dtype).eval())
    seq = split_model(skeleton)
    try:
        wrap_layers(seq, meta["layers"], calibrate=False)
    except VisionError as exc:
        raise VisionError(f"{folder} does not match the architecture of the given model: {exc}") from None
    for layer in quant_layers(seq):
        layer.finalize()
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError) as exc:
        raise VisionError(f"{folder / WEIGHTS_FILE} is corrupted: {exc}") from None
    own = seq.state_dict()
    if set(own) != set(tensors) or any(own[k].shape != tensors[k].shape for k in own):
        raise VisionError(f"{folder} does not match the architecture (tensor names or shapes differ); wrong model?")
    seq.load_state_dict(tensors)
    shape = tuple(meta["input_shape"])
    qmodel = QuantizedClassifier(seq, config, meta["layers"], shape, meta.get("arch"), meta.get("report"))
    qmodel.metrics = meta.get("metrics") or {}
    return qmodel.eval()
