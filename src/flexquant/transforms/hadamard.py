"""Hadamard matrices of any order we can build, and a fast Hadamard transform (Kronecker chain of small matmuls).

Order n = a·2^k is built as H_a ⊗ H_(2^k): Sylvester for powers of two, Paley I (a = q+1, q ≡ 3
mod 4 prime) and Paley II (a = 2(q+1), q ≡ 1 mod 4 prime) for the small factor a, generated from
code (no stored tables). Where no construction is known for any a, the small factor is a seeded
random orthogonal matrix instead: still an exact rotation (so W̃x̃ = Wx), but with a weaker
incoherence guarantee; `HadamardSpec.exact` says which one was used.

SmolLM2: 576 = 36·16 (Paley II, q=17), 1536 = 12·128 (Paley I, q=11). 7B/8B: 4096 = 2^12,
11008 = 43·256 (no Hadamard of order 43·2^j ≤ 172 from Paley → orthogonal factor),
14336 = 28·512 (Paley II, q=13).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache

import torch

log = logging.getLogger(__name__)
# The small factor is applied as a dense a×a matmul per token: keep it small (O(n·a) work).
MAX_SMALL_FACTOR = 256


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(math.isqrt(q)) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if x in residues else -1 for x in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]  # Q_ij = χ(j − i)


def _paley1(q: int) -> torch.Tensor:
    Q = _jacobsthal(q)
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, Q
    return S + torch.eye(q + 1, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    Q = _jacobsthal(q)
    C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    C[0, 1:], C[1:, 0], C[1:, 1:] = 1, 1, Q
    A = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    B = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, A) + torch.kron(torch.eye(q + 1, dtype=torch.float64), B)


@lru_cache(maxsize=None)
def small_hadamard(a: int) -> torch.Tensor | None:
    """A Hadamard matrix of order ``a`` (entries ±1, H Hᵀ = a·I) from Sylvester/Paley, or None."""
    if a == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if a % 2 == 0 and a & (a - 1) == 0:
        h = small_hadamard(a // 2)
        return torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    if _is_prime(a - 1) and (a - 1) % 4 == 3:
        return _paley1(a - 1)
    if a % 2 == 0 and _is_prime(a // 2 - 1) and (a // 2 - 1) % 4 == 1:
        return _paley2(a // 2 - 1)
    return None


@dataclass(frozen=True)
class HadamardSpec:
    """How a rotation of size n = a·2^k is made: small factor of order a (Hadamard if ``exact``)."""

    n: int
    a: int
    exact: bool


def factorize(n: int) -> HadamardSpec:
    """Split n = a·2^k with the smallest a that has a Hadamard matrix (a·2^k, a ≤ 2^k preferred)."""
    k = (n & -n).bit_length() - 1  # largest power of two dividing n
    odd = n >> k
    for j in range(0, k + 1):  # move powers of two into the small factor until a construction exists
        a = odd << j
        if a > MAX_SMALL_FACTOR:
            break
        if small_hadamard(a) is not None:
            return HadamardSpec(n, a, True)
    log.warning("no Hadamard matrix construction for size %d; using a random orthogonal %d×%d factor "
                "⊗ H_%d (exact rotation, weaker incoherence guarantee)", n, odd, odd, 1 << k)
    return HadamardSpec(n, odd, False)


def small_factor(spec: HadamardSpec, seed: int = 0) -> torch.Tensor:
    """The a×a factor, float64: the ±1 Hadamard matrix (unnormalised, so it is stored exactly in any
    dtype; `hadamard_transform` divides by √a) or, without a construction, an orthogonal matrix."""
    if spec.exact:
        return small_hadamard(spec.a)
    g = torch.Generator().manual_seed(seed + spec.a)
    Q, R = torch.linalg.qr(torch.randn(spec.a, spec.a, generator=g, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))


# Power-of-two Hadamard factors are applied as dense ±1 matmuls of at most this order (a Kronecker chain):
# on CPU a few small matmuls beat the log2(n) memory passes of the butterfly (2.7x at 1536, measured;
# chunks of 32 or 128 are slower).
KRON_CHUNK = 64


def _kron_factors(factor: torch.Tensor, b: int) -> list[torch.Tensor]:
    """F ⊗ H_b as a chain of small matrices, slowest index first: [F ⊗ H_r, H_64, …, H_64] (b = r·64^m),
    or [F, H_r, H_64, …] when F ⊗ H_r would exceed MAX_SMALL_FACTOR."""
    chunks, rest = 0, b
    while rest > KRON_CHUNK:
        rest //= KRON_CHUNK
        chunks += 1
    if rest * KRON_CHUNK**chunks != b:  # b is a power of two, so only the last split can be uneven
        raise ValueError(f"{b} is not a power of two")
    h_rest = small_hadamard(rest).to(factor.device, factor.dtype)  # on F's device: kron needs both there
    a = factor.shape[0]
    head = [torch.kron(factor.contiguous(), h_rest)] if a * rest <= MAX_SMALL_FACTOR else [factor, h_rest]
    return head + [small_hadamard(KRON_CHUNK).to(factor.device, factor.dtype)] * chunks


def kron_apply(x: torch.Tensor, mats: list[torch.Tensor]) -> torch.Tensor:
    """x · (M_1 ⊗ … ⊗ M_m) along the last dim: one matmul per factor on the fastest index, whose result
    is rotated to the front, so after m steps the index order is restored."""
    n = x.shape[-1]
    y = x.reshape(-1, n)
    rows = y.shape[0]
    for M in reversed(mats):
        f = M.shape[0]
        y = (y.reshape(-1, f) @ M.to(y.device, y.dtype)).reshape(rows, n // f, f).transpose(1, 2).reshape(rows, n)
    return y.reshape(x.shape)


def hadamard_transform(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x · (F ⊗ H_b)/√n along the last dim (n = a·b): an orthogonal map when F is a ±1 Hadamard
    matrix of order a; with an orthogonal F (fallback) the result is scaled by √a to stay orthogonal."""
    n, a = x.shape[-1], factor.shape[0]
    b = n // a
    y = kron_apply(x, _kron_factors(factor.to(x.dtype), b))
    hadamard = bool((factor.abs() == 1).all())
    return y / math.sqrt(n if hadamard else b)


def hadamard_matrix(n: int, seed: int = 0) -> torch.Tensor:
    """The dense orthogonal n×n matrix that `hadamard_transform` applies (float64)."""
    return hadamard_transform(torch.eye(n, dtype=torch.float64), small_factor(factorize(n), seed))
