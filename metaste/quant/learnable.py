"""The learnable surrogates SLSTE, PLSTE and DLSTE (docs/design.md §2): ψ(u; θ) whose parameters
θ (``a``; ``a_n``/``a_p`` for DLSTE) HyperSTE trains by hypergradients.

θ is held as *buffers*, so it stays out of ``model.parameters()`` (the base optimizer never
trains it) but is saved in ``state_dict()``; :func:`psi_differentiable` is ψ as a function of θ
for autograd. θ starts at the baseline a = 1 and is clamped to ``[a_min, a_max]``
(docs/design.md §2 *[decision]*). The formulas are the plain functions of :mod:`metaste.quant.psi`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from .psi import BOUNDARIES, dlste, dlste_grad, plste, plste_grad, slste, slste_grad, slste_grad_code
from .surrogates import GRANULARITIES, Surrogate, check_choice, param_shape, registers

__all__ = [
    "A_MIN_DEFAULT",
    "A_MAX_DEFAULT",
    "LEARNABLE_SURROGATES",
    "LearnableSurrogate",
    "SLSTE",
    "PLSTE",
    "DLSTE",
    "psi_differentiable",
]

# Default clamp of learnable surrogate parameters. a = 1 is the baseline; a <= a_min would make
# ψ ≈ 0 (the element stops learning), a >= a_max makes the band tiny. See HyperSTE docs.
A_MIN_DEFAULT = 0.25
A_MAX_DEFAULT = 4.0

LEARNABLE_SURROGATES = ("slste", "plste", "dlste")


class LearnableSurrogate(Surrogate):
    """Base of SLSTE / PLSTE / DLSTE: θ as buffers of the granularity's shape, its clamp and
    SLSTE's ∂ψ/∂a mode (kept on every learnable surrogate: HyperSTE sets it on all it manages).

    Args:
        weight_shape: shape of the weight this surrogate serves.
        granularity: ``"element"`` (one a per weight), ``"channel"`` (per output channel, dim 0)
            or ``"tensor"`` (one a). Coarser granularity sums the element hypergradients.
        a_min, a_max: clamp of the parameters (a > 0 is required).
        boundary: SLSTE's ∂ψ/∂a mode, ``"none"`` or ``"window"`` with width ``b`` (docs/design.md §2).
        binary: grid is binary (Qn = Qp = 1).
    """

    learnable = True
    #: the buffers that hold θ, in the order :meth:`psi` and :meth:`dpsi` take them
    param_names: ClassVar[tuple[str, ...]] = ("a",)

    @classmethod
    def build(cls, name: str, weight_shape: tuple[int, ...], settings: dict, kwargs: dict) -> Surrogate:
        if kwargs:
            raise TypeError(f"learnable surrogate {name!r} takes no extra arguments {sorted(kwargs)}")
        return cls(weight_shape, **settings)

    def __init__(
        self,
        weight_shape: Sequence[int],
        granularity: str = "element",
        a_min: float = A_MIN_DEFAULT,
        a_max: float = A_MAX_DEFAULT,
        boundary: str = "none",
        b: float = 0.5,
        binary: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(binary)
        check_choice(granularity, GRANULARITIES, "granularity")
        check_choice(boundary, BOUNDARIES, "boundary")
        if not 0 < a_min <= 1 <= a_max or not math.isfinite(a_max):
            raise ValueError(
                f"Invalid clamp [a_min, a_max] = [{a_min}, {a_max}]; need 0 < a_min <= 1 <= a_max < inf"
            )
        if not b > 0:
            raise ValueError(f"Invalid boundary window b: {b}; it must be > 0")
        shape = tuple(weight_shape)
        pshape = param_shape(shape, granularity)
        self.granularity = granularity
        self.a_min, self.a_max = float(a_min), float(a_max)
        self.boundary, self.b = boundary, float(b)
        self.weight_shape = shape
        for pname in self.param_names:
            self.register_buffer(pname, torch.ones(pshape, dtype=dtype, device=device))

    def params(self) -> tuple[Tensor, ...]:
        """The surrogate parameters (buffers), in :attr:`param_names` order."""
        return tuple(getattr(self, n) for n in self.param_names)

    def psi(self, u: Tensor, qn: float, qp: float, params: Sequence[Tensor] | None = None) -> Tensor:
        """ψ(u; θ) with θ = ``params`` (default: the stored buffers). Differentiable in θ
        through :func:`psi_differentiable`."""
        return self._psi(u, qn, qp, self.params() if params is None else tuple(params))

    def dpsi(
        self, u: Tensor, qn: float, qp: float, params: Sequence[Tensor] | None = None
    ) -> tuple[Tensor, ...]:
        """Element-wise ∂ψ/∂θ, one tensor of ``u``'s shape per parameter (docs/design.md §2).

        Reduce to a parameter's shape with ``grad.sum_to_size(param.shape)``.
        """
        return self._dpsi(u, qn, qp, self.params() if params is None else tuple(params))

    def _psi(self, u: Tensor, qn: float, qp: float, p: tuple[Tensor, ...]) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _dpsi(
        self, u: Tensor, qn: float, qp: float, p: tuple[Tensor, ...]
    ) -> tuple[Tensor, ...]:  # pragma: no cover
        raise NotImplementedError

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp every parameter to [a_min, a_max] in place."""
        for p in self.params():
            p.clamp_(self.a_min, self.a_max)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, granularity={self.granularity!r}, a in [{self.a_min}, "
            f"{self.a_max}], boundary={self.boundary!r}, binary={self.binary}"
        )


