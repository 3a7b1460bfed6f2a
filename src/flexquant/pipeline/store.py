"""The one place activations kept between blocks live: the quantized stream, the full-precision block inputs
(LFD, learned quantizers), the Fisher pass's inputs, probe inputs.

Tensors are kept in a storage dtype (float16 by default; statistics are still accumulated in float32) and
handed back in the dtype they were put in. With a byte budget, what would exceed it is written to raw files
under an offload folder and read back with plain reads (no memory map, so a spilled tensor is resident only
while its reader holds it). A batch whose values do not fit float16 (|x| > 65504) is kept in float32.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Hashable, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import alive
from ..config import parse_bytes  # noqa: F401 - re-exported for callers of the store
from ..errors import FlexQuantError
from .capture import BlockInputs

log = logging.getLogger(__name__)
STORE_PREFIX = "flexquant-store-"  # + PID: a spill folder names the process that owns it
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
F16_MAX = 65504.0


@dataclass
class _Kept:
    """One kept batch: in memory (``tensor``) or in a file (``path``), with its original dtype."""

    dtype: torch.dtype  # dtype it was put in (and is given back in)
    shape: tuple[int, ...]
    stored: torch.dtype
    tensor: torch.Tensor | None = None
    path: Path | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * torch.empty((), dtype=self.stored).element_size()


class ActivationStore:
    """Block inputs (`BlockInputs`) by key, in ``dtype``, spilling to ``offload_dir`` beyond ``max_bytes``."""

    def __init__(self, dtype: str | torch.dtype = "float16", max_bytes: int | None = None,
                 offload_dir: str | Path | None = None):
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.max_bytes = max_bytes
        self._dir_given = Path(offload_dir) if offload_dir else None
        self._dir: Path | None = None
        self._items: dict[Hashable, tuple[list[_Kept], list[dict]]] = {}
        self._count = 0
        self.reserved = 0  # bytes of the budget held for what is not the store's (`reserve`)
        self.memory_bytes = self.disk_bytes = 0
        self.peak_memory_bytes = self.peak_disk_bytes = self.written_bytes = 0

    # ----- the interface -----
    def put(self, key: Hashable, inputs: BlockInputs, exact: bool = False) -> None:
        """Keep ``inputs`` under ``key`` (replacing what was there); ``exact``: in their own dtype."""
        self.drop(key)
        kept = [self._keep(h, exact) for h in inputs.hidden]
        self._items[key] = (kept, list(inputs.kwargs))

    def get(self, key: Hashable, lazy: bool = False) -> BlockInputs | None:
        """The inputs kept under ``key`` (fresh tensors in their original dtype), or None. ``lazy``: each batch
        is read (and converted) only when it is used, so a pass over the batches holds one working copy at a
        time instead of all of them."""
        item = self._items.get(key)
        if item is None:
            return None
        kept, kwargs = item
        return BlockInputs(Batches(self, kept) if lazy else [self._load(k) for k in kept], kwargs)

    def drop(self, key: Hashable) -> None:
        item = self._items.pop(key, None)
        if item is None:
            return
        for k in item[0]:
            if k.path is not None:
                k.path.unlink(missing_ok=True)
                self.disk_bytes -= k.nbytes
            else:
                self.memory_bytes -= k.nbytes

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def reserve(self, nbytes: int) -> bool:
        """Hold ``nbytes`` of the budget for what the store cannot spill (a block's weights, its largest Hessian
        and solve): what is put from now on stays in memory only within the rest. False when nothing is left
        (everything put then goes to disk)."""
        self.reserved = nbytes
        return self.max_bytes is None or nbytes < self.max_bytes

    def close(self) -> None:
        """Forget everything and remove the spill files with the store's own folder."""
        for key in list(self._items):
            self.drop(key)
        if self._dir is not None:  # the store's own folder (under --offload-dir, which stays)
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None

    def summary(self) -> dict:
        return {"dtype": str(self.dtype).replace("torch.", ""), "max_bytes": self.max_bytes,
                "peak_memory_bytes": self.peak_memory_bytes, "peak_disk_bytes": self.peak_disk_bytes,
                "written_bytes": self.written_bytes,
                "offload_dir": str(self._dir or self._dir_given or "") or None}

    # ----- keeping one tensor -----
    def _stored(self, h: torch.Tensor, exact: bool = False) -> torch.dtype:
        """The dtype ``h`` is kept in."""
        narrower = h.is_floating_point() and h.element_size() > self.dtype.itemsize
        stored = self.dtype if narrower and not exact else h.dtype
        if stored == torch.float16 and bool(h.abs().amax() > F16_MAX):
            stored = h.dtype  # would overflow float16: keep this batch as it is
        return stored

    def as_kept(self, inputs: BlockInputs) -> BlockInputs:
        """``inputs`` as `put` and `get` would give them back (rounded to the store's dtype); nothing is kept.
        Lazy inputs (`Batches`) stay lazy: each batch is rounded when it is read."""
        if isinstance(inputs.hidden, Batches):
            return inputs.with_hidden(Batches(self, inputs.hidden._kept, rounded=True))
        return inputs.with_hidden([self._rounded(h) for h in inputs.hidden])

    def _rounded(self, h: torch.Tensor) -> torch.Tensor:
        return h.to(self._stored(h)).to(h.dtype)

    def _keep(self, h: torch.Tensor, exact: bool = False) -> _Kept:
        h = h.detach()
        stored = self._stored(h, exact)
        k = _Kept(h.dtype, tuple(h.shape), stored)
        data = h.to("cpu", stored)
        if self.max_bytes is not None and self.memory_bytes + k.nbytes > self.max_bytes - self.reserved:
            k.path = self._spill(data)
            self.disk_bytes += k.nbytes
            self.written_bytes += k.nbytes
            self.peak_disk_bytes = max(self.peak_disk_bytes, self.disk_bytes)
        else:
            k.tensor = data  # may be the caller's tensor itself (float32 storage): nobody writes to kept inputs
            self.memory_bytes += k.nbytes
            self.peak_memory_bytes = max(self.peak_memory_bytes, self.memory_bytes)
        return k

    def _folder(self) -> Path:
        if self._dir is None:
            parent = self._dir_given or Path(tempfile.gettempdir())
            parent.mkdir(parents=True, exist_ok=True)
            remove_stale_stores(parent)
            self._dir = Path(tempfile.mkdtemp(dir=parent, prefix=f"{STORE_PREFIX}{os.getpid()}-"))
        return self._dir

    def _spill(self, data: torch.Tensor) -> Path:
        self._count += 1
        path = self._folder() / f"{self._count:08d}.bin"
        raw = data.contiguous().view(torch.uint8) if data.numel() else data
        try:
            raw.numpy().tofile(path)
        except OSError as e:
            raise FlexQuantError(f"could not write kept activations to {path.parent} ({e}); free disk space there "
                                 "or pass another --offload-dir") from e
        return path

    def _load(self, k: _Kept) -> torch.Tensor:
        if k.tensor is not None:
            return k.tensor.to(k.dtype)  # the kept tensor itself when no conversion is needed: read-only
        raw = torch.from_numpy(np.fromfile(k.path, dtype=np.uint8))
        return raw.view(k.stored).reshape(k.shape).to(k.dtype)

    def __del__(self) -> None:  # spill files never outlive the run
        if self._dir is not None and os.path is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def remove_stale_stores(parent: Path) -> None:
    """Spill folders under ``parent`` left by runs whose process is gone (killed before it could clean up)."""
    for d in parent.glob(f"{STORE_PREFIX}*"):
        pid = d.name[len(STORE_PREFIX):].split("-", 1)[0]
        if d.is_dir() and pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            log.warning("removed %s, kept activations of an earlier run (process %s) that was killed", d, pid)


