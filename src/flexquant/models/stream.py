"""Where a model's weights live while it is quantized (its residency).

* `Residency` (in memory): the model was loaded whole; a block is moved to the compute device while it runs
  and back to the CPU after. Transforms are applied once, to every block, when they are registered.
* `Streamed`: the model is a skeleton on the meta device; a decoder block's tensors are read from the
  safetensors files (plain reads, `flexquant.tensorio`) when the pipeline reaches it, the registered transforms
  are applied to them, and they are dropped again when the pipeline leaves it, so host memory holds about one
  block at a time whatever the depth. The embedding, final norm and head ("the ends") are read only while they
  are used. A block can be kept (its quantized form stays resident) or handed to a writer and released.

A transform is a function ``fn(index, block)`` (blocks) or ``fn(model)`` (the ends) that changes weights in
place and gives the same result however often it is applied to freshly read weights; structural changes it
makes (a pre-hook, a submodule) must be idempotent.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Collection, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import FlexQuantError
from ..tensorio import TensorFiles, refuse_non_finite
from .spec import ModelSpec

log = logging.getLogger(__name__)
ATTRIBUTE = "flexquant_residency"


def residency(model: nn.Module, spec: ModelSpec | None = None) -> Residency:
    """The model's residency (a model loaded whole gets an in-memory one on first use)."""
    res = getattr(model, ATTRIBUTE, None)
    if res is None:
        if spec is None:
            from .spec import get_spec

            spec = get_spec(model.config.model_type, model.config)
        res = Residency(model, spec)
        object.__setattr__(model, ATTRIBUTE, res)  # not a submodule: no parameters, not in the state dict
    return res


def end_paths(spec: ModelSpec) -> tuple[str, str, str]:
    return spec.embed, spec.final_norm, spec.lm_head


class Residency:
    """A model held whole in memory."""

    streamed = False
    narrowing = False  # (see `Streamed`)

    def __init__(self, model: nn.Module, spec: ModelSpec):
        self.model, self.spec = model, spec
        self.layers = model.get_submodule(spec.layers)

    @contextlib.contextmanager
    def block(self, i: int, device: torch.device | str) -> Iterator[nn.Module]:
        """Block ``i`` on ``device`` for the duration (then back on the CPU)."""
        blk = self.layers[i]
        blk.to(device)
        try:
            yield blk
        finally:
            blk.to("cpu")

    @contextlib.contextmanager
    def ends(self, device: torch.device | str, parts: tuple[str, ...] = ()) -> Iterator[None]:
        """The modules at ``parts`` (model paths; default: embedding, final norm, head) on ``device``."""
        mods = self._load_ends(parts)
        for m in mods:
            m.to(device)
        try:
            yield
        finally:
            for m in mods:
                m.to("cpu")
                self._drop_end(m)

    def _load_ends(self, parts: tuple[str, ...]) -> list[nn.Module]:
        return [self.model.get_submodule(p) for p in (parts or end_paths(self.spec))]

    def _drop_end(self, module: nn.Module) -> None:
        """After an end was used: nothing for a model held whole."""

    def transform_blocks(self, fn: Callable[[int, nn.Module], None]) -> None:
        for i, blk in enumerate(self.layers):
            fn(i, blk)

    def transform_ends(self, fn: Callable[[nn.Module, set], None], groups: tuple | None = None) -> None:
        """``fn(model, paths)`` rewrites the ends at ``paths`` (all of them here, once); a streamed model calls it
        on the ends each read freshly brings in, ``groups`` the ends it must be given together (default: all)."""
        fn(self.model, set(end_paths(self.spec)))

    def keep(self, i: int) -> None:
        """Block ``i``'s weights are final: keep them resident (a no-op in memory)."""

    def release(self, i: int) -> None:
        """Drop block ``i``'s tensors (written elsewhere); a no-op for a model held whole."""

    def pin_all(self, reason: str = "") -> None:
        """Hold every block in memory from now on (for methods that need the whole model at once)."""

    def hold_wide(self, reason: str = "") -> None:
        """Blocks read from now on keep their weights in the compute dtype (no ``--block-weights`` narrowing),
        for methods that compute on them outside the linears' own forward."""

    def ends_one_at_a_time(self):
        """A model held whole has its ends in memory: nothing to stream (see `Streamed`)."""
        return None

    def block_weights_dtype(self) -> str:
        """The dtype a block's linear weights are held in while it is quantized (the report's
        ``memory.block_weights``)."""
        return str(self.model.dtype).replace("torch.", "")

    def materialized_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values() if not t.is_meta)


