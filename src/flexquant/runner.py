"""One quantization run (`flexquant.quantize`): calibration windows, the pipeline with per-block packing, the
report, and where the packed blocks go: kept in memory, or written shard by shard into a folder (resumable).

`QuantizedModel` is what a run returns. No algorithm lives here either.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .actquant.runtime import attach as attach_actquant
from .actquant.runtime import install as install_actquant
from .actquant.runtime import stored_bits as actquant_bits
from .alloc.cost import result_bits
from .atomic import check_target, move_into_place
from .config import QuantConfig, parse_bytes
from .data import calibration_windows
from .errors import FlexQuantError
from .eval import peak_device_mb, peak_rss_mb
from .format.checkpoint import PROGRESS, QUANT_CONFIG, CheckpointWriter, install_packed
from .models import experts, get_spec, load_model
from .models.loader import load_streamed
from .models.stream import residency
from .nn.quant_linear import QuantLinear
from .pipeline import (
    ActivationStore,
    BlockInputs,
    LinearRecord,
    capture_block_inputs,
    prepare_model,
    quantize_blocks,
    run_block,
)
from .pipeline.blocks import batch_bytes
from .pipeline.distributed import Dist
from .pipeline.progress import trim_heap
from .recipe import RECIPE, write_recipe
from .report import bit_summary, build_report, plot_flexible, plot_hiratio, plot_report, summarize_bits

log = logging.getLogger(__name__)


@dataclass
class QuantizedModel:
    """A packed model (linears are `QuantLinear`s), its tokenizer, and what is known about its making."""

    model: nn.Module
    tokenizer: object
    config: QuantConfig | None = None
    report: dict = field(default_factory=dict)
    path: Path | None = None  # where the checkpoint was written as the run went (`quantize(out=...)`)

    @property
    def bpw(self) -> float:
        if self.path is not None and not materialized(self.model):
            return self.report["summary"]["bpw"]
        return bit_summary(self.model)["bpw"]


def materialized(model: nn.Module) -> bool:
    return not any(t.is_meta for t in model.state_dict().values())


def check_group_size(model: nn.Module, spec, group_size: int) -> None:
    sizes = {}  # (a mixture-of-experts model's blocks may differ: every block's linears)
    for layer in model.get_submodule(spec.layers)[: None if spec.experts else 1]:
        sizes.update({name: layer.get_submodule(name).in_features for name in spec.linears_in(layer)})
    for name, n in sizes.items():
        if n % group_size:
            raise FlexQuantError(
                f"group_size={group_size} does not divide the input dimension {n} of {name}; "
                f"choose a divisor of {n} (e.g. 32 or 64)"
            )


def pack_results(model: nn.Module, results: dict) -> None:
    """Replace each quantized linear by a `QuantLinear` built from its `QuantResult` (with the online rotation
    the result carries); the stored bits are checked against the cost model (`alloc.cost`)."""
    for name, r in results.items():
        parent, _, child = name.rpartition(".")
        lin = model.get_submodule(name)
        q = QuantLinear.from_result(r, lin.bias, dtype=lin.weight.dtype, rotation=r.rotation)
        planned = result_bits(r, r.rotation)
        if q.stored_bits() != planned:
            log.warning("%s stores %d bits, the cost model planned %d: the reported bpw is the stored one",
                        name, q.stored_bits(), planned)
        setattr(model.get_submodule(parent), child, q)


def pack_model(model: nn.Module, results: dict, runtime=None) -> nn.Module:
    """`pack_results`, then connect the activation/KV runtime of weight-activation methods (``runtime``, or
    the one the model already holds)."""
    pack_results(model, results)
    if runtime is not None:
        install_actquant(model, runtime)
    else:
        attach_actquant(model)  # a runtime the model holds follows its packed linears (no-op without one)
    return model


def load_for_run(config: QuantConfig, device: torch.device):
    """(model, tokenizer): streamed block by block when the config allows and the model has safetensors files,
    else loaded whole. On the CPU, half-precision weights are computed in float32."""
    cpu = device.type == "cpu"
    if config.stream != "off":
        loaded = load_streamed(config.model, torch.float32 if cpu else None, strict=config.stream == "on")
        if loaded is not None:
            residency(loaded[0]).narrow = narrow_blocks(config)
            return loaded
        if config.stream == "on":
            raise FlexQuantError(f"--stream on needs a model folder with safetensors weights; {config.model} has "
                                 "none (it is built in code or stored otherwise): pass --stream auto or off")
    model, tok = load_model(config.model)
    if cpu and model.dtype in (torch.float16, torch.bfloat16):
        model = model.float()
    return model, tok


def narrow_blocks(config: QuantConfig) -> bool:
    """Whether a streamed block's linear weights stay in the files' 16-bit dtype (``--block-weights``)."""
    return config.block_weights == "stored" or (config.block_weights == "auto" and bool(config.max_memory))


def check_budget(model: nn.Module, config: QuantConfig) -> None:
    """--max-memory must hold at least one batch of a block's inputs (float32): below that nothing fits."""
    budget = parse_bytes(config.max_memory)
    batch = batch_bytes(config.batch_size, config.seqlen, model.config.hidden_size)
    if budget is not None and budget < batch:
        raise FlexQuantError(f"--max-memory {config.max_memory} is less than one batch of a block's inputs needs "
                             f"({batch / 2**20:.1f} MiB = {config.batch_size} windows × {config.seqlen} tokens × "
                             f"{model.config.hidden_size} floats); raise it or lower --batch-size")


