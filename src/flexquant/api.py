"""Public entry points: `quantize`, `save`, `load`, `evaluate`, `generate`.

They run the steps of DESIGN.md's data flow; no algorithm lives here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from .atomic import check_target, recover
from .config import QuantConfig
from .data import eval_windows, load_text
from .errors import FlexQuantError
from .eval import evaluate_windows
from .format.checkpoint import QUANT_CONFIG, load_checkpoint, save_checkpoint
from .methods import build_method
from .models import get_spec, load_model
from .pipeline.distributed import Dist
from .pipeline.progress import FREED_THRESHOLD, MEMORY_FIRST_THRESHOLD, return_freed_memory, trim_heap
from .report import bit_summary
from .runner import (  # noqa: F401 - QuantizedModel, pack_results and pack_model are public here too
    QuantizedModel,
    Run,
    check_context,
    checkpoint_extras,
    checkpoint_meta,
    load_for_run,
    materialized,
    pack_model,
    pack_results,
)

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FlexQuantError(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise FlexQuantError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None


def quantize(model: str | None = None, config: QuantConfig | None = None, *, calib_ids=None,
             progress: bool = True, out: str | Path | None = None, overwrite: bool = False, plot: bool = True,
             resume: bool = False, dist: Dist | None = None, **settings) -> QuantizedModel:
    """Quantize ``model`` (built-in name, folder or hub id) with ``config`` (and/or flat ``settings``
    such as ``method="gptq", bits=3, group_size=64``, ``options=dict(...)`` for the method's options).
    ``calib_ids`` [N, L] replaces the calibration windows the config describes. Returns the packed model and
    its report; ``QuantizedModel.config`` is the resolved config (what `save` writes as the recipe).

    With ``out``, the checkpoint is written there as the run goes (a shard per finished block, then renamed
    into place; `save` is not needed): with a streamed model, neither the full-precision nor the packed model
    is ever held whole. The returned model is then read back from ``out`` when used. A run that stops part-way
    keeps its finished blocks in ``.<out>.partial`` beside ``out``; ``resume=True`` continues it from the first
    unfinished block (same config; the statistics pass and plan are recomputed, the finished blocks replayed).

    Under torchrun (WORLD_SIZE > 1, or a given ``dist``) the ranks share the work and end with the same model;
    only rank 0 writes ``out`` (docs/scale.md)."""
    config = config or QuantConfig()
    if model is not None:
        settings["model"] = model
    if settings:
        config = config.replace(**settings)
    method = build_method(config)  # validates the method's options before the model is loaded
    config = method.config  # grid settings the method filled in
    # depth-independent memory: freed blocks go back to the system (under a budget, mid-sized ones too)
    return_freed_memory(MEMORY_FIRST_THRESHOLD if config.max_memory else FREED_THRESHOLD)
    if out is not None:  # an unusable output folder fails before the (long) run, not after it
        check_target(out, overwrite, QUANT_CONFIG, "flexquant checkpoint")
    if method.needs_calibration and calib_ids is None and config.calib not in ("pydoc", "wikitext2", "c4"):
        load_text(config.calib, "calib")  # a missing file or one that is not text fails before the model loads
    device = resolve_device(config.device)
    dist = dist or Dist.from_env(device)
    device, progress = dist.local_device(device), progress and dist.is_main
    if dist.active and not method.distributed:
        raise FlexQuantError(f"--method {config.method} with these options cannot run on several ranks; run it "
                             "in one process (without torchrun)")
    t_load = time.perf_counter()
    hf_model, tok = load_for_run(config, device)
    run = Run(config, method, hf_model, tok, device, time.perf_counter() - t_load, calib_ids, progress, dist)
    if out is None:
        return run.in_memory()
    if not dist.is_main:
        return run.discarding()
    return run.to_folder(Path(out), overwrite, resume, plot)


def save(qmodel: QuantizedModel, path: str | Path, overwrite: bool = False, plot: bool = True) -> Path:
    """Write the packed checkpoint, its recipe (``recipe.yaml``) and the run report to ``path`` atomically."""
    if qmodel.path is not None and not materialized(qmodel.model):
        qmodel = load(qmodel.path)  # a run written as it went: its model is read back to be saved elsewhere
    spec = get_spec(qmodel.model.config.model_type, qmodel.model.config)
    return save_checkpoint(qmodel.model, qmodel.tokenizer, path, checkpoint_meta(qmodel), overwrite=overwrite,
                           extras=checkpoint_extras(qmodel, plot), layers=spec.layers)


def update_report(path: str | Path, report: dict) -> None:
    """Replace a checkpoint's report.json (written to a temporary file, then renamed over the old one)."""
    target = Path(path) / "report.json"
    tmp = target.with_name(f".report.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, target)


def load(path: str | Path, kernel: str | None = None, device: str = "cpu", verify: bool = True,
         lean: bool = False) -> QuantizedModel:
    """Load a packed checkpoint; its linears run through the kernel registry (``kernel`` forces one).

    ``lean`` (CPU, inference only): the model is held in about its packed size — each linear keeps only the
    `packed-cpu` kernel's layout, the embedding and head are held in float16 (`flexquant.nn.lean`); such a model
    cannot be saved, exported or moved to another device. GPTQ and compressed-tensors folders written by other
    tools load too (`flexquant.interop`)."""
    from .interop import foreign_format, load_foreign

    recovered(path)
    if lean and (resolve_device(device).type != "cpu" or kernel not in (None, "packed-cpu")):
        raise FlexQuantError(f"lean=True holds the model for the packed CPU kernel; it cannot run with "
                             f"device={device!r}, kernel={kernel!r}: drop lean, or use device='cpu' and "
                             "kernel='packed-cpu'")
    if not is_checkpoint(path) and foreign_format(path):
        if lean:
            raise FlexQuantError(f"lean=True loads flexquant checkpoints; {path} is another tool's format: load it "
                                 "without lean")
        model, tok, info = load_foreign(path, kernel=kernel)
        return QuantizedModel(model.to(resolve_device(device)), tok, None, {"foreign": info})
    if lean:
        from .kernels.cpu_packed import extension

        return_freed_memory()  # the checkpoint buffers dropped as layouts are made go back to the system
        if extension() is None:
            raise FlexQuantError("lean=True needs the packed CPU kernel, which could not be built here (see the "
                                 "warning above: a C++ compiler and the Python headers); load without lean")
        kernel = "packed-cpu"
    model, tok, qc = load_checkpoint(path, kernel=kernel, verify=verify, lean=lean)
    if lean:
        trim_heap()
    cfg = _recorded_config(path, qc.get("quant_config"))
    return QuantizedModel(model.to(resolve_device(device)), tok, cfg, _read_report(Path(path)))


def _read_report(path: Path) -> dict:
    """The run report beside a checkpoint; a damaged one only costs the report (it does not decode anything)."""
    f = path / "report.json"
    if not f.is_file():
        return {}
    try:
        report = json.loads(f.read_text())
        if isinstance(report, dict):
            return report
    except (OSError, ValueError) as e:
        log.warning("%s is unreadable (%s); loaded without the run report", f, e)
        return {}
    log.warning("%s is not a run report; loaded without it", f)
    return {}


# Option names checkpoints made before the typed configs may hold, by method: old name -> current name.
_RENAMED_OPTIONS = {"flexible": {"seed": "rotation_seed"}, "adaptive": {"seed": "transform_seed"}}


def _recorded_config(path, recorded: dict | None) -> QuantConfig | None:
    """The `QuantConfig` a checkpoint records; older names are mapped, and a record this version cannot read
    only costs the config (the model loads all the same)."""
    if not recorded:
        return None
    if not isinstance(recorded, dict):
        log.warning("%s: its recorded quantization config is not a mapping; loaded without it", path)
        return None
    recorded = dict(recorded)
    renames = _RENAMED_OPTIONS.get(recorded.get("method"), {})
    if isinstance(recorded.get("options"), dict):
        recorded["options"] = {renames.get(k, k): v for k, v in recorded["options"].items()}
    try:
        return QuantConfig.from_dict(recorded)
    except (FlexQuantError, TypeError, ValueError, KeyError, AttributeError) as e:
        log.warning("%s: its recorded quantization config does not parse with this flexquant (%s); loaded "
                    "without it", path, e)
        return None


def recovered(path) -> None:
    """A folder that is missing because a save of it was killed is put back (the old or the new one)."""
    if isinstance(path, (str, Path)) and not Path(path).exists():
        recover(path)


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / QUANT_CONFIG).is_file()


def export(path: str | Path, out: str | Path, format: str = "compressed-tensors", **options) -> dict:
    """Export the checkpoint at ``path`` as a compressed-tensors or GPTQ folder (`flexquant.interop`)."""
    from .interop import export_checkpoint

    return export_checkpoint(path, out, format, **options)


def as_model(obj, device):
    """(nn.Module, tokenizer, bpw or None) from a checkpoint path, model name, QuantizedModel or module."""
    if isinstance(obj, QuantizedModel):
        if obj.path is not None and not materialized(obj.model):
            obj = load(obj.path, device=str(device))
        return obj.model, obj.tokenizer, obj.bpw
    if isinstance(obj, nn.Module):
        return obj, None, bit_summary(obj)["bpw"]
    recovered(obj)
    if is_checkpoint(obj) or _is_foreign(obj):
        qm = load(obj, device=str(device))
        bpw = qm.report["foreign"]["bpw"] if "foreign" in qm.report else qm.bpw  # a foreign file's own bits
        return qm.model, qm.tokenizer, bpw
    model, tok = load_model(str(obj))
    return model.to(device), tok, None


def _is_foreign(obj) -> bool:
    from .interop import foreign_format

    return isinstance(obj, (str, Path)) and foreign_format(obj) is not None


def evaluate(model, text: str = "pydoc", seqlen: int = 2048, windows: int | None = None,
             reference=None, device: str = "cpu", tokenizer=None, progress: bool = True) -> dict:
    """Perplexity (and KL divergence to ``reference``) on held-out windows of ``text``.

    ``model`` and ``reference``: a checkpoint folder, a model name/folder/hub id, a `QuantizedModel`
    or an ``nn.Module`` (then pass ``tokenizer``). Returns a dict with perplexity, kl_divergence
    (with a reference), bpw (for quantized models), windows, seqlen, tokens.
    """
    dev = resolve_device(device)
    m, tok, bpw = as_model(model, dev)
    tok = tokenizer or tok
    if tok is None:
        raise FlexQuantError("evaluate() needs a tokenizer for a bare nn.Module: pass tokenizer=")
    ref = None
    if reference is not None:
        ref, _, _ = as_model(reference, dev)
        if ref.config.vocab_size != m.config.vocab_size:
            raise FlexQuantError("the reference model has a different vocabulary; KL needs the same tokenizer")
    check_context(m, seqlen)
    win = eval_windows(tok, text, seqlen, windows)
    res = evaluate_windows(m, win, ref, dev, progress)
    if not math.isfinite(res["perplexity"]):
        raise FlexQuantError(f"the model's perplexity is {res['perplexity']}: it produces non-finite logits (weights "
                             "out of range or a config value such as rms_norm_eps or rope_theta that breaks it)")
    res["bpw"] = bpw
    res["text"] = text
    return res


def generate(qmodel, prompt: str, max_new_tokens: int = 64, do_sample: bool = False) -> str:
    """Greedy (or sampled) continuation of ``prompt`` with the KV cache on."""
    model, tok, _ = as_model(qmodel, "cpu")
    if tok is None:
        raise FlexQuantError("this model has no tokenizer to encode the prompt")
    ids = tok(prompt, return_tensors="pt")
    context = getattr(model.config, "max_position_embeddings", None)
    if isinstance(context, int) and ids["input_ids"].shape[1] + max_new_tokens > context:
        raise FlexQuantError(f"the prompt ({ids['input_ids'].shape[1]} tokens) plus --max-new-tokens {max_new_tokens} "
                             f"exceed the model's context of {context} tokens; ask for fewer new tokens")
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=True,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
