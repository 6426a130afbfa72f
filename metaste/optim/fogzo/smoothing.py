"""The smoothing implied by each STE (docs/design.md §4.2): the table FOGZO reads ε̄ and p̄ from.

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

z is drawn by :mod:`metaste.optim.core.noise` (its samplers are the last column).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.noise import SQRT3, SQRT6, TANH_EPS

__all__ = [
    "Smoothing",
    "SMOOTHINGS",
    "STE_KINDS",
]


@dataclass(frozen=True)
class Smoothing:
    """One row of the table: ``eps_bar`` (ε̄), ``density`` (p̄), ``hard`` (h) and ``soft`` (h_s);
    the samplers are :func:`metaste.optim.core.noise.z_from_index`."""

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
