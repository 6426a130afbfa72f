"""``QuantConfig``: how ``quantize_model`` quantizes each layer, as data (docs/design.md §1), and
``make_weight_quantizer``, which builds one weight quantizer (with its surrogate) from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .learnable import A_MAX_DEFAULT, A_MIN_DEFAULT
from .quantizers import (
    QUANTIZERS,
    DoReFaBinaryQuantizer,
    FixedScaleQuantizer,
    LSQQuantizer,
    Quantizer,
    check_bits,
    check_weight_dtype,
)
from .surrogate_factory import make_surrogate

__all__ = ["QuantConfig", "make_weight_quantizer"]


@dataclass(frozen=True)
class QuantConfig:
    """The per-layer quantization settings of :func:`~metaste.quant.convert.quantize_model`.

    Args:
        bits: weight bits, 1..16 (1 = DoReFa binary, needs ``quantizer="dorefa"``).
        quantizer: ``"lsq"`` (learnable step), ``"fixed"`` (frozen step) or ``"dorefa"``.
        surrogate: a name of :data:`metaste.quant.surrogate_factory.SURROGATES`; ``surrogate_kwargs``
            passes ``h`` to ``fd`` or ``temperature`` to ``tanh``.
        per_channel: one step per output channel (LSQ/fixed).
        granularity, a_min, a_max, boundary: learnable-surrogate settings (docs/design.md §2).
        binary_surrogate_scale: DoReFa's surrogate argument, ``"E"`` (v/mean|v|) or ``"one"``.
        fixed_init: the frozen step of ``quantizer="fixed"``: ``"max"`` (max|v|/Qp), ``"lsq"``
            (the LSQ init 2·mean|v|/√Qp, the FOGZO paper's MNIST set-up) or a float.
        act_bits: if set, each quantized layer also quantizes its input with unsigned LSQ (put
            it after a ReLU).

    ``bits`` and ``act_bits`` are checked here; the other settings when a quantizer is built
    (their errors name the weight's shape where it matters).
    """

    bits: int = 2
    quantizer: str = "lsq"
    surrogate: str = "ste"
    surrogate_kwargs: dict | None = None
    per_channel: bool = False
    granularity: str = "element"
    a_min: float = A_MIN_DEFAULT
    a_max: float = A_MAX_DEFAULT
    boundary: str = "none"
    binary_surrogate_scale: str = "E"
    fixed_init: str | float = "max"
    act_bits: int | None = None

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.act_bits is not None:
            check_bits(self.act_bits)

    def replace(self, **changes: Any) -> QuantConfig:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)


def make_weight_quantizer(weight: Tensor, config: QuantConfig | None = None, **settings: Any) -> Quantizer:
    """Build the weight quantizer (with its surrogate) for one weight tensor, from ``config``
    and/or its settings as keywords (``make_weight_quantizer(w, bits=2, surrogate="slste")``)."""
    c = (config or QuantConfig()).replace(**settings) if settings else (config or QuantConfig())
    check_weight_dtype(weight)
    if c.quantizer not in QUANTIZERS:
        raise ValueError(f"Unknown quantizer {c.quantizer!r}; valid choices are {QUANTIZERS}")
    binary = c.bits == 1
    if binary and c.quantizer != "dorefa":
        raise ValueError(f"bits=1 needs quantizer='dorefa' (got {c.quantizer!r})")
    if c.quantizer == "dorefa" and not binary:
        raise ValueError(f"quantizer='dorefa' is the 1-bit quantizer; got bits={c.bits}")
    psi = make_surrogate(
        c.surrogate,
        tuple(weight.shape),
        binary=binary,
        granularity=c.granularity,
        a_min=c.a_min,
        a_max=c.a_max,
        boundary=c.boundary,
        dtype=weight.dtype,
        **(c.surrogate_kwargs or {}),
    )
    psi.to(device=weight.device)
    if c.quantizer == "dorefa":
        return DoReFaBinaryQuantizer(psi, c.binary_surrogate_scale)
    if c.quantizer == "lsq":
        return LSQQuantizer(weight, c.bits, psi, c.per_channel)
    return FixedScaleQuantizer(weight, c.bits, psi, c.per_channel, init=c.fixed_init)
