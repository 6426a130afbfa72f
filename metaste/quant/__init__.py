"""The quantization substrate: forward quantizers, surrogates, layers, conversion, registry."""

from .activation import ActivationLSQQuantizer
from .bn import recalibrate_bn
from .config import QuantConfig, make_weight_quantizer
from .convert import QUANT_MODULES, quantize_model, register_quant_module
from .export import IntegerConv2d, IntegerLinear, QuantizedWeight, export_quantized, to_integer_model
from .layers import QuantConv2d, QuantLayer, QuantLinear, float_layer_kwargs
from .learnable import DLSTE, PLSTE, SLSTE, LearnableSurrogate
from .quantizers import (
    DoReFaBinaryQuantizer,
    FixedScaleQuantizer,
    LSQQuantizer,
    Quantizer,
)
from .registry import QuantEntry, lookup, quantized_weights, register, surrogate_parameters
from .surrogate_factory import make_surrogate
from .surrogates import FixedSurrogate, Surrogate

__all__ = [
    "QUANT_MODULES",
    "QuantConfig",
    "float_layer_kwargs",
    "register_quant_module",
    "ActivationLSQQuantizer",
    "DoReFaBinaryQuantizer",
    "FixedScaleQuantizer",
    "FixedSurrogate",
    "IntegerConv2d",
    "IntegerLinear",
    "LSQQuantizer",
    "LearnableSurrogate",
    "SLSTE",
    "PLSTE",
    "DLSTE",
    "QuantConv2d",
    "QuantEntry",
    "QuantLayer",
    "QuantLinear",
    "QuantizedWeight",
    "Quantizer",
    "Surrogate",
    "export_quantized",
    "lookup",
    "make_surrogate",
    "make_weight_quantizer",
    "quantize_model",
    "quantized_weights",
    "recalibrate_bn",
    "register",
    "surrogate_parameters",
    "to_integer_model",
]
