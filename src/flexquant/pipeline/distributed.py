"""Distributed quantization over `torch.distributed` (``torchrun --nproc-per-node N -m flexquant quantize ...``).

`Dist` is the one object the pipeline consults; a single process (WORLD_SIZE unset or 1) gets `SINGLE`, whose
every method is the identity, so single-process runs are exactly what they were.

* **Sharding.** Calibration windows are cut into the run's batches (``batch_size`` windows each, in order) and
  the batches are dealt round-robin: global batch j goes to rank j % world. A rank's share of the first K
  windows is then a prefix of its share of all windows, so the full-precision inputs the statistics pass keeps
  line up batch by batch with the block loop's quantized stream on every rank.
* **Statistics.** Exact by default: a per-token statistic is accumulated on every rank from all ranks' batches in
  the global batch order, so the float operations are those of one process and the result is bit-identical to
  it. Hessians (`accumulator` / `reduce_hessian`): each rank keeps its batches' linear inputs (float32, CPU) and
  at the end every batch is broadcast by its owner and added in order (volume: the inputs, T·n per group).
  Fisher rows and other per-batch sums (`batch_terms` / `sum_batches`): the per-batch terms, gathered in order.
  Block outputs a method needs whole (`gather_batches`): the batches themselves. With FLEXQUANT_DIST_EXACT=0
  Hessians are instead reduced as Σ_r T_r·H_r / Σ_r T_r (float64 all-reduce of n² per group; cheaper in bytes,
  but float order differs from one process, and GPTQ amplifies last-bit differences into other codes).
* **Solves.** Linear k of a group is solved by rank k % world (`owner`); its `QuantResult` is broadcast
  (pickled, CPU tensors) so that every rank writes the same fake-quant weight back and continues identically.
* **Volume.** ``reduced_bytes`` / ``broadcast_bytes`` count the payload this rank reduced / broadcast or received.
"""

from __future__ import annotations

import datetime
import os
import pickle
from dataclasses import dataclass, field, fields, is_dataclass, replace

import torch

from ..errors import FlexQuantError
from ..quant.hessian import HessianAccumulator


def env_world() -> int:
    """WORLD_SIZE as torchrun sets it (1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def env_rank() -> int:
    """RANK as torchrun sets it (0 when unset): usable before the process group exists (logging, progress)."""
    return int(os.environ.get("RANK", "0") or 0)


def close_process_group() -> None:
    """Leave the default process group if this process joined one (`Dist.from_env`)."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.destroy_process_group()


