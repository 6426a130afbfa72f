"""Optimizer wrappers: FOGZO (docs/design.md §4) and HyperSTE (docs/design.md §3), and the math
they are built from: :mod:`.smoothing` (FOGZO's smoothing table and noise), :mod:`.diffopt` (the
update as a differentiable function of the surrogate parameters; the one-step hypergradient),
:func:`~.fogzo_estimator.fogzo_estimate` and :func:`~.hyper.analytical_math.analytical_update`."""

from ._closure import NonFiniteLossError
from ._wrapper import OptimizerWrapper
from .amp import Accumulated
from .calibrated import Calibrated
from .fogzo import FOGZO
from .fogzo_estimator import fogzo_estimate
from .hyper import FAGU, LGATT, PFAGU, Analytical, Delayed, HorizonMemoryError, analytical_update
from .hyperste import HyperSTE
from .jacquant import JacQuant
from .pege import PEGE

__all__ = [
    "Accumulated",
    "Calibrated",
    "FOGZO",
    "HyperSTE",
    "JacQuant",
    "PEGE",
    "Analytical",
    "Delayed",
    "FAGU",
    "PFAGU",
    "LGATT",
    "HorizonMemoryError",
    "NonFiniteLossError",
    "OptimizerWrapper",
    "analytical_update",
    "fogzo_estimate",
]
