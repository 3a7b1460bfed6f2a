"""Configuration of image-classifier PTQ: one frozen, validated, JSON-round-trippable dataclass.

CLI flags are named like the fields (``--w-bits`` <-> ``w_bits``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .errors import VisionError

VISION_FORMAT_VERSION = 1


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class VisionQuantConfig:
    """Settings of block reconstruction (AdaRound + LSQ + QDrop) and of the optional meta step.

    Bits: ``w_bits``/``a_bits`` for every layer except the first and last (``first_last_bits``).
    Reconstruction: ``iters`` Adam steps per block on batches of ``batch_size``; ``lr_round`` for the
    rounding logits, ``lr_act`` for activation steps; ``round_weight``·Σ(1 − |2h − 1|^β), β annealed
    ``beta_start`` → ``beta_end`` after ``warmup`` (fraction of iters); ``qdrop_prob`` = probability that
    an activation keeps its FP value. ``calib_size`` caps the calibration images (None: all).
    Meta (``meta=True``): ``meta_steps`` outer steps per block on batches of ``meta_batch_size``; one inner
    SGD step of lr ``meta_inner_lr`` (with ``meta_inner_norm``: each tensor moves by that fraction of its RMS
    along its normalised gradient); Adam of lr ``meta_lr`` on the U-Net (``unet_width`` channels);
    outer loss = τ²·KL(``temperature``) + ``margin_weight``·relu(``margin`` − d) + ``feature_weight``·feat.
    """

    w_bits: int = 4
    a_bits: int = 4
    first_last_bits: int = 8
    iters: int = 300
    batch_size: int = 32
    calib_size: int | None = None
    lr_round: float = 1e-2
    lr_act: float = 1e-3
    round_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    qdrop_prob: float = 0.5
    meta: bool = False
    meta_steps: int = 20
    meta_batch_size: int = 32
    meta_inner_lr: float = 0.3
    meta_inner_norm: bool = True
    meta_lr: float = 1e-3
    temperature: float = 4.0
    margin: float = 0.1
    margin_weight: float = 1.0
    feature_weight: float = 1.0
    unet_width: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits", "first_last_bits"):
            v = getattr(self, name)
            if not (_is_int(v) and 2 <= v <= 8):
                raise VisionError(f"{name}={v!r} must be an integer from 2 to 8 (e.g. {name}=4)")
        for name, low in (
            ("iters", 0),
            ("batch_size", 1),
            ("meta_steps", 1),
            ("meta_batch_size", 1),
            ("unet_width", 1),
            ("seed", 0),
        ):
            v = getattr(self, name)
            if not (_is_int(v) and v >= low):
                raise VisionError(f"{name}={v!r} must be an integer >= {low}")
        if self.calib_size is not None and not (_is_int(self.calib_size) and self.calib_size >= 1):
            raise VisionError(f"calib_size={self.calib_size!r} must be a positive integer or None (all images)")
        for name in ("lr_round", "lr_act", "meta_lr", "temperature", "beta_start", "beta_end"):
            v = getattr(self, name)
            if not (_is_num(v) and v > 0):
                raise VisionError(f"{name}={v!r} must be a positive finite number")
        for name in ("round_weight", "meta_inner_lr", "margin", "margin_weight", "feature_weight"):
            v = getattr(self, name)
            if not (_is_num(v) and v >= 0):
                raise VisionError(f"{name}={v!r} must be a finite number >= 0")
        if not (_is_num(self.warmup) and 0 <= self.warmup < 1):
            raise VisionError(f"warmup={self.warmup!r} must be a fraction in [0, 1)")
        if not (_is_num(self.qdrop_prob) and 0 <= self.qdrop_prob < 1):
            raise VisionError(f"qdrop_prob={self.qdrop_prob!r} must be in [0, 1) (0.5 is QDrop's default)")
        for name in ("meta", "meta_inner_norm"):
            if not isinstance(getattr(self, name), bool):
                raise VisionError(f"{name}={getattr(self, name)!r} must be True or False")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with the format version, for JSON."""
        return {"format_version": VISION_FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionQuantConfig:
        """Inverse of `to_dict`; unknown keys or another format version are errors, not silently dropped."""
        data = dict(data)
        version = data.pop("format_version", VISION_FORMAT_VERSION)
        if version != VISION_FORMAT_VERSION:
            raise VisionError(f"config format_version {version!r} is not supported (expected {VISION_FORMAT_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise VisionError(f"unknown config field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**data)
