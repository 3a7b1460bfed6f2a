"""Public entry points: `quantize`, `save`, `load`, `evaluate`, `generate`.

They run the steps of DESIGN.md's data flow; no algorithm lives here.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .actquant.runtime import attach as attach_actquant
from .actquant.runtime import install as install_actquant
from .alloc.cost import result_bits
from .config import QuantConfig
from .data import calibration_windows, eval_windows
from .errors import FlexQuantError
from .eval import evaluate_windows, peak_rss_mb
from .format.checkpoint import QUANT_CONFIG, load_checkpoint, save_checkpoint
from .methods import build_method
from .models import get_spec, load_model
from .nn.quant_linear import QuantLinear
from .pipeline import quantize_model
from .pipeline.distributed import Dist
from .recipe import RECIPE, write_recipe
from .report import bit_summary, build_report, plot_flexible, plot_hiratio, plot_report

log = logging.getLogger(__name__)


@dataclass
class QuantizedModel:
    """A packed model (linears are `QuantLinear`s), its tokenizer, and what is known about its making."""

    model: nn.Module
    tokenizer: object
    config: QuantConfig | None = None
    report: dict = field(default_factory=dict)

    @property
    def bpw(self) -> float:
        return bit_summary(self.model)["bpw"]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FlexQuantError(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
    return torch.device(device)


def _check_group_size(model: nn.Module, spec, group_size: int) -> None:
    layer = model.get_submodule(spec.layers)[0]
    for name in spec.linears:
        n = layer.get_submodule(name).in_features
        if n % group_size:
            raise FlexQuantError(
                f"group_size={group_size} does not divide the input dimension {n} of {name}; "
                f"choose a divisor of {n} (e.g. 32 or 64)"
            )


def pack_model(model: nn.Module, results: dict, runtime=None) -> nn.Module:
    """Replace each quantized linear by a `QuantLinear` built from its `QuantResult` (with the online rotation
    the result carries), and connect the activation/KV runtime of weight-activation methods (``runtime``, or
    the one the model already holds). The stored bits are checked against the cost model (`alloc.cost`)."""
    for name, r in results.items():
        parent, _, child = name.rpartition(".")
        lin = model.get_submodule(name)
        q = QuantLinear.from_result(r, lin.bias, dtype=lin.weight.dtype, rotation=r.rotation)
        planned = result_bits(r, r.rotation)
        if q.stored_bits() != planned:
            log.warning("%s stores %d bits, the cost model planned %d: the reported bpw is the stored one",
                        name, q.stored_bits(), planned)
        setattr(model.get_submodule(parent), child, q)
    if runtime is not None:
        install_actquant(model, runtime)
    else:
        attach_actquant(model)  # a runtime the model holds follows its packed linears (no-op without one)
    return model


def quantize(model: str | None = None, config: QuantConfig | None = None, *, calib_ids=None,
             progress: bool = True, dist: Dist | None = None, **settings) -> QuantizedModel:
    """Quantize ``model`` (built-in name, folder or hub id) with ``config`` (and/or flat ``settings``
    such as ``method="gptq", bits=3, group_size=64``, ``options=dict(...)`` for the method's options).
    ``calib_ids`` [N, L] replaces the calibration windows the config describes. Returns the packed model and
    its report; ``QuantizedModel.config`` is the resolved config (what `save` writes as the recipe).
    Under torchrun (WORLD_SIZE > 1, or a given ``dist``) the ranks share the work and all return the same model;
    only rank 0 should `save` it (docs/scale.md)."""
    config = config or QuantConfig()
    if model is not None:
        settings["model"] = model
    if settings:
        config = config.replace(**settings)
    method = build_method(config)  # validates the method's options before the model is loaded
    config = method.config  # grid settings the method filled in
    t_load = time.perf_counter()
    hf_model, tok = load_model(config.model)
    t0 = time.perf_counter()
    load_seconds = t0 - t_load
    spec = get_spec(hf_model.config.model_type)
    _check_group_size(hf_model, spec, config.grid.group_size)
    device = resolve_device(config.device)
    dist = dist or Dist.from_env(device)
    device, progress = dist.local_device(device), progress and dist.is_main
    if dist.active and not method.distributed:
        raise FlexQuantError(f"--method {config.method} with these options cannot run on several ranks; run it "
                             "in one process (without torchrun)")
    given = calib_ids is not None
    if method.needs_calibration and calib_ids is None:
        calib_ids = calibration_windows(tok, config.calib, config.nsamples, config.seqlen, config.seed)
    log.info("quantizing %s with %s at %d bits, group %d on %s", config.model, config.method,
             config.grid.bits, config.grid.group_size, device)
    results, records, notes = quantize_model(hf_model, spec, method, calib_ids if method.needs_calibration
                                             else None, device, config.batch_size, progress, dist)
    pack_model(hf_model, results, method.runtime)
    seconds = time.perf_counter() - t0
    report = build_report(config, hf_model, records, notes, seconds, peak_rss_mb(),
                          None if calib_ids is None or not method.needs_calibration else int(calib_ids.numel()))
    report["summary"]["load_seconds"] = load_seconds
    report["calibration"]["windows_given"] = given  # passed in by the caller: the recipe cannot redraw them
    report["method"] = method.summary()
    if dist.active:
        report["distributed"] = _distributed_facts(dist, notes)
    return QuantizedModel(hf_model, tok, config, report)


def _distributed_facts(dist: Dist, notes: list[dict]) -> dict:
    """Ranks, sharding and the collective volume (this rank's payload; per block in the block notes)."""
    total = dist.volume()
    blocks = {k: sum(n.get(k, 0) for n in notes) for k in total}
    return {"world": dist.world, "backend": "nccl" if dist.comm.type == "cuda" else "gloo", "exact": dist.exact,
            "sharding": "round-robin batches (batch j on rank j % world)",
            "solves": "linear k of a group on rank k % world", **{f"{k}_total": v for k, v in total.items()},
            **{f"{k}_statistics_pass": v - blocks[k] for k, v in total.items()}}


def save(qmodel: QuantizedModel, path: str | Path, overwrite: bool = False, plot: bool = True) -> Path:
    """Write the packed checkpoint, its recipe (``recipe.yaml``) and the run report to ``path`` atomically."""
    meta = {"quant_config": qmodel.config.to_dict() if qmodel.config else None,
            "summary": qmodel.report.get("summary")}

    def extras(folder: Path) -> None:
        if qmodel.config is not None:
            write_recipe(qmodel.config, folder / RECIPE,
                         note=None if not qmodel.report.get("calibration", {}).get("windows_given") else
                         "the calibration windows were passed in by the caller: this recipe redraws its own")
        if qmodel.report:
            (folder / "report.json").write_text(json.dumps(qmodel.report, indent=2))
            if plot:
                plot_report(qmodel.report, folder / "report.png")
                plot_flexible(qmodel.report, folder / "report_flexible.png")
                plot_hiratio(qmodel.report, folder / "report_hiratio.png")

    return save_checkpoint(qmodel.model, qmodel.tokenizer, path, meta, overwrite=overwrite, extras=extras)


def load(path: str | Path, kernel: str | None = None, device: str = "cpu", verify: bool = True) -> QuantizedModel:
    """Load a packed checkpoint; its linears run through the kernel registry (``kernel`` forces one).

    GPTQ and compressed-tensors folders written by other tools load too (`flexquant.interop`)."""
    from .interop import foreign_format, load_foreign

    if not is_checkpoint(path) and foreign_format(path):
        model, tok, info = load_foreign(path, kernel=kernel)
        return QuantizedModel(model.to(resolve_device(device)), tok, None, {"foreign": info})
    model, tok, qc = load_checkpoint(path, kernel=kernel, verify=verify)
    cfg = _recorded_config(path, qc.get("quant_config"))
    report_file = Path(path) / "report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    return QuantizedModel(model.to(resolve_device(device)), tok, cfg, report)


# Option names checkpoints made before the typed configs may hold, by method: old name -> current name.
_RENAMED_OPTIONS = {"flexible": {"seed": "rotation_seed"}, "adaptive": {"seed": "transform_seed"}}


def _recorded_config(path, recorded: dict | None) -> QuantConfig | None:
    """The `QuantConfig` a checkpoint records; older names are mapped, and a record this version cannot read
    only costs the config (the model loads all the same)."""
    if not recorded:
        return None
    recorded = dict(recorded)
    renames = _RENAMED_OPTIONS.get(recorded.get("method"), {})
    if isinstance(recorded.get("options"), dict):
        recorded["options"] = {renames.get(k, k): v for k, v in recorded["options"].items()}
    try:
        return QuantConfig.from_dict(recorded)
    except FlexQuantError as e:
        log.warning("%s: its recorded quantization config does not parse with this flexquant (%s); loaded "
                    "without it", path, e)
        return None


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / QUANT_CONFIG).is_file()


def export(path: str | Path, out: str | Path, format: str = "compressed-tensors", **options) -> dict:
    """Export the checkpoint at ``path`` as a compressed-tensors or GPTQ folder (`flexquant.interop`)."""
    from .interop import export_checkpoint

    return export_checkpoint(path, out, format, **options)


def as_model(obj, device):
    """(nn.Module, tokenizer, bpw or None) from a checkpoint path, model name, QuantizedModel or module."""
    if isinstance(obj, QuantizedModel):
        return obj.model, obj.tokenizer, obj.bpw
    if isinstance(obj, nn.Module):
        return obj, None, bit_summary(obj)["bpw"]
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
    win = eval_windows(tok, text, seqlen, windows)
    res = evaluate_windows(m, win, ref, dev, progress)
    res["bpw"] = bpw
    res["text"] = text
    return res


def generate(qmodel, prompt: str, max_new_tokens: int = 64, do_sample: bool = False) -> str:
    """Greedy (or sampled) continuation of ``prompt`` with the KV cache on."""
    model, tok, _ = as_model(qmodel, "cpu")
    if tok is None:
        raise FlexQuantError("this model has no tokenizer to encode the prompt")
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=True,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
