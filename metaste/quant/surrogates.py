"""Surrogate gradients ψ(u; θ) that replace ∂v̂/∂v in the backward pass (docs/design.md §2): the
:class:`Surrogate` modules, each class registered under the names it builds (:func:`registers`;
:func:`metaste.quant.surrogate_factory.make_surrogate` picks one by name). The formulas themselves
(every ψ and ∂ψ/∂a) are the plain functions of :mod:`metaste.quant.psi`.

* :class:`FixedSurrogate`: a fixed ψ of ``u`` (``ste``, ``identity``, ``pwl``, ``hardtanh``,
  ``tanh``, ``approxsign``, ``fd(h)``);
* :class:`LearnableSurrogate`: SLSTE / PLSTE / DLSTE, whose parameters are *buffers*, so they stay
  out of ``model.parameters()`` (the base optimizer never trains them) but are saved in
  ``state_dict()``; :func:`psi_differentiable` is ψ as a function of them for autograd.

Learnable parameters are initialised to their baseline (a = 1) and clamped to
``[a_min, a_max]`` (docs/design.md §2 *[decision]*).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .psi import (
    BOUNDARIES,
    approxsign,
    dlste,
    dlste_grad,
    fd,
    hardtanh,
    identity,
    plste,
    plste_grad,
    pwl,
    slste,
    slste_grad,
    slste_grad_code,
    ste,
    tanh,
)

__all__ = [
    "FIXED_SURROGATES",
    "LEARNABLE_SURROGATES",
    "SURROGATE_CLASSES",
    "GRANULARITIES",
    "Surrogate",
    "FixedSurrogate",
    "LearnableSurrogate",
    "registers",
    "psi_differentiable",
]

# Default clamp of learnable surrogate parameters. a = 1 is the baseline; a <= a_min would make
# ψ ≈ 0 (the element stops learning), a >= a_max makes the band tiny. See HyperSTE docs.
A_MIN_DEFAULT = 0.25
A_MAX_DEFAULT = 4.0


FIXED_SURROGATES: dict[str, Callable[..., Tensor]] = {
    "ste": ste,
    "identity": identity,
    "pwl": pwl,
    "hardtanh": hardtanh,
    "tanh": tanh,
    "approxsign": approxsign,
    "fd": fd,
}
LEARNABLE_SURROGATES = ("slste", "plste", "dlste")
GRANULARITIES = ("element", "channel", "tensor")

#: surrogate name → the :class:`Surrogate` class that builds it (:func:`registers`)
SURROGATE_CLASSES: dict[str, type[Surrogate]] = {}


def registers(*names: str) -> Callable[[type[Surrogate]], type[Surrogate]]:
    """Class decorator: the class builds the surrogates ``names`` (with :meth:`Surrogate.build`)."""

    def register(cls: type[Surrogate]) -> type[Surrogate]:
        for name in names:
            SURROGATE_CLASSES[name] = cls
        return cls

    return register


def _check_name(value: str, valid: Sequence[str], what: str) -> None:
    if value not in valid:
        raise ValueError(f"Unknown {what} {value!r}; valid choices are {tuple(valid)}")


class Surrogate(nn.Module):
    """Base class: ``psi(u, qn, qp)`` evaluates ψ element-wise for a weight in step units and
    returns a new tensor of ``u``'s shape (the quantizers' backward multiplies it in place).

    ``ste_kind`` is the smoothing kind FOGZO uses for a weight with this surrogate (docs/design.md §4.2):
    ``"identity"`` for round-based quantizers, a sign kind for binary weights: ``tanh`` → tanh;
    ``approxsign``, ``pwl``, ``plste``, ``dlste`` (triangular at a = 1) → approxsign; the rest
    (``ste``, ``hardtanh``, ``fd``, ``slste``, ``identity``: box-shaped) → hardtanh.
    """

    name: str = ""
    learnable: bool = False

    def __init__(self, binary: bool = False) -> None:
        super().__init__()
        self.binary = binary

    @classmethod
    def build(
        cls, name: str, weight_shape: tuple[int, ...], settings: dict, kwargs: dict
    ) -> Surrogate:  # pragma: no cover - abstract
        """The surrogate ``name`` for a weight of ``weight_shape``: ``settings`` are the factory's
        (binary, granularity, a_min, a_max, boundary, b, dtype), ``kwargs`` a fixed ψ's own."""
        raise NotImplementedError

    def psi(self, u: Tensor, qn: float, qp: float) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def code(
        self,
        u: Tensor,
        qn: float,
        qp: float,
        params: Sequence[Tensor] | None = None,
        *,
        inplace: bool = False,
    ) -> Tensor | None:
        """A compact stand-in for u that :meth:`psi` takes (:meth:`LearnableSurrogate.code`); none here."""
        return None

    @property
    def ste_kind(self) -> str:
        if not self.binary:
            return "identity"
        if self.name == "tanh":
            return "tanh"
        if self.name in ("approxsign", "pwl", "plste", "dlste"):
            return "approxsign"
        return "hardtanh"

    def extra_repr(self) -> str:
        return f"name={self.name!r}, binary={self.binary}"


