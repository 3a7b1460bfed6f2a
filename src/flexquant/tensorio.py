"""Reading safetensors files with plain reads, tensor by tensor (no memory map), and writing them without a copy.

A memory-mapped file counts every page it touches in the process's resident set until it is unmapped, so
reading a 4 GB model block by block through a map ends with 4 GB resident. Here each tensor is read with one
``readinto`` into its own buffer: what is resident is what the caller keeps. The format is the documented
safetensors layout: an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte offsets),
then the data. Nothing is unpickled.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import FlexQuantError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MANIFEST = "manifest.json"  # a flexquant checkpoint's checksums of its decoding-relevant files (`format.validate`)


@dataclass(frozen=True)
class Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, Entry]:
    """The tensors of one safetensors file, by name."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * 2**20:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise FlexQuantError(f"{path} is not a readable safetensors file ({e})") from e
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise FlexQuantError(f"{path}: tensor {name} has dtype {info.get('dtype')!r}, which flexquant cannot read")
        a, b = info["data_offsets"]
        out[name] = Entry(path, DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + a, b - a)
    return out


CONVERT_CHUNK = 16 << 20  # bytes read at a time when a tensor is converted as it is read


class TensorFiles:
    """The tensors of a folder's safetensors weights: one ``model.safetensors`` or shards with an index."""

    @classmethod
    def single(cls, file: str | Path) -> TensorFiles:
        """The tensors of one file."""
        self = cls.__new__(cls)
        self.folder, self.entries = Path(file).parent, read_header(Path(file))
        return self

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise FlexQuantError(f"{index} is not a valid safetensors index ({e})") from e
        elif (self.folder / SINGLE).is_file():
            files = [SINGLE]
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise FlexQuantError(f"{self.folder} holds no safetensors weights")
        self.entries: dict[str, Entry] = {}
        for name in files:
            if not (self.folder / name).is_file():
                raise FlexQuantError(f"{self.folder} is missing the weight shard {name} its index names")
            self.entries.update(read_header(self.folder / name))

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def rename(self, fn) -> TensorFiles:
        """Address every tensor by ``fn(stored name)`` from now on (a family's hub names as the model's own)."""
        self.entries = {fn(k): e for k, e in self.entries.items()}
        return self

    def names(self) -> list[str]:
        return list(self.entries)

    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def _entry(self, name: str) -> Entry:
        e = self.entries.get(name)
        if e is None:
            raise FlexQuantError(f"tensor {name} is not in the weights of {self.folder}")
        return e

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, read into fresh memory (converted to ``dtype`` when given)."""
        e = self._entry(name)
        if dtype is not None and dtype != e.dtype and e.nbytes > CONVERT_CHUNK:
            return self._get_converted(e, name, dtype)
        buf = torch.empty(e.nbytes, dtype=torch.uint8)
        with open(e.file, "rb") as f:
            f.seek(e.start)
            if e.nbytes and f.readinto(buf.numpy()) != e.nbytes:
                raise FlexQuantError(f"{e.file} is truncated (tensor {name}); re-download or re-save it")
        t = buf.view(e.dtype).reshape(e.shape) if e.nbytes else torch.empty(e.shape, dtype=e.dtype)
        return t if dtype is None or dtype == e.dtype else t.to(dtype)

    def _get_converted(self, e: Entry, name: str, dtype: torch.dtype) -> torch.Tensor:
        """A large tensor converted to ``dtype`` as it is read, CONVERT_CHUNK bytes at a time: never a whole copy
        in the stored dtype beside the result."""
        out = torch.empty(e.shape, dtype=dtype)
        flat, done = out.view(-1), 0
        for part in _read_parts(e, name):
            flat[done:done + part.numel()] = part
            done += part.numel()
        return out

    def lazy(self, name: str, dtype: torch.dtype | None = None) -> Lazy:
        """One tensor to be read (and converted to ``dtype``) a chunk at a time as it is written out
        (`write_stream`): never whole in memory."""
        e = self._entry(name)
        return Lazy(name, e, dtype or e.dtype)


def _read_parts(e: Entry, name: str):
    """The tensor of ``e`` as flat pieces of about CONVERT_CHUNK bytes in its stored dtype (one buffer, reused:
    each piece is valid until the next is read)."""
    size = e.dtype.itemsize
    buf = torch.empty(CONVERT_CHUNK // size * size, dtype=torch.uint8)
    with open(e.file, "rb") as f:
        f.seek(e.start)
        done = 0
        while done < e.nbytes:
            n = min(buf.numel(), e.nbytes - done)
            if f.readinto(buf[:n].numpy()) != n:
                raise FlexQuantError(f"{e.file} is truncated (tensor {name}); re-download or re-save it")
            yield buf[:n].view(e.dtype)
            done += n


@dataclass
class Lazy:
    """A tensor of a safetensors file read piece by piece, converted to ``dtype`` (`TensorFiles.lazy`)."""

    name: str
    entry: Entry
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.entry.shape

    def numel(self) -> int:
        return int(torch.Size(self.entry.shape).numel())

    def parts(self):
        """The converted values, a flat piece at a time; NaN or inf is refused, naming the tensor."""
        for part in _read_parts(self.entry, self.name):
            part = part.to(self.dtype)
            refuse_non_finite(self.name, part, self.entry.file.parent)
            yield part


def all_finite(t: torch.Tensor, bound: float | None = None, chunk: int = 1 << 22) -> bool:
    """Whether every element of ``t`` is finite (and, with ``bound``, of magnitude <= bound), checked a slice of
    ``chunk`` elements at a time: torch.isfinite of a whole float16 embedding holds ~2.5x its size in
    temporaries. Tensors that are not floating point pass."""
    if not t.is_floating_point():
        return True
    flat = t.detach().reshape(-1)
    for part in flat.split(chunk):
        ok = torch.isfinite(part).all() if bound is None else (part.abs() <= bound).all()
        if not bool(ok):
            return False
    return True


def refuse_non_finite(name: str, value: torch.Tensor, folder: Path) -> None:
    """A weight read from the files in ``folder`` that holds NaN or inf is refused, naming it."""
    if not all_finite(value):
        raise FlexQuantError(f"tensor {name} in {folder} holds NaN or inf: the weights are damaged or were saved in "
                             "a dtype that overflowed")


def write_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write ``tensors`` (CPU) as one safetensors file, each tensor's bytes straight from its own memory
    (`safetensors.torch.save_file` first copies every tensor to a bytes object: a second copy of the shard);
    returns the file's sha256. The layout is the documented one (readers need nothing of ours)."""
    names = sorted(tensors)
    return write_stream(path, [(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in names],
                        ((n, tensors[n]) for n in names), metadata)


def write_stream(path: str | Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]], stream,
                 metadata: dict[str, str] | None = None) -> str:
    """`write_file` for tensors that exist one at a time: ``layout`` declares (name, dtype, shape) of each, in
    order, and ``stream`` yields (name, tensor) in that order (each may be dropped once written); a `Lazy` tensor
    is read, converted and written a piece at a time."""
    import hashlib

    codes = {v: k for k, v in DTYPES.items()}
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in layout:
        if dtype not in codes:
            raise FlexQuantError(f"tensor {name} has dtype {dtype}, which a safetensors file cannot hold")
        n = dtype.itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": codes[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            f.write(chunk)
            h.update(chunk)
        for (name, dtype, shape), (got, t) in zip(layout, stream, strict=True):
            if got != name or t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"write_stream: {got} {t.dtype} {tuple(t.shape)} where the layout says {name} "
                                   f"{dtype} {tuple(shape)}")
            for part in t.parts() if isinstance(t, Lazy) else [t.detach().cpu().contiguous().reshape(-1)]:
                if part.numel():
                    view = memoryview(part.view(torch.uint8).numpy())
                    f.write(view)
                    h.update(view)
    return h.hexdigest()