class Batches(Sequence):
    """A read-only list of kept batches, each read from its store when it is indexed or iterated."""

    def __init__(self, store: ActivationStore, kept: list[_Kept], rounded: bool = False):
        self._store, self._kept, self._as_kept = store, kept, rounded  # rounded: as `as_kept` gives them

    def __len__(self) -> int:
        return len(self._kept)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Batches(self._store, self._kept[i], self._as_kept)
        return self._read(self._kept[i])

    def __iter__(self):
        return (self._read(k) for k in self._kept)

    def _read(self, k: _Kept) -> torch.Tensor:
        h = self._store._load(k)
        return self._store._rounded(h) if self._as_kept else h

    def shapes(self) -> list[tuple[int, ...]]:
        return [k.shape for k in self._kept]

    @property
    def dtype(self) -> torch.dtype:
        return self._kept[0].dtype


class KeptList:
    """A list of tensors kept in a store in their own dtype (under its budget, spilling like everything else):
    appended, read back by index (slices give lists), and freed by index or as it drains."""

    def __init__(self, store: ActivationStore, key: Hashable):
        self.store, self.key, self._n = store, key, 0

    def append(self, t: torch.Tensor) -> None:
        self.store.put((self.key, self._n), BlockInputs([t], [{}]), exact=True)
        self._n += 1

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(self._n)[i]]
        item = self.store.get((self.key, range(self._n)[i]))
        if item is None:
            raise IndexError(f"kept tensor {i} was freed")
        return item.hidden[0]

    def __iter__(self):
        return (self[i] for i in range(self._n))

    def __setitem__(self, i: int, t: torch.Tensor) -> None:
        self.store.put((self.key, range(self._n)[i]), BlockInputs([t], [{}]), exact=True)

    def free(self, i: int) -> None:
        self.store.drop((self.key, i))

    def drain(self):
        """Each tensor still held, in turn, freed from the store once handed out."""
        for i in range(self._n):
            if (self.key, i) not in self.store:
                continue
            t = self[i]
            self.free(i)
            yield t


