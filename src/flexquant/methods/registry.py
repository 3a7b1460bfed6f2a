"""Method registry: ``--method NAME`` -> a factory taking the `QuantConfig`."""

from __future__ import annotations

from collections.abc import Callable

from ..config import QuantConfig
from ..errors import FlexQuantError
from ..pipeline import Method

METHODS: dict[str, Callable[[QuantConfig], Method]] = {}


def register(name: str):
    def deco(factory):
        METHODS[name] = factory
        return factory

    return deco


def build_method(config: QuantConfig) -> Method:
    from . import baselines, flexible  # noqa: F401  (registers rtn, gptq, flexible)

    if config.method not in METHODS:
        raise FlexQuantError(f"unknown method {config.method!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[config.method](config)
