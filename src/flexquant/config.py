"""Typed, versioned configuration: frozen dataclasses validated in ``__post_init__``, JSON round-trip.

CLI flags are named exactly like these fields (``--group-size`` <-> ``group_size``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import FlexQuantError

CONFIG_FORMAT_VERSION = 1
SUPPORTED_BITS = (2, 3, 4, 8)
CLIP_MODES = ("minmax", "mse")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise FlexQuantError(msg)


@dataclass(frozen=True)
class GridConfig:
    """Uniform integer grid: ``bits`` per weight, scale (and zero) per row and group of columns."""

    bits: int = 4
    group_size: int = 64
    sym: bool = False
    # "mse": shrink the min-max range per group to minimise the rounding error (GPTQ's `mse` option).
    clip: str = "mse"
    # Metadata per group: 16 = fp16 scales; 8 = 8-bit codes on a per-row logarithmic grid (32 steps per
    # octave below an fp16 row maximum, `quant.grid.log_scale`). None = the method's default
    # (`Method.default_grid`: fp16 for rtn/gptq).
    scale_bits: int | None = None
    # Asymmetric zero points: 8 = one byte each; 4 = packed nibbles (needs bits <= 4). None = method default.
    zero_bits: int | None = None

    def __post_init__(self) -> None:
        _check(
            self.bits in SUPPORTED_BITS,
            f"bits={self.bits} is not supported; choose one of {SUPPORTED_BITS}",
        )
        _check(
            isinstance(self.group_size, int) and self.group_size >= 8 and self.group_size % 8 == 0,
            f"group_size={self.group_size} must be a positive multiple of 8 (e.g. 32, 64, 128)",
        )
        _check(self.clip in CLIP_MODES, f"clip={self.clip!r} must be one of {CLIP_MODES}")
        _check(self.scale_bits in (16, 8, None), f"scale_bits={self.scale_bits} must be 16 (fp16) or 8 (log-coded)")
        _check(self.zero_bits in (8, 4, None), f"zero_bits={self.zero_bits} must be 8 or 4")
        _check(self.zero_bits != 4 or self.bits <= 4,
               f"zero_bits=4 stores zero points of at most 4 bits; bits={self.bits} needs zero_bits=8")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ solver settings (METHODS.md, Baselines)."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True

    def __post_init__(self) -> None:
        _check(0 < self.damp < 1, f"damp={self.damp} must be in (0, 1); 0.01 is the usual value")
        _check(self.block_size >= 1, f"block_size={self.block_size} must be >= 1")


@dataclass(frozen=True)
class QuantConfig:
    """Everything that defines one quantization run."""

    model: str = "smollm2-135m"
    method: str = "gptq"
    grid: GridConfig = field(default_factory=GridConfig)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    # Calibration: `nsamples` random windows of `seqlen` tokens of the text `calib`, drawn with `seed`.
    calib: str = "pydoc"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8
    device: str = "auto"
    # Method-specific settings (validated by the method's own config class).
    options: dict = field(default_factory=dict)
    format_version: int = CONFIG_FORMAT_VERSION

    def __post_init__(self) -> None:
        _check(
            self.format_version == CONFIG_FORMAT_VERSION,
            f"config format_version {self.format_version} is not supported "
            f"(this flexquant reads version {CONFIG_FORMAT_VERSION})",
        )
        _check(self.nsamples >= 1, f"nsamples={self.nsamples} must be >= 1")
        _check(self.seqlen >= 8, f"seqlen={self.seqlen} must be >= 8")
        _check(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        _check(self.device in ("auto", "cpu") or self.device.startswith("cuda"),
               f"device={self.device!r} must be 'auto', 'cpu' or 'cuda[:N]'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        _check(not unknown, f"unknown QuantConfig fields {sorted(unknown)}; known: {sorted(known)}")
        for name, sub in (("grid", GridConfig), ("gptq", GPTQConfig)):
            if isinstance(d.get(name), dict):
                d[name] = sub(**d[name])
        return cls(**d)

    def replace(self, **flat: Any) -> QuantConfig:
        """A copy with fields changed; names of grid/gptq fields (``bits``, ``damp``, ...) reach them."""
        top, nested = {}, {"grid": {}, "gptq": {}}
        sub_fields = {n: {f.name for f in dataclasses.fields(c)}
                      for n, c in (("grid", GridConfig), ("gptq", GPTQConfig))}
        top_fields = {f.name for f in dataclasses.fields(self)}
        for k, v in flat.items():
            owner = next((n for n, fs in sub_fields.items() if k in fs), None)
            if owner:
                nested[owner][k] = v
            elif k in top_fields:
                top[k] = v
            else:
                raise FlexQuantError(f"unknown setting {k!r}")
        for n, changes in nested.items():
            if changes:
                top[n] = dataclasses.replace(getattr(self, n), **changes)
        return dataclasses.replace(self, **top)

    @classmethod
    def from_json(cls, s: str) -> QuantConfig:
        return cls.from_dict(json.loads(s))
