"""The options every HyperSTE method takes (docs/design.md §3, §3.5): :class:`MethodOptions`, the
frozen dataclass each method's options extend and validate in ``__post_init__`` (what the user
passes as ``HyperSTE(method=...)``), and :func:`resolve_hyper_optimizer`, the factory of the
optimizer of θ that ``delayed`` and the horizon methods take.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.optim import Optimizer

from ...quant.psi import BOUNDARIES

if TYPE_CHECKING:
    from ._common import HyperMethod, ManagedWeight

__all__ = ["MethodOptions", "HyperOptimizerSpec", "resolve_hyper_optimizer"]

HyperOptimizerSpec = type[Optimizer] | Callable[..., Optimizer] | str | None


def resolve_hyper_optimizer(spec: HyperOptimizerSpec) -> Callable[..., Optimizer] | None:
    """A hyper-optimizer factory ``(params, lr=..., **kwargs) -> Optimizer`` from a class, a
    callable or the name of a ``torch.optim`` optimizer (case-insensitive, e.g. ``"adam"``)."""
    if spec is None or (callable(spec) and not isinstance(spec, str)):
        return spec
    if isinstance(spec, str):
        names = {
            n.lower(): getattr(torch.optim, n)
            for n in dir(torch.optim)
            if isinstance(getattr(torch.optim, n), type) and issubclass(getattr(torch.optim, n), Optimizer)
        }
        names.pop("optimizer", None)
        if spec.lower() not in names:
            raise ValueError(
                f"Unknown hyper_optimizer {spec!r}; give a torch.optim name, one of {sorted(names)}"
            )
        return names[spec.lower()]
    raise TypeError(
        f"hyper_optimizer must be a torch.optim.Optimizer class, a callable (params, lr=..., **kwargs) "
        f"or a torch.optim name such as 'adam', got {type(spec).__name__}"
    )


@dataclass(frozen=True)
class MethodOptions:
    """Options every HyperSTE method takes; subclasses add their own fields and validate them in
    ``__post_init__`` (``ValueError``/``TypeError`` naming the bad value).

    Args:
        hyper_lr: learning rate of θ (default 0.01), ≥ 0; 0 leaves θ unchanged and the run
            bit-identical to the bare optimizer (docs/design.md §3.5).
        hyper_lr_mode: ``"normalized"`` (default: η_a = hyper_lr / RMS of the hypergradient) or
            ``"raw"`` (η_a = hyper_lr, as in the thesis).
        normalize_beta: EMA factor of the normalisation (default 0.99), in [0, 1).
        boundary: SLSTE's ∂ψ/∂a mode set on every managed surrogate: ``"none"`` or ``"window"``
            (docs/design.md §2). ``None``: the method's default.
        boundary_width: b of the window mode (default 0.5).
    """

    name: ClassVar[str]
    default_boundary: ClassVar[str] = "none"
    runtime: ClassVar[type[HyperMethod]]

    hyper_lr: float = 0.01
    hyper_lr_mode: str = "normalized"
    normalize_beta: float = 0.99
    boundary: str | None = None
    boundary_width: float = 0.5

    def __post_init__(self) -> None:
        h = self.hyper_lr
        if isinstance(h, bool) or not isinstance(h, numbers.Real) or not math.isfinite(h) or h < 0:
            raise ValueError(f"Invalid hyper_lr: {h!r}; it must be a finite number >= 0 (0 freezes θ)")
        if self.hyper_lr_mode not in ("normalized", "raw"):
            raise ValueError(f"Invalid hyper_lr_mode: {self.hyper_lr_mode!r}; choose 'normalized' or 'raw'")
        if not 0 <= self.normalize_beta < 1:
            raise ValueError(f"Invalid normalize_beta: {self.normalize_beta}; it must be in [0, 1)")
        if self.boundary is not None and self.boundary not in BOUNDARIES:
            raise ValueError(f"Invalid boundary: {self.boundary!r}; choose one of {BOUNDARIES} or None")
        if not self.boundary_width > 0:
            raise ValueError(f"Invalid boundary_width: {self.boundary_width}; it must be > 0")
        object.__setattr__(self, "hyper_lr", float(h))
        object.__setattr__(self, "normalize_beta", float(self.normalize_beta))

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> MethodOptions:
        """``cls(**kwargs)``, with a ``TypeError`` naming the method and its valid options for a
        keyword the method does not use (``HyperSTE(method="delayed", resolve="halve")``)."""
        bad = sorted(set(kwargs) - set(cls.option_names()))
        if bad:
            raise TypeError(
                f"method={cls.name!r} does not take {', '.join(bad)}; its options are "
                f"{', '.join(cls.option_names())} (and HyperSTE's own: model)"
            )
        return cls(**kwargs)

    def check(self, optimizer: Optimizer, managed: list[ManagedWeight], model: nn.Module | None) -> None:
        """Raise a clear error if the method cannot run on this optimizer / weights / model."""

    def build(
        self, optimizer: Optimizer, managed: list[ManagedWeight], model: nn.Module | None
    ) -> HyperMethod:
        return self.runtime(optimizer, managed, self, model)


def runs(options: type[MethodOptions]):
    """Class decorator on a method runtime: ``options`` (and its subclasses, e.g. PFAGU of FAGU)
    build it in :meth:`MethodOptions.build`."""

    def register(cls: type[HyperMethod]) -> type[HyperMethod]:
        options.runtime = cls
        return cls

    return register
