"""Invertible input transforms of one activation site: learnable Kronecker affine and randomized Hadamard.

Both map a row vector x (last dim n) to x̃ = x·T and give the weight W̃ = W·T⁻ᵀ of a linear reading
x̃, so that x̃W̃ᵀ = xWᵀ exactly; ``unapply`` maps back (y·T⁻¹), for quantities that are quantized in the
transformed space but consumed in the original one (the K/V cache).

* `KroneckerAffine` (FlatQuant-style): T = diag(d)·(P1 ⊗ P2), n = a·b, applied per token as P1ᵀ·X·P2
  on x reshaped to [a, b], so O(n·(a+b)) work instead of O(n²). Learnable; initialised at a randomized
  Hadamard matrix (d = random signs, P1, P2 = normalised Hadamard factors), so training starts from a
  rotation. Stored as float16 (`freeze` makes the trained values float16 before the inverse is folded
  into the weights, so the loaded model computes exactly what was calibrated).
* `HadamardRotation` (QuaRot-style): the fixed randomized Hadamard rotation of `transforms.rotate`;
  T⁻ᵀ = T, stored as one sign bit per channel (the Hadamard factor is rebuilt from its order).
* `KroneckerRotation` (SpinQuant-style, the affine family with unit singular values): T = diag(s)·(R1 ⊗ R2)
  with fixed random signs s and learnable orthogonal factors R_i = H_i·exp(A_i − A_iᵀ), starting at the
  same randomized Hadamard; frozen, it is stored like an affine transform (float16 d, P1, P2; kind
  "orthogonal"), and folded with the exact inverses of those stored values.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import FlexQuantError
from ..quant.pack import pack_bits, unpack_bits
from .hadamard import factorize, hadamard_transform, small_factor, small_hadamard
from .rotate import Rotation


def kron_factors(n: int) -> tuple[int, int]:
    """n = a·b with a ≤ b as close to √n as possible, preferring pairs with Hadamard constructions."""
    divisors = [a for a in range(1, math.isqrt(n) + 1) if n % a == 0]
    for a in reversed(divisors):
        if small_hadamard(a) is not None and small_hadamard(n // a) is not None:
            return a, n // a
    return divisors[-1], n // divisors[-1]


def kron_apply(x: torch.Tensor, P1: torch.Tensor, P2: torch.Tensor) -> torch.Tensor:
    """x·(P1 ⊗ P2) along the last dim: (x as [a, b]) ↦ P1ᵀ·X·P2."""
    a, b = P1.shape[0], P2.shape[0]
    X = x.reshape(*x.shape[:-1], a, b)
    return (P1.T.to(x.dtype) @ X @ P2.to(x.dtype)).reshape(x.shape)


def _init_factor(k: int, generator: torch.Generator) -> torch.Tensor:
    H = small_hadamard(k)
    if H is not None:
        return H / math.sqrt(k)
    Q, R = torch.linalg.qr(torch.randn(k, k, generator=generator, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))


class KroneckerAffine(nn.Module):
    """x ↦ (x ⊙ d)·(P1 ⊗ P2): a learnable invertible transform of n = a·b channels."""

    kind = "affine"

    def __init__(self, n: int, seed: int = 0, factors: tuple[int, int] | None = None):
        super().__init__()
        a, b = factors or kron_factors(n)
        if a * b != n:
            raise FlexQuantError(f"Kronecker factors {a}×{b} do not multiply to the {n} channels")
        g = torch.Generator().manual_seed(seed)
        self.n, self.a, self.b = n, a, b
        signs = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
        self.d = nn.Parameter(signs)
        self.P1 = nn.Parameter(_init_factor(a, g).float())
        self.P2 = nn.Parameter(_init_factor(b, g).float())
        self._inv: tuple[torch.Tensor, torch.Tensor] | None = None  # cached inverses (frozen use only)

    def _inverses(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        if dtype == torch.float64:  # exact paths (folding, float64 models)
            return torch.linalg.inv(self.P1.double()), torch.linalg.inv(self.P2.double())
        if self.P1.requires_grad:  # being trained: never cache
            return torch.linalg.inv(self.P1), torch.linalg.inv(self.P2)
        if self._inv is None or self._inv[0].device != self.P1.device:
            self._inv = (torch.linalg.inv(self.P1.double()).float(), torch.linalg.inv(self.P2.double()).float())
        return self._inv

    def _apply(self, fn, recurse=True):
        self._inv = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._inv = None
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kron_apply(x * self.d.to(x.dtype), self.P1, self.P2)

    apply_to = forward

    def unapply(self, y: torch.Tensor) -> torch.Tensor:
        """y·T⁻¹ = (y·(P1⁻¹ ⊗ P2⁻¹)) ⊘ d."""
        i1, i2 = self._inverses(y.dtype)
        return kron_apply(y, i1, i2) / self.d.to(y.dtype)

    def fold(self, W: torch.Tensor) -> torch.Tensor:
        """W·T⁻ᵀ = (W ⊘ d)·(P1⁻ᵀ ⊗ P2⁻ᵀ), in W's dtype (float64 for exact folding)."""
        i1, i2 = self._inverses(W.dtype)
        return kron_apply(W / self.d.to(W.dtype), i1.T, i2.T)

    @torch.no_grad()
    def freeze(self) -> KroneckerAffine:
        """Store the parameters as float16 (what the checkpoint holds; the model then computes with exactly
        these values) and stop training them; a vanishing channel scale is kept away from zero."""
        d = self.d.data
        d.copy_(torch.where(d.abs() < 1e-3, torch.where(d < 0, -1e-3, 1e-3), d))
        for p in (self.d, self.P1, self.P2):
            p.data = p.data.half()
            p.requires_grad_(False)
        self._inv = None
        return self

    def stored_bits(self) -> int:
        return 16 * (self.n + self.a * self.a + self.b * self.b)

    def describe(self) -> dict:
        return {"kind": self.kind, "n": self.n, "factors": [self.a, self.b]}

    def matrix(self) -> torch.Tensor:
        """The dense n×n matrix T (float64; tests and diagnostics)."""
        return torch.diag(self.d.double()) @ torch.kron(self.P1.double(), self.P2.double())


