"""metaste: quantization-aware training that does better than the straight-through estimator.

Public API::

    model = metaste.quantize_model(model, bits=2)            # the substrate
    opt = metaste.FOGZO(torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10_000)
    loss = opt.step(lambda: loss_fn(model(x), y))             # the wrapper runs backward

    model = metaste.quantize_model(model, bits=2, surrogate="slste")   # a learnable surrogate
    opt = metaste.HyperSTE(torch.optim.SGD(model.parameters(), lr=0.1), method="analytical")
    opt = metaste.HyperSTE(base, method=metaste.Delayed(window=3, hyper_optimizer="adam"))

    cur = metaste.QuantCurriculum(model, total_steps=T, curriculum="random")   # any optimizer
    loss_fn(model(x), y).backward(); opt.step(); cur.step()

The design (what each module computes, the formulas and their sources, every decision) is in
docs/design.md. Registry internals (``lookup``, ``register``) are in :mod:`metaste.quant`; the
math users and tests call is in :mod:`metaste.optim.fogzo.smoothing`, :mod:`metaste.optim.hyper.diffopt`,
:func:`metaste.optim.fogzo_estimate` and :func:`metaste.optim.analytical_update`.
"""

from . import (
    adapters,  # noqa: F401  (metaste.adapters.scales_from(model) after import metaste)
    extras,  # noqa: F401  (metaste.extras.require(...) after import metaste)
)
from .curriculum import QuantCurriculum
from .optim import (
    FAGU,
    FOGZO,
    LGATT,
    PEGE,
    PFAGU,
    Accumulated,
    Analytical,
    Calibrated,
    Delayed,
    HorizonMemoryError,
    HyperSTE,
    JacQuant,
    NonFiniteLossError,
)
from .quant import (
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    export_quantized,
    make_surrogate,
    quantize_model,
    quantized_weights,
    recalibrate_bn,
    surrogate_parameters,
    to_integer_model,
)

__all__ = [
    "Accumulated",
    "Calibrated",
    "FOGZO",
    "HyperSTE",
    "JacQuant",
    "PEGE",
    "QuantCurriculum",
    "Analytical",
    "Delayed",
    "FAGU",
    "PFAGU",
    "LGATT",
    "HorizonMemoryError",
    "NonFiniteLossError",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "export_quantized",
    "make_surrogate",
    "quantize_model",
    "quantized_weights",
    "recalibrate_bn",
    "surrogate_parameters",
    "to_integer_model",
]
__version__ = "0.1.0"
