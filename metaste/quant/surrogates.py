"""Surrogate gradients ψ(u; θ) that replace ∂v̂/∂v in the backward pass (docs/design.md §2): the
:class:`Surrogate` modules, each class registered under the names it builds (:func:`registers`;
:func:`metaste.quant.surrogate_factory.make_surrogate` picks one by name). The formulas themselves
(every ψ and ∂ψ/∂a) are the plain functions of :mod:`metaste.quant.psi`.

* :class:`FixedSurrogate`: a fixed ψ of ``u`` (``ste``, ``identity``, ``pwl``, ``hardtanh``,
  ``tanh``, ``approxsign``, ``fd(h)``);
* the learnable SLSTE / PLSTE / DLSTE (:mod:`metaste.quant.learnable`) and the calibrated
  ``leaky`` (:mod:`metaste.quant.leaky`) subclass :class:`Surrogate` in their own modules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

from torch import Tensor, nn

from .psi import approxsign, fd, hardtanh, identity, pwl, ste, tanh

__all__ = [
    "FIXED_SURROGATES",
    "SURROGATE_CLASSES",
    "GRANULARITIES",
    "Surrogate",
    "FixedSurrogate",
    "registers",
    "check_choice",
    "param_shape",
]

FIXED_SURROGATES: dict[str, Callable[..., Tensor]] = {
    "ste": ste,
    "identity": identity,
    "pwl": pwl,
    "hardtanh": hardtanh,
    "tanh": tanh,
    "approxsign": approxsign,
    "fd": fd,
}
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


def check_choice(value: str, valid: Sequence[str], what: str) -> None:
    """A ``ValueError`` naming ``what`` and the valid choices unless ``value`` is one of them."""
    if value not in valid:
        raise ValueError(f"Unknown {what} {value!r}; valid choices are {tuple(valid)}")


def param_shape(weight_shape: tuple[int, ...], granularity: str) -> tuple[int, ...]:
    """The shape of a surrogate parameter for a weight of ``weight_shape``: the weight's own
    (``"element"``), one per output channel broadcast over the rest (``"channel"``, dim 0; the
    weight needs >= 2 dims) or one in every dim (``"tensor"``)."""
    if granularity == "element":
        return weight_shape
    if granularity == "channel":
        if len(weight_shape) < 2:
            raise ValueError(
                f"granularity='channel' needs a weight with >= 2 dims, got shape {weight_shape}; "
                "use granularity='tensor'"
            )
        return (weight_shape[0],) + (1,) * (len(weight_shape) - 1)
    return (1,) * len(weight_shape)


class Surrogate(nn.Module):
    """Base class: ``psi(u, qn, qp)`` evaluates ψ element-wise for a weight in step units and
    returns a new tensor of ``u``'s shape (the quantizers' backward multiplies it in place).

    ``ste_kind`` is the smoothing kind FOGZO uses for a weight with this surrogate (docs/design.md §4.2):
    ``"identity"`` for round-based quantizers, the class's :attr:`binary_ste_kind` for binary
    weights: ``tanh`` → tanh; ``approxsign``, ``pwl``, ``plste``, ``dlste`` (triangular at a = 1)
    → approxsign; the rest (``ste``, ``hardtanh``, ``fd``, ``slste``, ``identity``, ``leaky``:
    box-shaped) → hardtanh.
    """

    name: str = ""
    learnable: ClassVar[bool] = False
    binary_ste_kind: str = "hardtanh"

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
        """A compact stand-in for u that :meth:`psi` takes (:meth:`metaste.quant.learnable.SLSTE.code`);
        none here."""
        return None

    @property
    def ste_kind(self) -> str:
        return self.binary_ste_kind if self.binary else "identity"

    def extra_repr(self) -> str:
        return f"name={self.name!r}, binary={self.binary}"


#: the smoothing kind of a binary weight under a fixed ψ whose shape is not a box
_BINARY_STE_KIND = {"tanh": "tanh", "approxsign": "approxsign", "pwl": "approxsign"}


@registers(*FIXED_SURROGATES)
class FixedSurrogate(Surrogate):
    """A fixed ψ from :data:`FIXED_SURROGATES` (no parameters). ``kwargs``: ``h`` for ``fd``,
    ``temperature`` for ``tanh``."""

    @classmethod
    def build(cls, name: str, weight_shape: tuple[int, ...], settings: dict, kwargs: dict) -> Surrogate:
        return cls(name, binary=settings["binary"], **kwargs)

    def __init__(self, name: str, binary: bool = False, **kwargs: float) -> None:
        super().__init__(binary)
        check_choice(name, tuple(FIXED_SURROGATES), "surrogate")
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
        self.binary_ste_kind = _BINARY_STE_KIND.get(name, "hardtanh")
        self.kwargs = kwargs
        self._fn = FIXED_SURROGATES[name]

    def psi(self, u: Tensor, qn: float, qp: float) -> Tensor:
        return self._fn(u, qn, qp, **self.kwargs)