def tensors_digest(folder: str | Path) -> str:
    """sha256 over every tensor of ``folder``'s safetensors files (one file or shards), in name order (name,
    dtype, shape, bytes): equal digests mean the same tensors whatever the metadata or the file layout."""
    import hashlib

    h = hashlib.sha256()
    where = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        where.update(dict.fromkeys(read_header(f), f))
    for name in sorted(where):
        t = TensorFiles.single(where[name]).get(name).contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def flexquant_traces(folder: str | Path) -> str | None:
    """What marks ``folder`` as a flexquant checkpoint (a manifest, a run record, a shard written by flexquant),
    or None: such a folder without its quant_config.json must not be read as a plain model."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for name in (MANIFEST, "recipe.yaml", "progress.json"):
        if (folder / name).is_file():
            return name
    for f in sorted(folder.glob("*.safetensors"))[:1]:
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(min(n, 1 << 24))) if 0 < n < 1 << 24 else {}
        except (OSError, ValueError):
            return None
        if "flexquant" in (header.get("__metadata__") or {}):
            return f.name
    return None


def move_args(obj, device, float_dtype: torch.dtype | None = None):
    """``obj`` (a block's arguments: tensors in tuples, lists, dicts) on ``device``, its floating tensors in
    ``float_dtype`` when given."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, float_dtype) if float_dtype is not None and obj.is_floating_point() else obj.to(device)
    if isinstance(obj, tuple):
        return tuple(move_args(o, device, float_dtype) for o in obj)
    if isinstance(obj, list):
        return [move_args(o, device, float_dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: move_args(v, device, float_dtype) for k, v in obj.items()}
    return obj
