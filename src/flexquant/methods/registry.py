"""Method registry: ``--method NAME`` -> the method class; its options class goes to `config.METHOD_CONFIGS`.

Filled when `flexquant.methods` is imported (each method module registers its class); this module imports
no method, so there is no import circle.
"""

from __future__ import annotations

from ..config import METHOD_CONFIGS, QuantConfig
from ..errors import FlexQuantError
from ..pipeline import Method

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``--method cls.name`` with options ``cls.Config``."""
    METHODS[cls.name] = cls
    METHOD_CONFIGS[cls.name] = cls.Config
    return cls


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise FlexQuantError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build_method(config: QuantConfig) -> Method:
    """The method of ``config``, built from the config it resolves (grid settings it fills in)."""
    cls = get_method(config.method)
    return cls(cls.resolve(config))
