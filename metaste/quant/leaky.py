"""The calibrated surrogate family ψ(u; a, λ) = a·1{in} + λ·1{out} (docs/design.md §9).

``a`` scales the gradient of the weights inside the grid [−Qn, Qp], ``λ`` is the *leak* of the
clipped ones: (a, λ) = (1, 0) is the clipped STE, (1, 1) the identity STE. The parameters are
buffers, one pair per tensor or per output channel (never per element: a probe gives one number
per step for all of them), fitted by :class:`metaste.Calibrated` from zeroth-order probes.

Build it with ``quantize_model(net, surrogate="leaky", granularity="tensor")`` (or
``"channel"``). ``learnable`` is ``False`` on purpose: HyperSTE trains SLSTE/PLSTE/DLSTE by
hypergradients and must not pick this one up; ``calibrated`` marks it for the calibrated wrapper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .psi import band
from .surrogates import Surrogate, param_shape, registers

__all__ = ["LeakySurrogate", "leaky"]

LEAKY_GRANULARITIES = ("tensor", "channel")


def leaky(u: Tensor, a: Tensor, lam: Tensor, qn: float, qp: float) -> Tensor:
    """ψ = a on −Qn ≤ u ≤ Qp, λ outside. At (a, λ) = (1, 0) it equals the clipped STE bitwise
    (m·1 + 0 = m)."""
    m = band(u, -qn, qp)
    return m.mul_(a - lam).add_(lam)


@registers("leaky")
class LeakySurrogate(Surrogate):
    """ψ(u; a, λ) with ``a`` and ``lam`` buffers of the granularity's shape.

    Args:
        weight_shape: the shape of the weight it serves.
        granularity: ``"tensor"`` (one pair) or ``"channel"`` (one pair per output channel, dim 0).
        a_init, lam_init: the starting (a, λ); (1, 0) is the clipped STE.
        binary: the grid is binary (Qn = Qp = 1: the band is |u| ≤ 1).
    """

    name = "leaky"
    learnable = False
    calibrated = True
    param_names = ("a", "lam")

    @classmethod
    def build(cls, name: str, weight_shape: tuple[int, ...], settings: dict, kwargs: dict) -> Surrogate:
        return cls(
            weight_shape,
            settings["granularity"],
            binary=settings["binary"],
            dtype=settings["dtype"],
            **kwargs,
        )

    def __init__(
        self,
        weight_shape: Sequence[int] = (),
        granularity: str = "tensor",
        a_init: float = 1.0,
        lam_init: float = 0.0,
        binary: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(binary)
        shape = tuple(weight_shape)
        if granularity not in LEAKY_GRANULARITIES:
            raise ValueError(
                f"Invalid granularity {granularity!r} for the 'leaky' surrogate; choose one of "
                f"{LEAKY_GRANULARITIES} (per element there are too few probes to fit it): "
                "quantize_model(..., surrogate='leaky', granularity='tensor')"
            )
        if not (math.isfinite(a_init) and a_init > 0):
            raise ValueError(f"Invalid a_init: {a_init}; it must be finite and > 0")
        if not (math.isfinite(lam_init) and lam_init >= 0):
            raise ValueError(f"Invalid lam_init: {lam_init}; it must be finite and >= 0")
        self.granularity = granularity
        self.weight_shape = shape
        pshape = param_shape(shape, granularity)
        self.register_buffer("a", torch.full(pshape, float(a_init), dtype=dtype))
        self.register_buffer("lam", torch.full(pshape, float(lam_init), dtype=dtype))

    def params(self) -> tuple[Tensor, Tensor]:
        return self.a, self.lam

    def psi(self, u: Tensor, qn: float, qp: float) -> Tensor:
        return leaky(u, self.a, self.lam, qn, qp)

    def extra_repr(self) -> str:
        return f"name='leaky', granularity={self.granularity!r}, binary={self.binary}"
