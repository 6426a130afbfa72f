"""Quantized layers: ``QuantLinear`` and ``QuantConv2d`` (docs/design.md §1).

Each is the float layer with a weight quantizer (and optionally an input-activation quantizer)
applied in ``forward``; ``weight``/``bias`` keep their names, so a float ``state_dict`` loads
into the weights of a quantized model. Building a layer registers its weight in the parameter
registry (:mod:`metaste.quant.registry`), which is how optimizer wrappers find ``s``, the grid
and the surrogate from the parameter alone.
"""

from __future__ import annotations

from torch import Tensor, nn

from .quantizers import ActivationLSQQuantizer, Quantizer
from .registry import register

__all__ = ["QuantLinear", "QuantConv2d", "QuantLayer"]


class QuantLayer:
    """Mixin: ``weight_quant`` (a :class:`Quantizer`) and optional ``act_quant``."""

    weight: nn.Parameter
    weight_quant: Quantizer
    act_quant: ActivationLSQQuantizer | None

    def _attach(self, weight_quant: Quantizer, act_quant: ActivationLSQQuantizer | None) -> None:
        self.weight_quant = weight_quant
        self.act_quant = act_quant
        register(self.weight, self.weight_quant)

    def __setstate__(self, state: dict) -> None:
        # deepcopy / pickle make a new weight Parameter: register it too
        super().__setstate__(state)  # type: ignore[misc]
        register(self.weight, self.weight_quant)

    def quantized_weight(self) -> Tensor:
        return self.weight_quant(self.weight)

    def _quant_input(self, x: Tensor) -> Tensor:
        return x if self.act_quant is None else self.act_quant(x)


class QuantLinear(QuantLayer, nn.Linear):
    """``nn.Linear`` with fake-quantized weights: y = x̂ Ŵᵀ + b."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_quant: Quantizer,
        bias: bool = True,
        act_quant: ActivationLSQQuantizer | None = None,
        device=None,
        dtype=None,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._attach(weight_quant, act_quant)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(self._quant_input(x), self.quantized_weight(), self.bias)


class QuantConv2d(QuantLayer, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weights."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        weight_quant: Quantizer,
        act_quant: ActivationLSQQuantizer | None = None,
        **conv_kwargs,
    ) -> None:
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, **conv_kwargs)
        self._attach(weight_quant, act_quant)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self._quant_input(x), self.quantized_weight(), self.bias)
