"""metaste: quantization-aware training that does better than the straight-through estimator.

Public API::

    model = metaste.quantize_model(model, bits=2)            # the substrate
    opt = metaste.FOGZO(torch.optim.SGD(model.parameters(), lr=0.1))
    loss = opt.step(lambda: loss_fn(model(x), y))             # the wrapper runs backward
"""

from .optim import FOGZO, HyperSTE
from .quant import (
    QuantConv2d,
    QuantLinear,
    export_quantized,
    lookup,
    make_surrogate,
    quantize_model,
    quantized_weights,
    recalibrate_bn,
    register,
    surrogate_parameters,
    to_integer_model,
)

__all__ = [
    "FOGZO",
    "HyperSTE",
    "QuantConv2d",
    "QuantLinear",
    "export_quantized",
    "lookup",
    "make_surrogate",
    "quantize_model",
    "quantized_weights",
    "recalibrate_bn",
    "register",
    "surrogate_parameters",
    "to_integer_model",
]
__version__ = "0.1.0"