def _assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


def _release(module: nn.Module) -> None:
    for name, t in list(module.state_dict(keep_vars=True).items()):
        if not t.is_meta:
            _assign(module, name, torch.empty(t.shape, dtype=t.dtype, device="meta"))


# A weight held narrower than its inputs is widened at most this many bytes at a time (output rows in slabs).
WIDEN_SLAB_BYTES = 16 * 2**20


def wide_linear(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``lin``'s matmul (no hooks) in ``x``'s dtype: a weight held narrower is widened for the call only, by
    slabs of output rows past WIDEN_SLAB_BYTES (a 8192 × 2048 float16 weight: 16 MiB widened at a time, not 64);
    a `CodedLinear`'s rows are dequantized the same way."""
    dt, held, coded = x.dtype, lin.weight.dtype, getattr(lin, "coded", None)
    bias = None if lin.bias is None else lin.bias.to(dt)
    m, rows = lin.out_features, max(1, WIDEN_SLAB_BYTES // (lin.in_features * x.element_size()))

    def weight(a: int, b: int) -> torch.Tensor:
        return (lin.weight[a:b] if coded is None else coded.rows(a, b, held)).to(dt)

    if held == dt or m <= rows:
        return F.linear(x, weight(0, m), bias)
    out = x.new_empty(*x.shape[:-1], m)
    for a in range(0, m, rows):
        out[..., a:a + rows] = F.linear(x, weight(a, a + rows), None if bias is None else bias[a:a + rows])
    return out


class WideLinear(nn.Linear):
    """An nn.Linear whose weight may be held narrower than its inputs: it computes in the input's dtype on a
    transient widened copy. (A class, not a bound method on the instance: that would be a reference cycle, and a
    released block's weights would wait for the cyclic garbage collector.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return wide_linear(self, x)


class CodedLinear(WideLinear):
    """A quantized `WideLinear` until its block is packed: its weight is its `QuantResult` (``coded``: a byte per
    code instead of a 16-bit copy), each call dequantizing a slab of rows at a time into the 16-bit values the
    written-back weight would hold (the same outputs). ``weight`` is an empty tensor of the held dtype."""

    coded = None


class WideEmbedding(nn.Embedding):
    """An nn.Embedding whose table may be held narrower than the model computes (``compute_dtype``): the rows it
    looks up are widened, to the values a table read in that dtype would give."""

    compute_dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(self.compute_dtype)


def hold_quantized(linear: nn.Module, result) -> bool:
    """Give a narrow-held linear (`WideLinear`) its quantized ``result`` to compute from, in place of a dequantized
    16-bit weight; False (nothing done) for any other linear, whose caller writes the dequantized weight back."""
    if type(linear) is not WideLinear:
        return False
    linear.weight.data = torch.empty(0, dtype=linear.weight.dtype, device=linear.weight.device)
    linear.coded = result
    linear.__class__ = CodedLinear
    return True


HALF = (torch.float16, torch.bfloat16)


class Streamed(Residency):
    """A meta-device skeleton whose tensors are read from ``files`` block by block, in ``dtype``.

    ``narrow``: the linear weights of a block are held in the files' own 16-bit dtype and each linear computes
    in ``dtype`` on a transient widened copy (half the resident block; the quantized weights written back are
    rounded to that dtype). It applies while no block transform is registered and the model is not pinned:
    transforms (rotations, folded norms) compute on the block's weights and get them in ``dtype``."""

    streamed = True

    def __init__(self, model: nn.Module, spec: ModelSpec, files: TensorFiles, dtype: torch.dtype,
                 tied: bool = False):
        super().__init__(model, spec)
        self.files, self.dtype, self.tied = files, dtype, tied
        self.block_fns: list[Callable] = []
        self.end_fns: list[tuple] = []  # (fn, groups): `transform_ends`
        self.resident: set[int] = set()  # blocks whose tensors are in memory (kept or pinned)
        self.pinned = False
        self.reads = 0  # bytes read from the files (for the report)
        self.narrow = False

    @property
    def narrowing(self) -> bool:
        """Whether blocks read from now on hold their linear weights in the files' 16-bit dtype."""
        return self.narrow and not self.block_fns and not self.pinned

    def block_weights_dtype(self) -> str:
        held = self.dtype
        if self.narrowing:  # the files' dtype of the first block's linear weights, where it is a 16-bit one
            blk = self.layers[0]
            stored = self.files.entries[f"{self.spec.layers}.0.{self.spec.linears_in(blk)[0]}.weight"].dtype
            held = stored if stored in HALF else held
        return str(held).replace("torch.", "")

    def _narrow_names(self, blk: nn.Module) -> set[str]:
        """The block's linear weights to hold in the files' 16-bit dtype (none where narrowing does not apply)."""
        if not self.narrowing:
            return set()
        plain = (nn.Linear, WideLinear)  # (a subclass of nn.Linear may compute otherwise: left as it is)
        return {f"{n}.weight" for n in self.spec.linears_in(blk) if type(blk.get_submodule(n)) in plain}

    # ----- reading -----
    def _entry(self, full: str, t: torch.Tensor):
        """The files' entry for the skeleton's tensor ``t`` at ``full``, checked against it (present, a float where
        the model has one, the same shape)."""
        if full not in self.files:
            raise _missing(full, self.files)
        e = self.files.entries[full]
        if t.is_floating_point() and not e.dtype.is_floating_point:
            raise FlexQuantError(f"tensor {full} in {self.files.folder} is stored as {e.dtype}, not a float: the "
                                 "weights are damaged")
        if tuple(e.shape) != tuple(t.shape):
            raise FlexQuantError(f"tensor {full} in {self.files.folder} has shape {tuple(e.shape)}, the model's "
                                 f"config.json says {tuple(t.shape)}: the weights and the config do not match")
        return e

    def _read(self, module: nn.Module, prefix: str, narrow: Collection[str] = ()) -> None:
        for name, t in module.state_dict(keep_vars=True).items():
            if not t.is_meta:
                continue
            full = f"{prefix}.{name}"
            stored = self._entry(full, t).dtype
            keep = name in narrow and stored in HALF and stored != self.dtype
            value = self.files.get(full, None if keep or not t.is_floating_point() else self.dtype)
            refuse_non_finite(full, value, self.files.folder)
            self.reads += value.numel() * value.element_size()
            _assign(module, name, value)
            if keep and isinstance(module, nn.Embedding):
                module.__class__, module.compute_dtype = WideEmbedding, self.dtype
            elif keep:
                module.get_submodule(name.rpartition(".")[0]).__class__ = WideLinear

    def _load_block(self, i: int) -> None:
        blk = self.layers[i]
        self._read(blk, f"{self.spec.layers}.{i}", self._narrow_names(blk))
        for fn in self.block_fns:
            fn(i, blk)

    @contextlib.contextmanager
    def block(self, i: int, device: torch.device | str) -> Iterator[nn.Module]:
        fresh = i not in self.resident
        if fresh:
            self._load_block(i)
        blk = self.layers[i]
        blk.to(device)
        self._released = False
        try:
            yield blk
        finally:
            if not self._released:  # (released inside: handed to a writer)
                blk.to("cpu")
                if fresh and i not in self.resident and not self.pinned:
                    _release(blk)

    def _wanted_ends(self, parts: tuple[str, ...]) -> set[str]:
        """``parts`` (default: all ends) with what the transforms need read beside them (each transform's
        groups; tied ends all three)."""
        every = end_paths(self.spec)
        want = set(parts or every)
        for _, groups in self.end_fns:
            for group in (every,) if groups is None or self.tied else groups:
                if want & set(group):
                    want |= set(group)
        return want

    def _load_ends(self, parts: tuple[str, ...]) -> list[nn.Module]:
        embed, norm, head = end_paths(self.spec)
        want, fresh = self._wanted_ends(parts), set()
        mods = []
        for path in (embed, norm, head):
            if path not in want:
                continue
            mod, before = self.model.get_submodule(path), self.reads
            if path == head and self.tied and f"{head}.weight" not in self.files:
                emb = self.model.get_submodule(embed)
                if emb.weight.is_meta:
                    self._read(emb, embed)
                    mods.append(emb)
                    fresh.add(embed)
                if embed in fresh:  # the head is the embedding just read
                    fresh.add(head)
                mod.weight = emb.weight  # tied, as the model was saved
            else:  # an embedding read alone (no transform) keeps the files' 16-bit table: half the bytes
                alone = path == embed and head not in want and self.narrowing and not self.end_fns
                self._read(mod, path, ("weight",) if alone and type(mod) in (nn.Embedding, WideEmbedding) else ())
            if self.reads != before:
                fresh.add(path)
            mods.append(mod)
        if fresh:  # the transforms rewrite what was freshly read (held ends are transformed already)
            for fn, _ in self.end_fns:
                fn(self.model, fresh)
        return mods

    def _drop_end(self, module: nn.Module) -> None:
        if not self.pinned:
            _release(module)

    def ends_one_at_a_time(self):
        """For writing the rest of the model without holding it: (layout, stream) — the (name, dtype, shape) of
        every tensor outside the blocks and a generator of each as a `tensorio.Lazy` (read, converted and written a
        piece at a time) — or None where the ends must be read together (tied, rewritten by a transform, held, or
        other tensors)."""
        paths = end_paths(self.spec)
        state = {k: v for k, v in self.model.state_dict(keep_vars=True).items()
                 if not k.startswith(self.spec.layers + ".")}
        if (self.tied or self.end_fns or self.pinned or not all(t.is_meta for t in state.values())
                or not all(k.rpartition(".")[0] in paths for k in state)):
            return None
        layout = [(k, self.dtype if t.is_floating_point() else t.dtype, tuple(t.shape)) for k, t in state.items()]

        def stream():  # each tensor read, converted and written a piece at a time (`tensorio.Lazy`)
            for path in paths:
                for name, t in self.model.get_submodule(path).state_dict(keep_vars=True).items():
                    full = f"{path}.{name}"
                    self._entry(full, t)
                    lazy = self.files.lazy(full, self.dtype if t.is_floating_point() else None)
                    self.reads += lazy.numel() * lazy.dtype.itemsize
                    yield full, lazy
        order = {p: i for i, p in enumerate(paths)}
        layout.sort(key=lambda e: order[e[0].rpartition(".")[0]])
        return layout, stream()

    # ----- transforms and lifetime -----
    def transform_blocks(self, fn: Callable[[int, nn.Module], None]) -> None:
        self.block_fns.append(fn)
        for i in sorted(self.resident):
            _widen(self.layers[i], self.dtype)
            fn(i, self.layers[i])

    def transform_ends(self, fn: Callable[[nn.Module, set], None], groups: tuple | None = None) -> None:
        self.end_fns.append((fn, groups))
        if self.pinned:
            fn(self.model, set(end_paths(self.spec)))

    def keep(self, i: int) -> None:
        self.resident.add(i)

    def release(self, i: int) -> None:
        self.resident.discard(i)
        _release(self.layers[i])
        self._released = True

    def hold_wide(self, reason: str = "") -> None:
        if self.narrowing:
            log.info("blocks held in %s%s", str(self.dtype).replace("torch.", ""), f" ({reason})" if reason else "")
        self.narrow = False

    def pin_all(self, reason: str = "") -> None:
        """Read every block and the ends once and keep them (the model is then held whole)."""
        if self.pinned:
            return
        log.info("holding the whole model in memory%s", f" ({reason})" if reason else "")
        for i in sorted(self.resident):
            _widen(self.layers[i], self.dtype)
        self.pinned = True  # (no narrowing from here)
        for i in range(len(self.layers)):
            if i not in self.resident:
                self._load_block(i)
                self.resident.add(i)
        self._load_ends(())


def _widen(blk: nn.Module, dtype: torch.dtype) -> None:
    """A resident block's narrowed linear weights back in ``dtype`` (before a transform computes on them)."""
    for mod in blk.modules():
        if isinstance(mod, nn.Linear) and not mod.weight.is_meta and mod.weight.dtype != dtype:
            mod.weight = nn.Parameter(mod.weight.to(dtype), requires_grad=False)


def _missing(name: str, files: TensorFiles) -> FlexQuantError:
    return FlexQuantError(f"tensor {name} is missing from the weights in {files.folder}: the files do not match "
                          "the model's config.json (a truncated download or a different architecture)")