@registers(*FIXED_SURROGATES)
class FixedSurrogate(Surrogate):
    """A fixed ψ from :data:`FIXED_SURROGATES` (no parameters). ``kwargs``: ``h`` for ``fd``,
    ``temperature`` for ``tanh``."""

    @classmethod
    def build(cls, name: str, weight_shape: tuple[int, ...], settings: dict, kwargs: dict) -> Surrogate:
        return cls(name, binary=settings["binary"], **kwargs)

    def __init__(self, name: str, binary: bool = False, **kwargs: float) -> None:
        super().__init__(binary)
        _check_name(name, tuple(FIXED_SURROGATES), "surrogate")
        allowed = {"fd": {"h"}, "tanh": {"temperature"}}.get(name, set())
        bad = set(kwargs) - allowed
        if bad:
            raise TypeError(
                f"surrogate {name!r} takes no argument(s) {sorted(bad)}; it accepts {sorted(allowed)}"
            )
        if name == "fd":
            h = float(kwargs.get("h", 1.0 if binary else 0.5))
            if not h > 0:
                raise ValueError(f"Invalid fd width h: {h}; it must be > 0")
            kwargs = {"h": h, "binary": binary}
        if name == "tanh" and not kwargs.get("temperature", 1.0) > 0:
            raise ValueError(f"Invalid tanh temperature: {kwargs['temperature']}; it must be > 0")
        self.name = name
        self.kwargs = kwargs
        self._fn = FIXED_SURROGATES[name]

    def psi(self, u: Tensor, qn: float, qp: float) -> Tensor:
        return self._fn(u, qn, qp, **self.kwargs)


@registers(*LEARNABLE_SURROGATES)
class LearnableSurrogate(Surrogate):
    """SLSTE / PLSTE / DLSTE with parameters held as buffers (``a``; ``a_n``/``a_p`` for DLSTE).

    Args:
        name: ``"slste"``, ``"plste"`` or ``"dlste"``.
        weight_shape: shape of the weight this surrogate serves.
        granularity: ``"element"`` (one a per weight), ``"channel"`` (per output channel, dim 0)
            or ``"tensor"`` (one a). Coarser granularity sums the element hypergradients.
        a_min, a_max: clamp of the parameters (a > 0 is required).
        boundary: SLSTE's ∂ψ/∂a mode, ``"none"`` or ``"window"`` with width ``b`` (docs/design.md §2).
        binary: grid is binary (Qn = Qp = 1).
    """

    learnable = True

    @classmethod
    def build(cls, name: str, weight_shape: tuple[int, ...], settings: dict, kwargs: dict) -> Surrogate:
        if kwargs:
            raise TypeError(f"learnable surrogate {name!r} takes no extra arguments {sorted(kwargs)}")
        return cls(name, weight_shape, **settings)

    def __init__(
        self,
        name: str,
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
        _check_name(name, LEARNABLE_SURROGATES, "learnable surrogate")
        _check_name(granularity, GRANULARITIES, "granularity")
        _check_name(boundary, BOUNDARIES, "boundary")
        if not 0 < a_min <= 1 <= a_max or not math.isfinite(a_max):
            raise ValueError(
                f"Invalid clamp [a_min, a_max] = [{a_min}, {a_max}]; need 0 < a_min <= 1 <= a_max < inf"
            )
        if not b > 0:
            raise ValueError(f"Invalid boundary window b: {b}; it must be > 0")
        shape = tuple(weight_shape)
        if granularity == "channel" and len(shape) < 2:
            raise ValueError(
                f"granularity='channel' needs a weight with >= 2 dims, got shape {shape}; "
                "use granularity='tensor' or 'element'"
            )
        self.name = name
        self.granularity = granularity
        self.a_min, self.a_max = float(a_min), float(a_max)
        self.boundary, self.b = boundary, float(b)
        self.weight_shape = shape
        pshape = {
            "element": shape,
            "channel": (shape[0],) + (1,) * (len(shape) - 1) if shape else (),
            "tensor": (1,) * len(shape),
        }[granularity]
        for pname in self.param_names:
            self.register_buffer(pname, torch.ones(pshape, dtype=dtype, device=device))

    @property
    def param_names(self) -> tuple[str, ...]:
        return ("a_n", "a_p") if self.name == "dlste" else ("a",)

    def params(self) -> tuple[Tensor, ...]:
        """The surrogate parameters (buffers), in :attr:`param_names` order."""
        return tuple(getattr(self, n) for n in self.param_names)

    def psi(self, u: Tensor, qn: float, qp: float, params: Sequence[Tensor] | None = None) -> Tensor:
        """ψ(u; θ) with θ = ``params`` (default: the stored buffers). Differentiable in θ
        through :func:`psi_differentiable`."""
        p = self.params() if params is None else tuple(params)
        if self.name == "slste":
            return slste(u, p[0], qn, qp)
        if self.name == "plste":
            return plste(u, p[0], qn, qp)
        return dlste(u, p[0], p[1], qn, qp)

    def dpsi(
        self, u: Tensor, qn: float, qp: float, params: Sequence[Tensor] | None = None
    ) -> tuple[Tensor, ...]:
        """Element-wise ∂ψ/∂θ, one tensor of ``u``'s shape per parameter (docs/design.md §2).

        Reduce to a parameter's shape with ``grad.sum_to_size(param.shape)``.
        """
        p = self.params() if params is None else tuple(params)
        if self.name == "slste":
            return (slste_grad(u, p[0], qn, qp, self.boundary, self.b),)
        if self.name == "plste":
            return (plste_grad(u, p[0], qn, qp),)
        return dlste_grad(u, p[0], p[1], qn, qp)

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
        same θ, bit for bit (SLSTE: :func:`slste_grad_code`), or ``None`` where ψ needs u itself.
        ``inplace``: ``u`` may be overwritten (the caller's own, not used after)."""
        p = self.params() if params is None else tuple(params)
        if self.name != "slste" or u.dtype != p[0].dtype or u.dtype == torch.uint8:
            return None
        return slste_grad_code(u.detach(), p[0].detach(), qn, qp, self.boundary, self.b, inplace=inplace)

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
