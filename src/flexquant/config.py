"""Typed, versioned configuration: frozen dataclasses validated in ``__post_init__``, JSON/YAML round-trip.

Every field carries its help text (and choices) as metadata; the command line is generated from them
(``--group-size`` <-> ``group_size``), and a recipe file is the serialised `QuantConfig`. Each method
declares its own options dataclass (a `MethodConfig`), registered by method name in `METHOD_CONFIGS`
when the method registry is filled; `QuantConfig.options` is an instance of it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import FlexQuantError

CONFIG_FORMAT_VERSION = 1
SUPPORTED_BITS = (2, 3, 4, 8)
CLIP_MODES = ("minmax", "mse", "lsq")
SYM_GRIDS = ("balanced", "signed")
TARGET_NAMES = ("flexquant", "vllm", "gptqmodel", "gguf")  # quant.targets.TARGETS (config sits below quant)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str | int | None) -> int | None:
    """'8GB' -> 8·10⁹, '512MiB' -> 512·2²⁰, '' / None -> None (no limit)."""
    if text is None or text == "":
        return None
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value < 0:
        raise FlexQuantError(f"memory size {text!r} is not understood; write it like 512MB, 8GB or 16GiB")
    return int(value * _UNITS[unit])


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise FlexQuantError(msg)


def option(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A config field with its help text (and allowed values) for the generated CLI and `flexquant methods`."""
    meta = {"help": help, **({"choices": tuple(choices)} if choices is not None else {})}
    return field(default=default, metadata=meta)


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


@dataclass(frozen=True)
class FieldKind:
    """What a config field holds: a scalar ``base`` type, or a tuple of them; maybe None."""

    base: type
    is_tuple: bool = False
    optional: bool = False


def field_kind(f: dataclasses.Field) -> FieldKind | None:
    """The kind of a scalar, optional or tuple field from its annotation (None for nested configs)."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    optional = text.endswith(" | None")
    text = text.removesuffix(" | None")
    if text.startswith("tuple[") and text.endswith(", ...]"):
        return FieldKind(_TYPES[text[6:-6]], True, optional)
    return FieldKind(_TYPES[text], False, optional) if text in _TYPES else None


def _scalar(kind: type, value: Any) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_types(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` for dataclass ``cls`` with each checked against its field's type (lists become tuples, ints
    become floats where a float is expected); a wrong type is a clear error naming the field."""
    out = dict(values)
    for f in dataclasses.fields(cls):
        kind = field_kind(f)
        if f.name not in values or kind is None:
            continue
        v = values[f.name]
        if v is None and kind.optional:
            continue
        items = v if kind.is_tuple and isinstance(v, (list, tuple)) else None if kind.is_tuple else [v]
        if items is None or not all(_scalar(kind.base, x) for x in items):
            want = f"a list of {kind.base.__name__}" if kind.is_tuple else kind.base.__name__
            raise FlexQuantError(f"{where}{f.name}={v!r} must be {want}{' or null' if kind.optional else ''}")
        if kind.is_tuple:
            out[f.name] = tuple(kind.base(x) for x in items)
        elif kind.base is float:
            out[f.name] = float(v)
    return out


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's options (frozen; validated in ``__post_init__``)."""

    @classmethod
    def from_mapping(cls, values: dict[str, Any], method: str) -> MethodConfig:
        """An instance from plain values (a recipe's lists become tuples); unknown names say whose they are."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        for key in values:
            if key not in names:
                owners = sorted(m for m, c in METHOD_CONFIGS.items() if key in {f.name for f in dataclasses.fields(c)})
                where = f"it belongs to --method {' / '.join(owners)}" if owners else "no method has it"
                raise FlexQuantError(f"option {key!r} does not apply to --method {method} ({where}); "
                                     f"`flexquant methods` lists each method's options")
        return cls(**check_types(cls, values, f"{method} option "))

    def changed(self) -> dict[str, Any]:
        """The fields that differ from their defaults (as given: a None default is still "unset")."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default}


@dataclass(frozen=True)
class NoOptions(MethodConfig):
    """Options of methods configured by the grid and GPTQ settings alone (rtn, gptq)."""


# method name -> its options class; filled by `flexquant.methods` as methods register.
METHOD_CONFIGS: dict[str, type[MethodConfig]] = {}


def method_options(method: str, options: MethodConfig | dict | None) -> MethodConfig:
    """``options`` as ``method``'s config type (a dict, another method's instance or None are converted)."""
    if method not in METHOD_CONFIGS:
        raise FlexQuantError(f"unknown method {method!r}; available: {', '.join(sorted(METHOD_CONFIGS))}")
    cls = METHOD_CONFIGS[method]
    if isinstance(options, cls):
        return options
    if isinstance(options, MethodConfig):
        options = options.changed()
    return cls.from_mapping(dict(options or {}), method)


