"""Quantization methods, each a recipe over the pipeline, registered by name."""

from .registry import METHODS, build_method, register

__all__ = ["METHODS", "build_method", "register"]
