"""Bit allocation: exact bit costs, error tables and the greedy block-level search (SBGBS)."""

from .greedy import GroupTable, greedy_allocate, layer_fixed_bits

__all__ = ["GroupTable", "greedy_allocate", "layer_fixed_bits"]
