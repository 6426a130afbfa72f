"""The curricula: which weights a training forward sees quantized at step t (docs/design.md §12).

Each strategy maps (the weight, ρ(t), t) to the *mix* m of its layer: the forward weight is
``torch.lerp(v, Q(v), m)`` — v where m = 0, Q(v) where m = 1 (both exact), (1 − m)·v + m·Q(v)
between — and autograd gives v the gradient (1 − m)·g + m·ψ·g. ``None`` is the plain quantized
forward. A mask element is 1{B < ⌊256ρ⌉} with B a uniform random byte from torch's generator on
the weight's device, seeded by (seed, step, weight index): every rank on the same kind of device
and every resume draw the same masks, and one 64-bit draw serves eight elements (the hash of
FOGZO's noise costs 20× more here, measured by ``benchmarks/bench_curriculum.py``). ρ is thus
rounded to 1/256.

| name | m | source |
|---|---|---|
| ``random`` | 1{U < ρ}, U fresh per element and step | PEGE's random mask |
| ``nested`` | 1{U < ρ}, U fixed per element (once quantized, stays quantized) | ours |
| ``switch`` | 0 for t < T_c (float), then the quantized forward | float phase + hard switch |
| ``blend`` | ρ (a scalar) | alpha-blending |
| ``noise`` | 1{U < ρ} per block (an output row of a Linear, a kernel of a conv) | Quant-Noise |
| ``nearest`` | 1 on the ⌈ρN⌉ elements nearest their grid point, recomputed every K steps | ours |

``bits`` (progressive bit width) sets the layer's bit width instead of a mix: the weight is
quantized on the finer grids of ``ladder`` (e.g. 8 then 4 bits, over the same range) for equal
shares of ρ, then on its own grid from T_c on.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from ..optim.core.noise import derive_seed
from ..quant.registry import QuantEntry

__all__ = ["Curriculum", "CURRICULA", "register_curriculum"]

CURRICULA: dict[str, type[Curriculum]] = {}


def register_curriculum(cls: type[Curriculum]) -> type[Curriculum]:
    """Class decorator: make the strategy available by its ``name``."""
    CURRICULA[cls.name] = cls
    return cls


def _bytes(shape: tuple[int, ...], seed: int, device: torch.device) -> Tensor:
    """Uniform random bytes, one per element of ``shape``, a pure function of ``seed`` (and the
    device type's generator)."""
    n = math.prod(shape)
    gen = torch.Generator(device=device).manual_seed(seed)
    words = torch.randint(
        -(2**63), 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64, generator=gen, device=device
    )
    return words.view(torch.uint8)[:n].view(shape)


def _below(shape: tuple[int, ...], seed: int, rho: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The mask 1{B < ⌊256ρ⌉} (a fraction ρ of ones, in expectation) as ``dtype``."""
    return (_bytes(shape, seed, device) < int(round(256 * rho))).to(dtype)


class Curriculum:
    """A strategy: :meth:`mix` of weight ``index`` at step ``t`` and ratio ``rho`` (< 1), or, for a
    bit-width strategy (``sets = "bits"``), :meth:`bits`."""

    name: ClassVar[str] = ""
    #: what the strategy sets on a layer: its ``curriculum_mix`` or its ``curriculum_bits``
    sets: ClassVar[str] = "mix"
    #: the mix is re-derived only every ``every`` steps (``nearest``); others every step
    every: int = 1

    def __init__(self, seed: int = 0, every: int = 1, ladder: tuple[int, ...] = (8, 4)) -> None:
        self.seed, self.every, self.ladder = seed, every, tuple(ladder)

    def check(self, entry: QuantEntry) -> None:
        """Raise ``ValueError`` if the strategy cannot drive this weight's quantizer."""

    def bits(self, entry: QuantEntry, rho: float) -> int | None:
        raise NotImplementedError

    def mix(self, entry: QuantEntry, index: int, rho: float, t: int) -> Tensor:
        raise NotImplementedError


@register_curriculum
class Random(Curriculum):
    name = "random"

    def mix(self, entry: QuantEntry, index: int, rho: float, t: int) -> Tensor:
        w = entry.weight
        return _below(tuple(w.shape), derive_seed(self.seed, t, index), rho, w.device, w.dtype)


@register_curriculum
class Nested(Curriculum):
    name = "nested"

    def mix(self, entry: QuantEntry, index: int, rho: float, t: int) -> Tensor:
        w = entry.weight  # B is the same at every step: redrawn, not stored
        return _below(tuple(w.shape), derive_seed(self.seed, -1, index), rho, w.device, w.dtype)


@register_curriculum
class Switch(Curriculum):
    name = "switch"

    def mix(self, entry: QuantEntry, index: int, rho: float, t: int) -> Tensor:
        return torch.zeros((), dtype=entry.weight.dtype, device=entry.weight.device)


@register_curriculum
class Blend(Curriculum):
    name = "blend"

    def mix(self, entry: QuantEntry, index: int, rho: float, t: int) -> Tensor:
        return torch.tensor(rho, dtype=entry.weight.dtype, device=entry.weight.device)


@register_curriculum
class Noise(Curriculum):
    name = "noise"

    def mix(self, entry: QuantEntry, index: int, rho: float, t: int) -> Tensor:
        w = entry.weight  # one draw per output row (Linear) or per kernel (conv: out × in)
        blocks = tuple(w.shape[:2]) if w.dim() > 2 else tuple(w.shape[:1])
        m = _below(blocks, derive_seed(self.seed, t, index), rho, w.device, w.dtype)
        return m.view(*blocks, *([1] * (w.dim() - len(blocks))))


@register_curriculum
class Nearest(Curriculum):
    name = "nearest"

    def mix(self, entry: QuantEntry, index: int, rho: float, t: int) -> Tensor:
        u = entry.u()
        err = (u - torch.round(u)).abs_().flatten()
        m = torch.zeros_like(err)
        count = math.ceil(rho * err.numel())
        if count:
            m[torch.topk(err, count, largest=False).indices] = 1.0
        return m.view(u.shape).to(entry.weight.dtype)


@register_curriculum
class Bits(Curriculum):
    name = "bits"
    sets = "bits"

    def check(self, entry: QuantEntry) -> None:
        if entry.quantizer.kind not in ("fixed", "lsq"):
            raise ValueError(
                f"the 'bits' curriculum quantizes on finer grids of a round-based quantizer (fixed, LSQ); "
                f"this model's weights use '{entry.quantizer.kind}' (1-bit DoReFa has no finer grid)"
            )

    def bits(self, entry: QuantEntry, rho: float) -> int | None:
        finer = [b for b in self.ladder if b > entry.quantizer.bits]
        stage = int(rho * len(finer))
        return finer[stage] if stage < len(finer) else None
