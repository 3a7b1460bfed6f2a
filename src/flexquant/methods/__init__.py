"""Quantization methods, each a recipe over the pipeline, registered by name."""

from . import adaptive, baselines, flexible, hiratio  # noqa: F401  (each registers its method)
from .registry import METHODS, build_method, get_method, register

__all__ = ["METHODS", "build_method", "get_method", "register"]