class KroneckerRotation(KroneckerAffine):
    """x ↦ (x ⊙ s)·(R1 ⊗ R2) with R_i = H_i·exp(A_i − A_iᵀ) orthogonal: a learnable rotation (training form)."""

    kind = "orthogonal"

    def __init__(self, n: int, seed: int = 0, factors: tuple[int, int] | None = None):
        super().__init__(n, seed, factors)
        for p in (self.d, self.P1, self.P2):  # the signs and the Hadamard start stay fixed
            p.requires_grad_(False)
        self.A1 = nn.Parameter(torch.zeros(self.a, self.a))
        self.A2 = nn.Parameter(torch.zeros(self.b, self.b))

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """R1, R2 computed in ``dtype`` (float64 paths stay orthogonal to float64 precision)."""
        return tuple(P.to(dtype) @ torch.linalg.matrix_exp((A - A.T).to(dtype))
                     for P, A in ((self.P1, self.A1), (self.P2, self.A2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        R1, R2 = self.factors(x.dtype)
        return kron_apply(x * self.d.to(x.dtype), R1, R2)

    apply_to = forward

    def unapply(self, y: torch.Tensor) -> torch.Tensor:
        """y·T⁻¹ = y·Tᵀ = (y·(R1ᵀ ⊗ R2ᵀ)) ⊙ s."""
        R1, R2 = self.factors(y.dtype)
        return kron_apply(y, R1.T, R2.T) * self.d.to(y.dtype)

    def fold(self, W: torch.Tensor) -> torch.Tensor:
        """W·T⁻ᵀ = W·T for an orthogonal T."""
        R1, R2 = self.factors(W.dtype)
        return kron_apply(W * self.d.to(W.dtype), R1, R2)

    @torch.no_grad()
    def freeze(self) -> KroneckerAffine:
        """The trained rotation as a frozen float16 `KroneckerAffine` of kind "orthogonal" (exact inverses of
        the stored values are what gets folded, so fp16 rounding of R cannot break the model's identity)."""
        R1, R2 = self.factors(torch.float64)
        out = KroneckerAffine(self.n, 0, (self.a, self.b))
        out.kind = self.kind
        out.d.data, out.P1.data, out.P2.data = self.d.data.clone(), R1.clone(), R2.clone()
        return out.to(self.d.device).freeze()

    def matrix(self) -> torch.Tensor:
        R1, R2 = self.factors(torch.float64)
        return torch.diag(self.d.double()) @ torch.kron(R1, R2)


class HadamardRotation(nn.Module):
    """The fixed randomized Hadamard rotation x ↦ x·Q of `transforms.rotate.Rotation` (Q⁻ᵀ = Q)."""

    kind = "rotation"

    def __init__(self, n: int, seed: int = 0):
        super().__init__()
        spec = factorize(n)
        R = Rotation.random(n, seed)
        self.n, self.order, self.exact = n, spec.a, spec.exact
        # One bit per sign is what is stored; the float signs are derived from it.
        self.register_buffer("signs_packed", pack_bits((R.signs > 0).to(torch.int64)[None, :], 1))
        if not spec.exact:
            self.register_buffer("factor", R.factor.float())
        self._rot: Rotation | None = None

    def _apply(self, fn, recurse=True):
        self._rot = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._rot = None
        return super()._load_from_state_dict(*args, **kwargs)

    def rotation(self, dtype: torch.dtype = torch.float32) -> Rotation:
        if self._rot is None or self._rot.signs.dtype != dtype:
            signs = unpack_bits(self.signs_packed, 1, self.n)[0].to(dtype) * 2 - 1
            factor = self.factor if not self.exact else small_factor(factorize(self.n))
            self._rot = Rotation(signs, factor.to(dtype).to(signs.device))
        return self._rot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotation(x.dtype if x.dtype == torch.float64 else torch.float32).apply(x)

    apply_to = forward

    def unapply(self, y: torch.Tensor) -> torch.Tensor:
        """y·Qᵀ = (y·(F ⊗ H)ᵀ/√n) ⊙ s (Sylvester H is symmetric)."""
        R = self.rotation(y.dtype if y.dtype == torch.float64 else torch.float32)
        return hadamard_transform(y, R.factor.T.to(y.dtype)) * R.signs.to(y.dtype)

    def fold(self, W: torch.Tensor) -> torch.Tensor:
        return self.forward(W)

    def freeze(self) -> HadamardRotation:
        return self

    def stored_bits(self) -> int:
        return 32 * self.signs_packed.numel() + (0 if self.exact else 32 * self.order * self.order)

    def describe(self) -> dict:
        return {"kind": self.kind, "n": self.n}

    def matrix(self) -> torch.Tensor:
        return self.forward(torch.eye(self.n, dtype=torch.float64))


TRANSFORMS = {"affine": KroneckerAffine, "orthogonal": KroneckerRotation, "rotation": HadamardRotation}


def build_transform(desc: dict, seed: int = 0) -> nn.Module:
    """A transform skeleton from its `describe()` record (its tensors are loaded afterwards)."""
    kind = desc.get("kind")
    if kind in ("affine", "orthogonal"):  # a frozen learned rotation is stored like an affine transform
        out = KroneckerAffine(desc["n"], seed, tuple(desc["factors"]))
        out.kind = kind
        return out.freeze()
    if kind == "rotation":
        return HadamardRotation(desc["n"], seed)
    raise FlexQuantError(f"unknown transform kind {kind!r}; known: {', '.join(TRANSFORMS)}")