@dataclass(frozen=True)
class GridConfig:
    """Uniform integer grid: ``bits`` per weight, scale (and zero) per row and group of columns."""

    bits: int = option(4, "bits per weight (the base width; fractional budgets use --bpw)", SUPPORTED_BITS)
    group_size: int = option(64, "input columns per scale/zero group; must divide every linear's input size")
    sym: bool = option(False, "symmetric grid (no stored zero points)")
    clip: str | None = option(None, "per-group range: minmax; mse = shrunk to minimise the rounding error; lsq = "
                              "also each candidate's least-squares scale, errors weighted by GPTQ's column costs "
                              "(symmetric grids); unset = lsq for --target gguf, else mse", CLIP_MODES)
    sym_grid: str | None = option(None, "symmetric grids: balanced = ±max|w| over 2^b−1 steps; signed = the "
                                  "largest-magnitude weight on the most negative code, the float16 scale carrying its "
                                  "sign (GGML's Q4_0/Q5_0 rule); unset = signed for --target gguf, else balanced",
                                  SYM_GRIDS)
    superblock: int = option(0, "columns per float16 step of which every group scale is an integer multiple "
                                "(256 with groups of 16: GGML's K-quants Q3_K/Q6_K; 0 = off)")
    scale_bits: int | None = option(None, "per-group scales: 16 = fp16, 8 = 8-bit codes on a per-row log grid "
                                          "with an fp16 row base; unset = the method's default", (16, 8))
    zero_bits: int | None = option(None, "asymmetric zero points: 8 = bytes, 4 = nibbles (bits <= 4); "
                                         "unset = the method's default", (8, 4))

    def __post_init__(self) -> None:
        _check(
            self.bits in SUPPORTED_BITS,
            f"bits={self.bits} is not supported; choose one of {SUPPORTED_BITS}",
        )
        _check(
            isinstance(self.group_size, int) and self.group_size >= 8 and self.group_size % 8 == 0,
            f"group_size={self.group_size} must be a positive multiple of 8 (e.g. 32, 64, 128)",
        )
        _check(self.clip in CLIP_MODES + (None,), f"clip={self.clip!r} must be one of {CLIP_MODES}")
        _check(self.scale_bits in (16, 8, None), f"scale_bits={self.scale_bits} must be 16 (fp16) or 8 (log-coded)")
        _check(self.superblock == 0 or (self.superblock % self.group_size == 0 and self.sym
                                         and self.scale_bits != 8),
               f"superblock={self.superblock} needs a symmetric grid with float16 scales and a group size that "
               f"divides it (group_size={self.group_size}, sym={self.sym}, scale_bits={self.scale_bits})")
        _check(self.sym_grid in SYM_GRIDS + (None,), f"sym_grid={self.sym_grid!r} must be one of {SYM_GRIDS}")
        _check(self.sym_grid != "signed" or self.scale_bits != 8,
               "sym_grid='signed' needs float16 scales (the 8-bit log-coded scales are positive); drop scale_bits 8")
        _check(self.zero_bits in (8, 4, None), f"zero_bits={self.zero_bits} must be 8 or 4")
        _check(self.zero_bits != 4 or self.bits <= 4,
               f"zero_bits=4 stores zero points of at most 4 bits; bits={self.bits} needs zero_bits=8")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def signed(self) -> bool:
        """Symmetric scales by the signed rule (``sym_grid="signed"``; unset is balanced until a target sets it)."""
        return self.sym_grid == "signed"


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ solver settings."""

    damp: float = option(0.01, "GPTQ Hessian damping, times the mean of its diagonal (retried upward on failure)")
    block_size: int = option(128, "GPTQ lazy-update block (columns)")
    act_order: bool = option(True, "GPTQ: quantize columns by descending Hessian diagonal (permutation stored)")
    factor_dtype: str = option("auto", "GPTQ: dtype of the Hessian factorization (also FlexibleLLM's error tables "
                               "and the H⁻¹ diagonals of its salience and hiratio's impact); auto = float64 up "
                               "to 4096 input columns, float32 beyond (where a float64 n×n buffer would dominate "
                               "memory, as other GPTQ tools do throughout)", choices=("auto", "float64", "float32"))

    def __post_init__(self) -> None:
        _check(0 < self.damp < 1, f"damp={self.damp} must be in (0, 1); 0.01 is the usual value")
        _check(self.block_size >= 1, f"block_size={self.block_size} must be >= 1")
        _check(self.factor_dtype in ("auto", "float64", "float32"),
               f"factor_dtype={self.factor_dtype!r} must be auto, float64 or float32")


BLOCK_WEIGHTS = ("auto", "float32", "stored")


@dataclass(frozen=True)
class QuantConfig:
    """Everything that defines one quantization run (a recipe file is this, serialised)."""

    model: str = option("smollm2-135m", "smollm2-135m (offline demo), gemma3-270m, tiny-llama (random, for "
                                        "tries), a folder or a hub id")
    method: str = option("gptq", "the quantization method (`flexquant methods` lists them)")
    grid: GridConfig = field(default_factory=GridConfig)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    calib: str = option("pydoc", "calibration text: pydoc (embedded) | wikitext2 | c4 | a file or folder")
    nsamples: int = option(128, "calibration windows")
    seqlen: int = option(512, "tokens per calibration window")
    seed: int = option(0, "seed of the calibration window draw")
    batch_size: int = option(8, "calibration windows per forward pass")
    device: str = option("auto", "auto | cpu | cuda[:N]")
    stream: str = option("auto", "read the model's weights one decoder block at a time from its safetensors files "
                                 "(auto: when it has them; off: load it whole)", ("auto", "on", "off"))
    store_dtype: str = option("float16", "dtype of the activations kept between blocks (statistics stay float32)",
                              ("float16", "bfloat16", "float32"))
    max_memory: str = option("", "host memory for a block's working set and the kept activations, e.g. 512MB or "
                                 "8GB; activations beyond it spill to --offload-dir ('' = no limit)")
    offload_dir: str = option("", "folder for spilled activations ('' = a temporary folder)")
    block_weights: str = option("auto", "how a streamed block's linear weights are held on the CPU: float32, or "
                                        "stored = in the files' 16-bit dtype, each linear widened as it runs (half "
                                        "the block's memory; the quantized weights later blocks see are rounded to "
                                        "that dtype; methods that rotate or fold weights keep float32); auto = "
                                        "stored under --max-memory", BLOCK_WEIGHTS)
    moe_calibration: str = option("routed", "mixture-of-experts Hessians: routed (each expert's routed tokens, "
                                            "weighted by routing weight) | all (every token through every expert)",
                                  ("routed", "all"))
    target: str = option("flexquant", "what the checkpoint is for: flexquant (its own packed format, no constraint), "
                                      "vllm (compressed-tensors: 4/8 bits per linear, no act-order) or gptqmodel "
                                      "(GPTQ with per-module bits: 2/3/4/8; GPTQModel and vLLM's gptq kernels) or "
                                      "gguf (llama.cpp: Q4_0/Q5_0/Q8_0 per linear, group 32, symmetric); "
                                      "the method searches only inside what the target carries", TARGET_NAMES)
    # The method's options: an instance of its registered `MethodConfig` (a dict is converted).
    options: MethodConfig = field(default_factory=NoOptions)
    format_version: int = CONFIG_FORMAT_VERSION

    def __post_init__(self) -> None:
        for name in ("model", "calib", "offload_dir"):  # a pathlib.Path from the Python API is kept as its text
            if isinstance(getattr(self, name), os.PathLike):
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        _check(
            self.format_version == CONFIG_FORMAT_VERSION,
            f"config format_version {self.format_version} is not supported "
            f"(this flexquant reads version {CONFIG_FORMAT_VERSION})",
        )
        _check(self.nsamples >= 1, f"nsamples={self.nsamples} must be >= 1")
        _check(self.seqlen >= 8, f"seqlen={self.seqlen} must be >= 8")
        _check(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        parse_bytes(self.max_memory)
        _check(self.block_weights in BLOCK_WEIGHTS,
               f"block_weights={self.block_weights!r} must be one of {', '.join(BLOCK_WEIGHTS)}")
        _check(self.target in TARGET_NAMES, f"target={self.target!r} must be one of {', '.join(TARGET_NAMES)}")
        _check(self.device in ("auto", "cpu") or self.device.startswith("cuda"),
               f"device={self.device!r} must be 'auto', 'cpu' or 'cuda[:N]'")
        object.__setattr__(self, "options", method_options(self.method, self.options))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_plain(self) -> dict[str, Any]:
        """The config as JSON types only (tuples as lists): what a recipe file holds."""
        return json.loads(json.dumps(self.to_dict()))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        _check(not unknown, f"unknown QuantConfig fields {sorted(unknown)}; known: {sorted(known)}")
        for name, sub in (("grid", GridConfig), ("gptq", GPTQConfig)):
            if isinstance(d.get(name), dict):
                fields = {f.name for f in dataclasses.fields(sub)}
                _check(set(d[name]) <= fields, f"unknown {name} settings {sorted(set(d[name]) - fields)}; "
                                               f"known: {sorted(fields)}")
                d[name] = sub(**check_types(sub, d[name], f"{name}."))
        return cls(**check_types(cls, d, ""))

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
                raise FlexQuantError(f"unknown setting {k!r}: a run setting, grid or GPTQ field; method options "
                                     "go in options=dict(...)")
        for n, changes in nested.items():
            if changes:
                top[n] = dataclasses.replace(getattr(self, n), **changes)
        return dataclasses.replace(self, **top)

    @classmethod
    def from_json(cls, s: str) -> QuantConfig:
        return cls.from_dict(json.loads(s))
