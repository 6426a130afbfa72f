"""``make_surrogate``: a surrogate by name, from the classes registered under their names
(:func:`metaste.quant.surrogates.registers`). It sits above every module that defines one, so
the surrogate modules never import each other."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import leaky  # noqa: F401  (registers "leaky")
from .learnable import A_MAX_DEFAULT, A_MIN_DEFAULT
from .psi import BOUNDARIES
from .surrogates import GRANULARITIES, SURROGATE_CLASSES, Surrogate, check_choice

__all__ = ["SURROGATES", "make_surrogate"]

#: every surrogate name, in the order the classes registered them
SURROGATES = tuple(SURROGATE_CLASSES)


def make_surrogate(
    name: str,
    weight_shape: Sequence[int] = (),
    *,
    binary: bool = False,
    granularity: str = "element",
    a_min: float = A_MIN_DEFAULT,
    a_max: float = A_MAX_DEFAULT,
    boundary: str = "none",
    b: float = 0.5,
    dtype: torch.dtype = torch.float32,
    **kwargs: float,
) -> Surrogate:
    """Build a surrogate by name: a fixed one (``kwargs``: ``h``, ``temperature``), a learnable
    one (``weight_shape``, ``granularity``, clamp, boundary, parameter ``dtype``) or the calibrated
    ``leaky`` (``weight_shape``, ``granularity`` ``"tensor"`` or ``"channel"``). ``granularity``
    and ``boundary`` are validated for every name, so a typo never passes silently."""
    if not isinstance(name, str):
        raise TypeError(f"surrogate must be a name (str), got {type(name).__name__}")
    for value, valid, what in ((name, SURROGATES, "surrogate"), (granularity, GRANULARITIES, "granularity"),
                               (boundary, BOUNDARIES, "boundary")):  # fmt: skip
        check_choice(value, valid, what)
    settings = dict(
        binary=binary, granularity=granularity, a_min=a_min, a_max=a_max, boundary=boundary, b=b, dtype=dtype
    )
    return SURROGATE_CLASSES[name].build(name, tuple(weight_shape), settings, kwargs)
