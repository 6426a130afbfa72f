"""Integer export of a quantized model (docs/design.md §1 utilities).

Each quantized weight is stored as integer codes c ∈ [−Qn, Qp] (binary: ±1) and a scale, and
is rebuilt as ``c.to(float) · scale``:

* round-based quantizers (LSQ, fixed): c = clamp(round(v/s), −Qn, Qp), scale = s;
* DoReFa binary: c = sign(v) (sign(0) = +1), scale = E = mean|v|.

**Bitwise.** The fake-quant forward computes ``clamp(round(v/s), −Qn, Qp) · s`` (DoReFa:
``where(v ≥ 0, E, −E)``). The codes are exact small integers, so ``c.to(float)`` gives back the
same float c and ``c · s`` (DoReFa: ``±1.0 · E = ±E``) is the same float weight, bit for bit;
the rest of the forward runs the same ops on the same inputs. The integer model's eval output
therefore equals the fake-quant model's eval output bitwise (given deterministic kernels, as
when calling the fake-quant model twice).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .activation import ActivationLSQQuantizer
from .layers import QuantConv2d, QuantLayer, QuantLinear, float_layer_kwargs
from .quantizers import S_EPS, DoReFaBinaryQuantizer, Quantizer

__all__ = [
    "QuantizedWeight",
    "IntegerLinear",
    "IntegerConv2d",
    "INTEGER_MODULES",
    "export_quantized",
    "to_integer_model",
]


@dataclass(frozen=True)
class QuantizedWeight:
    """One exported layer: ``weight = codes.to(scale.dtype) * scale``.

    ``codes``: int8 (bits ≤ 8) or int32, in [−Qn, Qp] (binary ±1); ``scale``: a scalar or one
    step per output channel, broadcastable to ``codes``; ``bias`` as in the float layer;
    ``act_bits``/``act_scale``: the input-activation quantizer, if the layer has one (codes in
    [−Qn, Qp] of its signed or unsigned grid).
    """

    codes: Tensor
    scale: Tensor
    bits: int
    qn: int
    qp: int
    bias: Tensor | None
    act_bits: int | None = None
    act_scale: Tensor | None = None

    def dequantize(self) -> Tensor:
        """The float weight of the fake-quant forward, bitwise."""
        return self.codes.to(self.scale.dtype) * self.scale


def _dequant_scale(quantizer: Quantizer, weight: Tensor) -> Tensor:
    # DoReFa's scale(weight) is the surrogate's unit (E or 1); its weight magnitude is E
    if isinstance(quantizer, DoReFaBinaryQuantizer):
        return quantizer.magnitude(weight)
    return quantizer.scale(weight)


@torch.no_grad()
def _export_layer(layer: QuantLayer) -> QuantizedWeight:
    q, w = layer.weight_quant, layer.weight.detach()
    aq = layer.act_quant
    return QuantizedWeight(
        codes=q.codes(w),
        scale=_dequant_scale(q, w).detach().clone(),
        bits=q.bits,
        qn=q.qn,
        qp=q.qp,
        bias=None if layer.bias is None else layer.bias.detach().clone(),
        act_bits=None if aq is None else aq.bits,
        act_scale=None if aq is None else aq.s.detach().clamp(min=S_EPS).clone(),
    )


def export_quantized(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Integer codes and scales of every quantized layer, keyed by module name (warns if the model
    has none: an empty export is almost always a model that was not quantized)."""
    out = {name: _export_layer(m) for name, m in model.named_modules() if isinstance(m, QuantLayer)}
    if not out:
        warnings.warn(
            "export_quantized found no quantized layer (QuantLinear/QuantConv2d) in the model: quantize it "
            "with metaste.quantize_model(...) first (quantize_model warns when it quantizes nothing)",
            UserWarning,
            stacklevel=2,
        )
    return out


class _IntegerLayer:
    """Mixin: the weight is ``codes`` (integer buffer) times ``scale`` (buffer); optional input
    activation quantizer, run as in the fake-quant model."""

    codes: Tensor
    scale: Tensor
    act_quant: ActivationLSQQuantizer | None

    def _hold(self, qw: QuantizedWeight, act_quant: ActivationLSQQuantizer | None) -> None:
        del self.weight, self.bias  # the float parameters are replaced by integer buffers
        self.register_buffer("codes", qw.codes.clone())
        self.register_buffer("scale", qw.scale.clone())
        self.register_buffer("bias", None if qw.bias is None else qw.bias.clone())
        self.act_quant = act_quant
        self.bits, self.qn, self.qp = qw.bits, qw.qn, qw.qp

    def dequantized_weight(self) -> Tensor:
        return self.codes.to(self.scale.dtype) * self.scale

    def _quant_input(self, x: Tensor) -> Tensor:
        return x if self.act_quant is None else self.act_quant(x)


class IntegerLinear(_IntegerLayer, nn.Linear):
    """Inference ``Linear`` with an integer weight: y = x̂ (codes·scale)ᵀ + b."""

    def __init__(self, layer: QuantLinear) -> None:
        nn.Linear.__init__(self, **float_layer_kwargs(layer), device="meta")
        self._hold(_export_layer(layer), layer.act_quant)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(self._quant_input(x), self.dequantized_weight(), self.bias)


class IntegerConv2d(_IntegerLayer, nn.Conv2d):
    """Inference ``Conv2d`` with an integer weight (same stride/padding/groups as the source)."""

    def __init__(self, layer: QuantConv2d) -> None:
        nn.Conv2d.__init__(self, **float_layer_kwargs(layer), device="meta")
        self._hold(_export_layer(layer), layer.act_quant)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self._quant_input(x), self.dequantized_weight(), self.bias)


#: quantized layer type (and its subclasses) → its integer inference layer
INTEGER_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    QuantLinear: IntegerLinear,
    QuantConv2d: IntegerConv2d,
}


def to_integer_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode whose quantized layers hold integer codes + scales.

    Its output equals ``model.eval()``'s fake-quant output bitwise (module docstring).
    Activation quantizers keep running (in eval mode, with their learned step).
    """
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        cls = next((c for q, c in INTEGER_MODULES.items() if isinstance(m, q)), None)
        if cls is not None:
            new = cls(m)
            if name == "":
                return new.eval()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model.eval()
