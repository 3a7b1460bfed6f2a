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
    from . import adaptive, baselines, flexible, hiratio  # noqa: F401  (registers them all)

    if config.method not in METHODS:
        raise FlexQuantError(f"unknown method {config.method!r}; available: {', '.join(sorted(METHODS))}")
    factory = METHODS[config.method]
    defaults = factory.default_grid(config) if hasattr(factory, "default_grid") else Method.default_grid(config)
    unset = {k: v for k, v in defaults.items() if getattr(config.grid, k) is None}
    if unset:  # the method's own defaults for what the user left unset
        config = config.replace(**unset)
    return factory(config)