def check_context(model: nn.Module, seqlen: int) -> None:
    """Windows longer than the model's context would be computed with positions it never saw."""
    context = getattr(model.config, "max_position_embeddings", None)
    if isinstance(context, int) and seqlen > context:
        raise FlexQuantError(f"--seqlen {seqlen} is longer than the model's context of {context} tokens; use "
                             f"--seqlen {context} or less")


def _store(config: QuantConfig) -> ActivationStore:
    return ActivationStore(config.store_dtype, parse_bytes(config.max_memory), config.offload_dir or None)


class Run:
    """One quantization run's steps (`quantize`): calibration data, the pipeline with per-block packing, the
    report; the packed blocks either stay in memory or go to a checkpoint writer as they are finished."""

    def __init__(self, config, method, model, tok, device, load_seconds, calib_ids, progress, dist):
        self.config, self.method, self.model, self.tok, self.device = config, method, model, tok, device
        self.dist, self.discard = dist, False
        self.spec = get_spec(model.config.model_type, model.config)
        self.res = residency(model, self.spec)
        check_group_size(model, self.spec, config.grid.group_size)
        check_budget(model, config)
        if method.needs_calibration:
            check_context(model, config.seqlen)
        self.given = calib_ids is not None
        if method.needs_calibration and calib_ids is None:
            calib_ids = calibration_windows(tok, config.calib, config.nsamples, config.seqlen, config.seed)
            trim_heap()  # (tokenizing the text leaves small freed blocks glibc would keep: ~14 MiB)
        self.calib_ids = calib_ids if method.needs_calibration else None
        self.load_seconds, self.progress = load_seconds, progress
        self.bits: dict[str, tuple[int, int]] = {}  # packed linear -> (stored bits, weights)
        self.records: list[LinearRecord] = []
        self.notes: list[dict] = []
        self.writer: CheckpointWriter | None = None

    def _on_block(self, i: int, block: nn.Module, results: dict) -> None:
        pack_results(self.model, results)
        for name in results:
            q = self.model.get_submodule(name)
            self.bits[name] = (q.stored_bits(), q.in_features * q.out_features)
        if self.discard:  # a rank other than 0 writing to a folder: rank 0 writes, this one forgets
            self.res.release(i)
        elif self.writer is not None:
            self.writer.add(i, block, f"{self.spec.layers}.{i}.")
            self.res.release(i)
            self.writer.save_state({"config": _resumable(self.config), "blocks": i + 1, "notes": self.notes,
                                    "records": [asdict(r) for r in self.records], "bits": self.bits})
        else:
            self.res.keep(i)

    def _quantize(self, start: int = 0) -> dict:
        c = self.config
        log.info("quantizing %s with %s at %d bits, group %d on %s%s", c.model, c.method, c.grid.bits,
                 c.grid.group_size, self.device, " (weights streamed block by block)" if self.res.streamed else "")
        t0 = time.perf_counter()
        store = _store(c)
        try:
            calib = self.calib_ids
            with experts.calibration(self.model, c.moe_calibration):
                stats = prepare_model(self.model, self.spec, self.method, calib, self.device, c.batch_size,
                                      self.progress, store, self.dist, start)
                inputs = self._replay(start, store) if start and self.method.needs_calibration else None
                quantize_blocks(self.model, self.spec, self.method, calib, self.device, c.batch_size,
                                self.progress, stats=stats, store=store, on_block=self._on_block, start=start,
                                inputs=inputs, records=self.records, notes=self.notes, dist=self.dist)
        finally:
            store.close()
        records, notes = self.records, self.notes
        if self.method.runtime is not None:
            install_actquant(self.model, self.method.runtime)
        else:
            attach_actquant(self.model)
        bits = summarize_bits(self.bits, actquant_bits(self.model))
        report = build_report(c, bits, records, notes, time.perf_counter() - t0, peak_rss_mb(),
                              None if self.calib_ids is None else int(self.calib_ids.numel()))
        report["summary"]["load_seconds"] = self.load_seconds
        if (device_mb := peak_device_mb()) is not None:
            report["summary"]["peak_device_mb"] = device_mb
        report["calibration"]["windows_given"] = self.given  # passed in by the caller: a recipe redraws its own
        report["method"] = self.method.summary()
        if self.dist.active:
            report["distributed"] = _distributed_facts(self.dist, notes)
        moe = experts.summary(records, c.moe_calibration)
        if moe["linears"]:  # (a discovered MoE family's experts too)
            report["experts"] = moe
        report["memory"] = {"streamed": self.res.streamed, "store": store.summary(),
                            "block_weights": self.res.block_weights_dtype(),
                            "weights_read_bytes": getattr(self.res, "reads", None)}
        return report

    def in_memory(self) -> QuantizedModel:
        report = self._quantize()
        self.res.pin_all()  # a streamed model's ends are read now: the packed model is complete in memory
        return QuantizedModel(self.model, self.tok, self.config, report)

    def discarding(self) -> QuantizedModel:
        """This rank's share of a run that rank 0 writes: the packed blocks are not kept."""
        self.discard = True
        return QuantizedModel(self.model, self.tok, self.config, self._quantize())

    def to_folder(self, out: Path, overwrite: bool, resume: bool, plot: bool) -> QuantizedModel:
        """The run written block by block into ``.<out>.partial``, renamed to ``out`` when complete."""
        check_target(out, overwrite, QUANT_CONFIG, "flexquant checkpoint")
        n = len(self.model.get_submodule(self.spec.layers))
        folder = out.parent / f".{out.name}.partial"
        start = self._open_folder(folder, n + 1, resume)
        try:
            report = self._quantize(start)
            one_by_one = self.res.ends_one_at_a_time()
            if one_by_one is not None:  # the ends read and written one at a time
                self.writer.add_stream(n, *one_by_one)
            else:
                with self.res.ends("cpu"):
                    self.writer.add(n, self.model, "", skip=self.spec.layers)
            qm = QuantizedModel(self.model, self.tok, self.config, report, path=out)
            self.writer.finish(self.model, self.tok, checkpoint_meta(qm))
            checkpoint_extras(qm, plot)(folder)
        except BaseException:
            if (folder / PROGRESS).is_file():
                log.warning("the finished blocks are kept in %s: run the same command with --resume to continue "
                            "from there (or delete that folder)", folder)
            else:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        move_into_place(folder, out)
        return qm

    def _open_folder(self, folder: Path, shards: int, resume: bool) -> int:
        """A fresh writer (an old unfinished run is discarded), or with ``resume`` the unfinished run's writer and
        state; the number of finished blocks."""
        if resume and (folder / PROGRESS).is_file():
            if not self.method.resumable:
                raise FlexQuantError(f"--method {self.method.name} cannot resume a run (its per-block state is "
                                     f"not on disk); delete {folder} and run again without --resume")
            self.writer, state = CheckpointWriter.resume(folder, shards)
            differ = config_differences(state["config"], _resumable(self.config))
            if differ:
                raise FlexQuantError(f"the unfinished run in {folder} was made with another config ({differ}); run "
                                     "the command that started it with --resume, or delete that folder")
            self.records = [LinearRecord(**{**r, "shape": tuple(r["shape"])}) for r in state["records"]]
            self.notes, self.bits = state["notes"], {k: tuple(v) for k, v in state["bits"].items()}
            log.info("resuming at block %d of %d from %s", state["blocks"], shards - 1, folder)
            return state["blocks"]
        if resume:
            log.warning("no unfinished run in %s: starting from the first block", folder)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        self.writer = CheckpointWriter(folder, shards)
        return 0

    @torch.no_grad()
    def _replay(self, k: int, store: ActivationStore) -> BlockInputs:
        """The quantized stream entering block ``k``: the calibration windows through the finished, packed blocks
        read back from their shards (kept in the store between blocks, as the block loop keeps it)."""
        spec, layers = self.spec, self.model.get_submodule(self.spec.layers)
        with self.res.ends(self.device, (spec.embed,)):
            bs = self.config.batch_size
            store.put("stream", capture_block_inputs(self.model, spec, self.dist.shard(self.calib_ids, bs),
                                                     self.device, bs))
        for j in range(k):
            inputs, prefix = store.get("stream"), f"{spec.layers}.{j}."
            tensors = self.writer.read_block(j)
            install_packed(layers[j], self.writer.modules, tensors, None, self.writer.folder, prefix)
            layers[j].load_state_dict({n[len(prefix):]: t for n, t in tensors.items()}, strict=False, assign=True)
            if self.res.streamed:
                self.res.keep(j)
            with self.res.block(j, self.device) as block:
                out = run_block(block, inputs, self.device)
            self.res.release(j)
            store.put("stream", BlockInputs(out, inputs.kwargs))
        return store.get("stream")


