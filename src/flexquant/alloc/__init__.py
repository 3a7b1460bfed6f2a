"""Bit allocation: the exact cost model, error proxies, the greedy block-level search (SBGBS) and the ratio QP
with its probes (high-impact ratios)."""

from .cost import Layout, code_bits, fixed_bits, linear_bits, result_bits
from .greedy import GroupTable, greedy_allocate
from .sensitivity import PROXIES, error_table

__all__ = ["PROXIES", "GroupTable", "Layout", "code_bits", "error_table", "fixed_bits", "greedy_allocate",
           "linear_bits", "result_bits"]
