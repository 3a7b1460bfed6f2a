"""High-impact ratio plans (METHODS.md §2): which input-column groups of each linear go to the high bit-width,
in what order, and what each step costs in stored bits (`alloc.cost`).

A layer (decoder block) takes its high-impact groups one step at a time: a merge of its linears' group
sequences (each linear's groups in descending impact) by predicted loss saved per stored bit. Step s of layer
l costs ``tables[l].bits[s]`` bits more than s = 0 and holds ``tables[l].weights[s]`` weights at b_hi.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import torch

from .cost import FP16_BITS, Layout, linear_bits
from .qp import StepTable


@dataclass
class RatioLinear:
    name: str
    block: int
    m: int
    n: int
    impact_order: torch.Tensor  # input columns by impact, descending
    group_gain: np.ndarray  # [ng]: predicted loss saved by raising the t-th impact group to b_hi
    k: int = 0  # high-impact groups in the plan
    kmax: int = 0  # the most high-impact groups any allowed ratio of its layer gives it


@dataclass(frozen=True)
class RatioGrid:
    """The storage settings a plan prices: widths, group size and the grid's metadata."""

    b_lo: int
    b_hi: int  # 16 = fp16 retention
    group_size: int
    sym: bool
    scale_bits: int
    zero_bits: int
    act_order: bool


class RatioPlan:
    """The linears of every layer, their step sequences and step tables; ``apply`` sets an allocation."""

    def __init__(self, blocks: list[list[str]], lins: dict[str, RatioLinear], grid: RatioGrid, cap: list[float]):
        self.blocks, self.lins, self.grid = blocks, lins, grid
        self.steps_seq: list[list[tuple[str, int]]] = []  # per block: (linear, its new k) per step
        self.tables: list[StepTable] = []
        for i, blk in enumerate(blocks):
            seq, table = self._merge(blk)
            self.steps_seq.append(seq)
            self.tables.append(table)
            for name, k in seq[: table.steps_below(cap[i])]:
                self.lins[name].kmax = max(self.lins[name].kmax, k)

    def linear_bits(self, lin: RatioLinear, k: int) -> int:
        """Bits stored for ``lin`` with k high-impact groups (permutation always stored)."""
        g = self.grid
        layout = Layout(lin.m, lin.n, g.group_size, g.sym, g.scale_bits, g.zero_bits, permuted=True)
        return linear_bits(layout, self.group_bits(lin.name, k).tolist())

    def _merge(self, blk: list[str]) -> tuple[list[tuple[str, int]], StepTable]:
        heap, seq = [], []
        weights, bits = [0], [0]

        def push(name, k):
            lin = self.lins[name]
            if k < lin.n // self.grid.group_size:
                step = self.linear_bits(lin, k + 1) - self.linear_bits(lin, k)
                heapq.heappush(heap, (-lin.group_gain[k] / max(step, 1), name, k, step))

        for name in blk:
            push(name, 0)
        while heap:
            _, name, k, step = heapq.heappop(heap)
            seq.append((name, k + 1))
            weights.append(weights[-1] + self.lins[name].m * self.grid.group_size)
            bits.append(bits[-1] + step)
            push(name, k + 1)
        total = sum(self.lins[n].m * self.lins[n].n for n in blk)
        return seq, StepTable(np.array(weights), np.array(bits), total)

    def layer_groups(self, block: int, steps: int) -> dict[str, int]:
        """High-impact groups per linear of layer ``block`` after ``steps`` steps."""
        ks = {n: 0 for n in self.blocks[block]}
        for name, k in self.steps_seq[block][:steps]:
            ks[name] = k
        return ks

    def apply(self, steps: list[int]) -> None:
        for i, s in enumerate(steps):
            for name, k in self.layer_groups(i, s).items():
                self.lins[name].k = k

    def ratios(self, steps: list[int]) -> np.ndarray:
        return np.array([t.ratio(s) for t, s in zip(self.tables, steps)])

    def bits(self, steps: list[int]) -> int:
        """Extra bits of an allocation over all layers at s = 0."""
        return sum(int(t.bits[s]) for t, s in zip(self.tables, steps))

    def base_bits(self) -> int:
        return sum(self.linear_bits(lin, 0) for lin in self.lins.values())

    def order(self, name: str, diag_h: torch.Tensor) -> torch.Tensor:
        """Quantization order, the same for every k: the columns outside the linear's top ``kmax`` impact
        groups (act-order by diag H, or natural), then those groups from the ``kmax``-th down to the first.
        With k high groups, the last k·g columns are exactly the top k·g impact columns, and the columns
        before them are quantized identically for every k (the probes reuse that prefix)."""
        lin, g = self.lins[name], self.grid.group_size
        top = lin.impact_order[: lin.kmax * g]
        is_top = torch.zeros(lin.n, dtype=torch.bool)
        is_top[top] = True
        low = (torch.argsort(diag_h.cpu(), descending=True, stable=True) if self.grid.act_order
               else torch.arange(lin.n))
        return torch.cat([low[~is_top[low]], top.view(-1, g).flip(0).reshape(-1)])

    def group_bits(self, name: str, k: int) -> torch.Tensor:
        lin, g = self.lins[name], self.grid
        return torch.tensor([g.b_lo] * (lin.n // g.group_size - k) + [g.b_hi] * k, dtype=torch.uint8)

    @property
    def fp16_retention(self) -> bool:
        return self.grid.b_hi == FP16_BITS