def _distributed_facts(dist: Dist, notes: list[dict]) -> dict:
    """Ranks, sharding and the collective volume (this rank's payload; per block in the block notes)."""
    total = dist.volume()
    blocks = {k: sum(n.get(k, 0) for n in notes) for k in total}
    return {"world": dist.world, "backend": "nccl" if dist.comm.type == "cuda" else "gloo", "exact": dist.exact,
            "sharding": "round-robin batches (batch j on rank j % world)",
            "solves": "linear k of a group on rank k % world", **{f"{k}_total": v for k, v in total.items()},
            **{f"{k}_statistics_pass": v - blocks[k] for k, v in total.items()}}


def _resumable(config: QuantConfig) -> dict:
    """The config fields that decide the result (memory and streaming settings may change on resumption)."""
    plain = config.to_plain()
    for name in ("stream", "max_memory", "offload_dir", "device"):
        plain.pop(name, None)
    plain["block_weights"] = narrow_blocks(config)  # (--max-memory decides it under auto)
    return plain


def config_differences(saved: dict, now: dict) -> str:
    """The settings in which an unfinished run's saved config and this one differ, as ``name: then → now``
    ('' when none). A saved config from before ``block_weights`` existed held its blocks in float32."""
    saved = {"block_weights": False, **saved}
    names = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    return "; ".join(f"{k}: {saved.get(k)!r} then, {now.get(k)!r} now" for k in names)


def checkpoint_meta(qmodel: QuantizedModel) -> dict:
    return {"quant_config": qmodel.config.to_dict() if qmodel.config else None,
            "summary": qmodel.report.get("summary")}


def checkpoint_extras(qmodel: QuantizedModel, plot: bool):
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
    return extras
