"""The smoothing implied by each STE (docs/design.md §4.2), and FOGZO's seeded noise.

An STE replaces the Jacobian of a hard function ``h`` (round or sign) by that of a smooth
surrogate ``h_s``. Each ``h_s`` used in practice is exactly a stochastic smoothing,
``h_s(x) = E_{z∼p̄}[h(x + ε̄ z)]``, with ``p̄`` of mean 0 and variance 1:

========== ===== ==================== ======= ==================== ===================
STE kind   h     h_s                  ε̄       p̄(z)                 sampler, W = 2U − 1
========== ===== ==================== ======= ==================== ===================
identity   round x                    1/(2√3) U(−√3, √3)           √3·W
hardtanh   sign  clip(x, −1, 1)       1/√3    U(−√3, √3)           √3·W
tanh       sign  tanh x               π/√12   ε̄(1 − tanh²(ε̄z))/2   atanh(W)/ε̄
approxsign sign  2x − x|x| on |x| ≤ 1 1/√6    tri(z/√6)/√6         √6·(W₁ + W₂)/2
========== ===== ==================== ======= ==================== ===================

(√6(W₁ + W₂)/2 = √6(U₁ + U₂ − 1), the table of docs/design.md §4.2.)

Noise is never stored: :func:`noise` regenerates z for (seed, t, i, k) as a pure function of
(:func:`derive_seed` (seed, t, i, k), element index): a counter-based integer hash written in
torch ops (:mod:`metaste.optim._fused`), so the bits are computed where the weight lives — CPU
or GPU, no host copy, the same stream on every device — and a fused kernel can recompute them
from the element index alone. A shard of a tensor (FSDP2) evaluates the same function
at its global indices (:func:`noise_slice`), so the union of the shards' noise is the
single-process noise. W = 2U − 1 takes 16 random bits: the midpoints of a
2^16-level grid, exactly symmetric and strictly inside (−1, 1), so ``atanh`` never sees ±1 (tanh
kind: |z| ≤ 6.5, a tail of mass 2^-15 is cut and the variance is 0.999); approxsign's two W are
the two 16-bit halves of one 32-bit hash. (Earlier versions hashed twice per 16 bits, and before
that drew from NumPy's SFC64: the distribution is the same, the numbers are not.)
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .._compile import FUSE_MIN, compilable, kernel

__all__ = [
    "Smoothing",
    "SMOOTHINGS",
    "STE_KINDS",
    "derive_seed",
    "rademacher",
    "noise",
    "noise_slice",
]

SQRT3 = math.sqrt(3.0)
SQRT6 = math.sqrt(6.0)
TANH_EPS = math.pi / math.sqrt(12.0)


@dataclass(frozen=True)
class Smoothing:
    """One row of the table: ``eps_bar`` (ε̄), ``density`` (p̄), ``hard`` (h) and ``soft`` (h_s);
    the samplers are :func:`metaste.optim._fused.z_from_index`."""

    kind: str
    eps_bar: float
    density: Callable[[Tensor], Tensor]
    hard: Callable[[Tensor], Tensor]
    soft: Callable[[Tensor], Tensor]


def _sign(x: Tensor) -> Tensor:
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def _uniform_density(z: Tensor) -> Tensor:
    return (z.abs() <= SQRT3).to(z.dtype) / (2 * SQRT3)


def _tanh_density(z: Tensor) -> Tensor:
    return TANH_EPS * (1 - torch.tanh(TANH_EPS * z) ** 2) / 2


def _triangle_density(z: Tensor) -> Tensor:
    return torch.clamp(1 - (z / SQRT6).abs(), min=0) / SQRT6


def _approxsign(x: Tensor) -> Tensor:
    return torch.where(x.abs() <= 1, 2 * x - x * x.abs(), _sign(x))


SMOOTHINGS: dict[str, Smoothing] = {
    "identity": Smoothing(
        "identity",
        1 / (2 * SQRT3),
        _uniform_density,
        torch.round,
        lambda x: x,
    ),
    "hardtanh": Smoothing(
        "hardtanh",
        1 / SQRT3,
        _uniform_density,
        _sign,
        lambda x: torch.clamp(x, -1, 1),
    ),
    "tanh": Smoothing(
        "tanh",
        TANH_EPS,
        _tanh_density,
        _sign,
        torch.tanh,
    ),
    "approxsign": Smoothing(
        "approxsign",
        1 / SQRT6,
        _triangle_density,
        _sign,
        _approxsign,
    ),
}
STE_KINDS = tuple(SMOOTHINGS)


def derive_seed(*key: int) -> int:
    """A 63-bit seed from integers (e.g. (seed, t, i, k)): stable across runs and platforms."""
    digest = hashlib.blake2b(struct.pack(f"<{len(key)}q", *key), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def rademacher(seed: int, step: int, sample: int) -> float:
    """σ_i ∈ {±1} for sample ``i`` of step ``t``."""
    return 1.0 if derive_seed(seed, step, sample, -1) & 1 else -1.0


def noise(kind: str, shape: torch.Size, seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """z ∼ p̄ of ``kind``, i.i.d. per element, of ``shape``: a fresh tensor, regenerated
    bit-identically from ``seed`` on every call."""
    z = noise_slice(kind, 0, math.prod(shape), seed, device, dtype)
    return z.view(shape)


def noise_slice(
    kind: str, start: int, length: int, seed: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Elements ``[start, start + length)`` of the flat noise z of ``seed``,
    ``noise(kind, (n,), seed, ...)[start : start + length]`` for any n ≥ start + length, generated
    without the rest: z is a pure function of (seed, element index), so the slice is the hash
    evaluated at the global indices start … start + length − 1. A shard of a tensor (FSDP2) thus
    draws exactly its part of the noise a single process draws. Returns a fresh flat tensor, made
    by one compiled pass from ``FUSE_MIN`` elements on (the bits of the eager ops)."""
    from ._fused import key_halves, z_from_index

    if kind not in SMOOTHINGS:
        raise ValueError(f"unknown STE kind {kind!r}")
    if length <= 0:
        return torch.empty(0, device=device, dtype=dtype)
    if start + length > 1 << 31:
        raise ValueError(
            f"FOGZO's noise indexes elements with int32: elements up to {start + length} are too many"
        )
    j = torch.arange(start, start + length, dtype=torch.int32, device=device)
    fused = length >= FUSE_MIN and compilable(j)
    # the key as tensors: a new seed each step must not recompile the pass
    k1, k2 = (torch.tensor(k, dtype=torch.int32, device=device) if fused else k for k in key_halves(seed))
    z = kernel(z_from_index, kind, fused)(kind, j, k1, k2)
    return z if dtype == torch.float32 else z.to(dtype)
