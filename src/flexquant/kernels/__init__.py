"""Kernel registry: each kernel declares what it supports; `select` picks the best available one."""

from . import triton_quant  # noqa: F401  (registers the Triton kernel; Triton itself is imported on first use)
from .registry import KERNELS, Kernel, register, rotate, select

__all__ = ["KERNELS", "Kernel", "register", "rotate", "select"]
