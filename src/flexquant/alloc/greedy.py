"""SBGBS: self-adaptive block-level greedy bit search under an exact bit budget.

Every group of g input columns of every linear in scope is a "block" with an error table E(b) for
each candidate bit-width. All blocks start at the lowest candidate; a max-heap on the marginal gain
per stored bit [E(b) − E(b')] / (m·g·(b' − b)) spends the remaining budget. Because the heap spans
all matrices in scope, sensitive matrices win bits automatically. Metadata (scales, zeros, bit map,
permutation, rotation signs) does not depend on the bit-widths, so it is paid up front (`alloc.cost`).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from ..errors import FlexQuantError


@dataclass
class GroupTable:
    """Error of each group of one linear at each candidate bit-width."""

    name: str
    rows: int  # m: output rows (each code bit of a group costs m·g bits)
    group_size: int
    candidates: tuple[int, ...]
    errors: torch.Tensor  # [ng, len(candidates)], non-increasing along candidates is not required
    fixed: torch.Tensor  # [ng] bool: groups whose bits are fixed (protected) at ``fixed_bits``
    fixed_bits: int = 0
    # Stored bits of one group at each candidate (increasing), for candidates whose cost is not
    # width × rows × group_size (a per-layer target's (width, group size) options, `methods.flexible`).
    costs: tuple[int, ...] | None = None

    def cost(self, c: int) -> int:
        """Bits of one group at candidate index ``c`` (fixed groups excepted)."""
        return self.costs[c] if self.costs is not None else self.candidates[c] * self.rows * self.group_size


def greedy_allocate(tables: list[GroupTable], budget_bits: int) -> tuple[dict[str, torch.Tensor], int]:
    """Bits per group for every table, spending at most ``budget_bits`` of code bits.

    Returns ({name: group_bits [ng] uint8}, code bits used). Raises when even the lowest candidate
    does not fit.
    """
    bits = {}
    used = 0
    heap: list[tuple[float, int, int, int]] = []  # (-gain per bit, table index, group, candidate index)
    for t in tables:
        ng = t.errors.shape[0]
        b = torch.full((ng,), t.candidates[0], dtype=torch.int64)
        b[t.fixed] = t.fixed_bits
        bits[t.name] = b
        nfixed = int(t.fixed.sum())
        used += (ng - nfixed) * t.cost(0) + nfixed * t.fixed_bits * t.rows * t.group_size
    if used > budget_bits:
        raise FlexQuantError(
            f"the bit budget is infeasible: the lowest bit-width alone needs {used} code bits, the budget "
            f"leaves {budget_bits}; raise --bpw, lower the protected columns, or add a lower candidate"
        )

    def push(t_i: int, grp: int, c_i: int) -> None:
        t = tables[t_i]
        if c_i + 1 >= len(t.candidates):
            return
        E = t.errors[grp]
        # best next step from c_i: the later candidate with the largest gain per added bit
        best, best_j = 0.0, None
        for j in range(c_i + 1, len(t.candidates)):
            step = t.cost(j) - t.cost(c_i)
            if step <= 0:  # an option no dearer than the current one (sorted by cost: never better)
                continue
            gain = float(E[c_i] - E[j]) / step
            if gain > best:
                best, best_j = gain, j
        if best_j is not None:
            heapq.heappush(heap, (-best, t_i, grp, c_i * 100 + best_j))

    for t_i, t in enumerate(tables):
        for grp in range(t.errors.shape[0]):
            if not bool(t.fixed[grp]):
                push(t_i, grp, 0)
    while heap:
        _, t_i, grp, code = heapq.heappop(heap)
        c_i, j = divmod(code, 100)
        t = tables[t_i]
        cost = t.cost(j) - t.cost(c_i)
        if used + cost > budget_bits:
            continue  # does not fit; smaller steps elsewhere may still fit
        used += cost
        bits[t.name][grp] = t.candidates[j]
        push(t_i, grp, j)
    return {k: v.to(torch.uint8) for k, v in bits.items()}, used


def tie_tables(tables: list[GroupTable], key) -> tuple[list[GroupTable], dict[str, list[str]]]:
    """Per-layer tables (one group each) whose ``key(name)`` is the same string made one table that takes a
    single option for all of them: its errors and costs are the members' sums. Returns the tables to allocate
    and {key: member names} to spread the tied table's bits back with (`untie`)."""
    out, members = [], {}
    for t in tables:
        k = key(t.name)
        if k is None:
            out.append(t)
        else:
            members.setdefault(k, []).append(t)
    for k, ts in members.items():
        first = ts[0]
        if any(t.candidates != first.candidates or t.costs is None or t.errors.shape[0] != 1 for t in ts):
            raise FlexQuantError(f"the linears tied as {k} ({first.name}, ...) do not share their per-layer options")
        out.append(GroupTable(k, first.rows, first.group_size, first.candidates, sum(t.errors for t in ts),
                              torch.zeros(1, dtype=torch.bool), 0,
                              tuple(sum(t.costs[c] for t in ts) for c in range(len(first.candidates)))))
    return out, {k: [t.name for t in ts] for k, ts in members.items()}


def untie(bits: dict[str, torch.Tensor], tied: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """`tie_tables`' tied bits given to each member."""
    bits = dict(bits)
    for k, names in tied.items():
        b = bits.pop(k)
        bits.update({n: b.clone() for n in names})
    return bits