def itemsize(hidden) -> int:
    """Bytes per element of a block's input batches as they are handed out."""
    return hidden.dtype.itemsize if isinstance(hidden, Batches) else hidden[0].element_size()


def shapes(hidden) -> list[tuple[int, ...]]:
    """The shapes of a block's input batches (kept ones are not read for it)."""
    return hidden.shapes() if isinstance(hidden, Batches) else [tuple(h.shape) for h in hidden]


class TensorMap(MutableMapping):
    """{name: tensor} kept in a store in the tensors' own dtype (statistics stay float32), under the budget like
    everything else. Names set in a row to the same tensor (a linear group's shared Hessian) share one entry;
    the last tensor read is handed out again while the same entry is asked for."""

    def __init__(self, store: ActivationStore, prefix: str):
        self.store, self.prefix = store, prefix
        self._keys: dict[str, tuple] = {}
        self._set: tuple[torch.Tensor, tuple] | None = None  # the last tensor set and its entry
        self._got: tuple[tuple, torch.Tensor] | None = None  # the last entry read and its tensor
        self._count = 0

    def __setitem__(self, name: str, t: torch.Tensor) -> None:
        if self._set is not None and self._set[0] is t:
            key = self._set[1]
        else:
            self._count += 1
            key = (self.prefix, self._count)
            self.store.put(key, BlockInputs([t], [{}]), exact=True)
            self._set = (t, key)
        self._keys[name] = key

    def __getitem__(self, name: str) -> torch.Tensor:
        key = self._keys[name]
        if self._got is None or self._got[0] != key:
            self._got = (key, self.store.get(key).hidden[0])
        return self._got[1]

    def __contains__(self, name) -> bool:  # (without reading the tensor back)
        return name in self._keys

    def __delitem__(self, name: str) -> None:
        key = self._keys.pop(name)
        if key not in self._keys.values():
            self.store.drop(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def clear(self) -> None:
        for key in set(self._keys.values()):
            self.store.drop(key)
        self._keys.clear()
        self._set = self._got = None


def MemoryStore() -> ActivationStore:  # noqa: N802 - the in-memory store of earlier versions
    """An unbounded store that keeps tensors as they are (float32 stays float32)."""
    return ActivationStore("float32")