@registers("slste")
class SLSTE(LearnableSurrogate):
    """Scaled-linear STE ψ = a·1{−Qn/a ≤ u ≤ Qp/a} (:func:`metaste.quant.psi.slste`); the one
    learnable ψ with a compact one-byte code of u (:meth:`code`)."""

    name = "slste"

    def _psi(self, u: Tensor, qn: float, qp: float, p: tuple[Tensor, ...]) -> Tensor:
        return slste(u, p[0], qn, qp)

    def _dpsi(self, u: Tensor, qn: float, qp: float, p: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return (slste_grad(u, p[0], qn, qp, self.boundary, self.b),)

    def code(
        self,
        u: Tensor,
        qn: float,
        qp: float,
        params: Sequence[Tensor] | None = None,
        *,
        inplace: bool = False,
    ) -> Tensor | None:
        """u as a one-byte region code that :meth:`psi` and :meth:`dpsi` take in its place with the
        same θ, bit for bit (:func:`metaste.quant.psi.slste_grad_code`), or ``None`` where u's dtype
        differs from θ's. ``inplace``: ``u`` may be overwritten (the caller's own, not used after)."""
        p = self.params() if params is None else tuple(params)
        if u.dtype != p[0].dtype or u.dtype == torch.uint8:
            return None
        return slste_grad_code(u.detach(), p[0].detach(), qn, qp, self.boundary, self.b, inplace=inplace)


@registers("plste")
class PLSTE(LearnableSurrogate):
    """Piecewise-linear STE ψ = max(0, 2a(1 − a·|u|/Q)), Q = Qn below 0 and Qp above
    (:func:`metaste.quant.psi.plste`)."""

    name = "plste"
    binary_ste_kind = "approxsign"

    def _psi(self, u: Tensor, qn: float, qp: float, p: tuple[Tensor, ...]) -> Tensor:
        return plste(u, p[0], qn, qp)

    def _dpsi(self, u: Tensor, qn: float, qp: float, p: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return (plste_grad(u, p[0], qn, qp),)


@registers("dlste")
class DLSTE(LearnableSurrogate):
    """Double-linear STE: PLSTE with its two sides learned apart, a_n on u ≤ 0 and a_p on u > 0
    (:func:`metaste.quant.psi.dlste`)."""

    name = "dlste"
    binary_ste_kind = "approxsign"
    param_names = ("a_n", "a_p")

    def _psi(self, u: Tensor, qn: float, qp: float, p: tuple[Tensor, ...]) -> Tensor:
        return dlste(u, p[0], p[1], qn, qp)

    def _dpsi(self, u: Tensor, qn: float, qp: float, p: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return dlste_grad(u, p[0], p[1], qn, qp)


class _PsiWithCustomGrad(torch.autograd.Function):
    """ψ(u; θ) whose backward in θ is :meth:`LearnableSurrogate.dpsi` (honours the SLSTE
    boundary mode, which plain autograd cannot express). Not ``once_differentiable``-marked
    paths are avoided on purpose: the graph to θ must survive (docs/design.md §3.2 traps)."""

    @staticmethod
    def forward(ctx, surrogate, u, qn, qp, *params):  # type: ignore[override]
        ctx.surrogate, ctx.qn, ctx.qp = surrogate, qn, qp
        ctx.save_for_backward(u, *params)
        return surrogate.psi(u, qn, qp, params)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        u, *params = ctx.saved_tensors
        grads = ctx.surrogate.dpsi(u, ctx.qn, ctx.qp, params)
        out = [(grad_out * g).sum_to_size(p.shape) for g, p in zip(grads, params)]
        return (None, None, None, None, *out)


def psi_differentiable(
    surrogate: LearnableSurrogate, u: Tensor, qn: float, qp: float, params: Sequence[Tensor]
) -> Tensor:
    """ψ(u; θ) as a function autograd can differentiate in θ, with ∂ψ/∂θ = ``surrogate.dpsi``
    (so ``boundary="window"`` is respected). ``u`` is treated as a constant."""
    return _PsiWithCustomGrad.apply(surrogate, u.detach(), qn, qp, *params)
