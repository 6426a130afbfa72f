"""metaste: quantization-aware training that does better than the straight-through estimator.

Public API::

    model = metaste.quantize_model(model, bits=2)            # the substrate
    opt = metaste.FOGZO(torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10_000)
    loss = opt.step(lambda: loss_fn(model(x), y))             # the wrapper runs backward

    model = metaste.quantize_model(model, bits=2, surrogate="slste")   # a learnable surrogate
    opt = metaste.HyperSTE(torch.optim.SGD(model.parameters(), lr=0.1), method="analytical")
"""

from .optim import FOGZO, HorizonMemoryError, HyperSTE, NonFiniteLossError
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
    "HorizonMemoryError",
    "HyperSTE",
    "NonFiniteLossError",
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
