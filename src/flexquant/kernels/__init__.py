"""Kernel registry: each kernel declares what it supports; `select` picks the best available one."""

from .registry import KERNELS, Kernel, register, select

__all__ = ["KERNELS", "Kernel", "register", "select"]
