"""The quantization substrate: forward quantizers, surrogates, layers, conversion, registry."""

from .convert import make_weight_quantizer, quantize_model
from .layers import QuantConv2d, QuantLayer, QuantLinear
from .quantizers import (
    ActivationLSQQuantizer,
    DoReFaBinaryQuantizer,
    FixedScaleQuantizer,
    LSQQuantizer,
    Quantizer,
)
from .registry import QuantEntry, lookup, quantized_weights, register, surrogate_parameters
from .surrogates import FixedSurrogate, LearnableSurrogate, Surrogate, make_surrogate

__all__ = [
    "ActivationLSQQuantizer",
    "DoReFaBinaryQuantizer",
    "FixedScaleQuantizer",
    "FixedSurrogate",
    "LSQQuantizer",
    "LearnableSurrogate",
    "QuantConv2d",
    "QuantEntry",
    "QuantLayer",
    "QuantLinear",
    "Quantizer",
    "Surrogate",
    "lookup",
    "make_surrogate",
    "make_weight_quantizer",
    "quantize_model",
    "quantized_weights",
    "register",
    "surrogate_parameters",
]