def _move(obj, device):
    """``obj`` with every tensor it holds (dataclass fields, lists, dicts) on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if is_dataclass(obj) and not isinstance(obj, type):
        return replace(obj, **{f.name: _move(getattr(obj, f.name), device) for f in fields(obj) if f.init})
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    if hasattr(obj, "__dict__") and any(isinstance(v, torch.Tensor) for v in vars(obj).values()):
        out = object.__new__(type(obj))
        out.__dict__.update({k: _move(v, device) for k, v in vars(obj).items()})
        return out
    return obj


@dataclass(eq=False)  # hashable: a shared default (SINGLE) of other dataclasses' fields
class Dist:
    """This process's place in the run: ``rank`` of ``world``; ``comm`` the device collectives run on."""

    rank: int = 0
    world: int = 1
    comm: torch.device = torch.device("cpu")
    reduced_bytes: int = 0
    broadcast_bytes: int = 0
    last_weights: list = field(default_factory=list)  # Σ_r w_r of the last all_reduce_mean_weighted
    exact: bool = True  # statistics replayed in the global batch order (bit-identical to one process)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> Dist:
        """`SINGLE` without torchrun; else join (or reuse) the default process group: gloo for a CPU
        ``device``, NCCL for CUDA (each rank on cuda:LOCAL_RANK, see `local_device`)."""
        world = env_world()
        if world <= 1:
            return SINGLE
        import torch.distributed as td

        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not td.is_initialized():
            td.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
        comm = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        return cls(td.get_rank(), td.get_world_size(), comm, exact=os.environ.get("FLEXQUANT_DIST_EXACT", "1") != "0")

    def local_device(self, device: torch.device) -> torch.device:
        """The compute device of this rank: cuda:LOCAL_RANK for a CUDA run, ``device`` otherwise."""
        return self.comm if self.active and self.comm.type == "cuda" else device

    # ----- sharding -----
    def owns_batch(self, j: int) -> bool:
        return j % self.world == self.rank

    def shard(self, ids: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
        """This rank's windows of ``ids`` [N, L]: the batches j with j % world == rank, in order."""
        if ids is None or not self.active:
            return ids
        n = ids.shape[0]
        starts = list(range(0, n, batch_size))
        if len(starts) < self.world:
            raise FlexQuantError(f"{n} calibration windows make {len(starts)} batches of {batch_size}, fewer than "
                                 f"the {self.world} ranks; raise --nsamples or lower --batch-size")
        return torch.cat([ids[s:s + batch_size] for j, s in enumerate(starts) if self.owns_batch(j)])

    def local_windows(self, total: int, batch_size: int, first: int) -> int:
        """How many of this rank's windows are among the first ``first`` of ``total`` (batched as in `shard`)."""
        if not self.active:
            return first
        return sum(max(0, min(batch_size, total - s, first - s))
                   for j, s in enumerate(range(0, total, batch_size)) if self.owns_batch(j))

    def local_batches(self, batches: int) -> int:
        """How many of the first ``batches`` global batches this rank holds."""
        return len(range(self.rank, batches, self.world)) if self.active else batches

    # ----- statistics -----
    def all_reduce_mean_weighted(self, tensors: list[torch.Tensor], weights) -> list[torch.Tensor]:
        """Σ_r w_r·t_r / Σ_r w_r for each tensor t (this rank's mean over w tokens; ``weights`` one number for
        all, or one per tensor), summed in float64 in one all-reduce; a rank with weight 0 contributes nothing
        and a tensor no rank weighs stays zero. Returns new tensors (dtype and device kept)."""
        if not self.active:
            return tensors
        import torch.distributed as td

        weights = [float(w) for w in weights] if isinstance(weights, (list, tuple)) else [float(weights)] * len(tensors)
        flat = [t.reshape(-1).to(self.comm, torch.float64) * w if w else
                torch.zeros(t.numel(), dtype=torch.float64, device=self.comm) for t, w in zip(tensors, weights)]
        buf = torch.cat(flat + [torch.tensor(weights, dtype=torch.float64, device=self.comm)])
        td.all_reduce(buf)
        self.reduced_bytes += buf.numel() * buf.element_size()
        totals = buf[-len(tensors):].tolist()
        out, at = [], 0
        for t, total in zip(tensors, totals):
            part = buf[at:at + t.numel()]
            out.append((part / total if total else part).reshape(t.shape).to(t.device, t.dtype))
            at += t.numel()
        self.last_weights = totals
        return out

    def accumulator(self, n: int, device) -> HessianAccumulator:
        """The accumulator of one linear group's Hessian: a plain `HessianAccumulator`, or (several ranks,
        exact) one that only records this rank's batches until `reduce_hessian`."""
        return _Recorder(n, device) if self.active and self.exact else HessianAccumulator(n, device)

    def reduce_hessian(self, acc: HessianAccumulator) -> None:
        """Finish a Hessian in place: every rank then holds H (and D) of all ranks' tokens. Exact: every batch
        of every rank is added in the global batch order; else the float64 weighted mean of the ranks' H."""
        if not self.active:
            return
        if isinstance(acc, _Recorder):
            batches, acc.batches = acc.batches, []
            for entry in self.gather_batches(batches):  # (X, X_fp) per batch, or per row chunk of it in turn
                for k in range(0, len(entry), 2):
                    HessianAccumulator.add(acc, entry[k], entry[k + 1])
            return
        D = acc.D if acc.D is not None else torch.zeros_like(acc.H)
        acc.H, D = self.all_reduce_mean_weighted([acc.H, D], [acc.tokens, acc.cross_tokens if acc.D is not None else 0])
        acc.tokens, acc.cross_tokens = (int(w) for w in self.last_weights)
        acc.D = D if acc.cross_tokens else None

    def batch_terms(self, zero: torch.Tensor):
        """A running sum ``acc.add_(term)`` per batch: ``zero`` itself in one process; else a recorder that
        `sum_batches` turns into the sum of all ranks' terms in the global batch order."""
        return _Terms(zero) if self.active else zero

    def sum_batches(self, acc) -> torch.Tensor:
        if not isinstance(acc, _Terms):
            return acc
        total = acc.zero.clone()
        for term in self.gather_batches(acc):
            total.add_(term.to(total.device))
        return total

    def gather_batches(self, batches: list) -> list:
        """All ranks' batches (tensors, or tuples of tensors / None) in the global batch order (global batch j is
        local batch j // world of rank j % world), on every rank, on the device of this rank's first tensor."""
        if not self.active:
            return batches
        total = int(self.all_sum(len(batches)))
        device = next((t.device for b in batches for t in (b if isinstance(b, tuple) else (b,))
                       if isinstance(t, torch.Tensor)), torch.device("cpu"))
        out = []
        for j in range(total):
            src = j % self.world
            mine = batches[j // self.world] if src == self.rank else None
            one = not isinstance(mine, tuple) if src == self.rank else None
            parts = self._broadcast_tensors((mine,) if one else mine, src, device)
            out.append(parts[0] if parts[-1] is _ONE else parts)
        return out

    def _broadcast_tensors(self, tensors, src: int, device) -> tuple:
        """A tuple of tensors (or None) from ``src``: a pickled header (shapes, dtypes), then the raw tensors."""
        import torch.distributed as td

        header = None
        if self.rank == src:
            header = [None if t is None else (tuple(t.shape), t.dtype) for t in tensors] + [len(tensors) == 1]
        header = self.broadcast_result(header, src)
        out = []
        for t, h in zip(tensors if self.rank == src else [None] * (len(header) - 1), header[:-1]):
            if h is None:
                out.append(None)
                continue
            buf = t.contiguous().to(self.comm) if self.rank == src else torch.empty(h[0], dtype=h[1], device=self.comm)
            td.broadcast(buf, src)
            self.broadcast_bytes += buf.numel() * buf.element_size()
            out.append(t if self.rank == src else buf.to(device))
        return tuple(out) + ((_ONE,) if header[-1] else ())

    def all_sum(self, value: float) -> float:
        """Σ_r value_r of a scalar."""
        if not self.active:
            return value
        import torch.distributed as td

        t = torch.tensor([float(value)], dtype=torch.float64, device=self.comm)
        td.all_reduce(t)
        self.reduced_bytes += 8
        return float(t)

    # ----- divided solves -----
    def owner(self, k: int) -> int:
        """The rank that solves linear ``k`` of a group."""
        return k % self.world

    def broadcast_result(self, obj, src: int, device: torch.device | str = "cpu"):
        """``obj`` (a `QuantResult`, or any picklable object holding tensors) from rank ``src`` on every rank;
        on receiving ranks its tensors are on ``device``."""
        if not self.active:
            return obj
        import torch.distributed as td

        if self.rank == src:
            data = torch.frombuffer(bytearray(pickle.dumps(_move(obj, "cpu"))), dtype=torch.uint8).to(self.comm)
            size = torch.tensor([data.numel()], dtype=torch.int64, device=self.comm)
        else:
            size = torch.zeros(1, dtype=torch.int64, device=self.comm)
        td.broadcast(size, src)
        if self.rank != src:
            data = torch.empty(int(size), dtype=torch.uint8, device=self.comm)
        td.broadcast(data, src)
        self.broadcast_bytes += int(size) + 8
        return obj if self.rank == src else _move(pickle.loads(data.cpu().numpy().tobytes()), device)

    def volume(self) -> dict:
        """Bytes reduced and broadcast so far (this rank's payload)."""
        return {"allreduce_bytes": self.reduced_bytes, "broadcast_bytes": self.broadcast_bytes}

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as td

            td.barrier()


class _Recorder(HessianAccumulator):
    """Keeps this rank's batches (float32, CPU) for `Dist.reduce_hessian` instead of accumulating them."""

    def __init__(self, n: int, device):
        super().__init__(n, device)
        self.batches: list = []
        self.chunks: list | None = None  # between begin_batch and end_batch: the batch's (X, X_fp) chunks

    def begin_batch(self) -> None:
        self.chunks = []

    def end_batch(self) -> None:
        chunks, self.chunks = self.chunks, None
        self.batches.append(tuple(t for pair in chunks for t in pair))

    def add(self, X: torch.Tensor, X_fp: torch.Tensor | None = None) -> None:
        f32 = lambda t: None if t is None else t.detach().to("cpu", torch.float32)
        (self.batches if self.chunks is None else self.chunks).append((f32(X), f32(X_fp)))


class _Terms(list):
    """Per-batch terms of a running sum (`Dist.batch_terms`)."""

    def __init__(self, zero: torch.Tensor):
        super().__init__()
        self.zero = zero

    def add_(self, term: torch.Tensor) -> None:
        self.append(term.detach().to("cpu").clone())


_ONE = object()  # marks a broadcast of one bare tensor (not a tuple)
SINGLE = Dist()  # the single process: no sharding, no reduction, every linear solved here
