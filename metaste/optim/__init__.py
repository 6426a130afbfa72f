"""Optimizer wrappers, one package or module per method beside the machinery they share
(docs/design.md §5):

* :mod:`.core` — the step protocol and base class every wrapper runs, checkpoints, the closure
  contract, buffer guards, zeroth-order passes and their noise, GradScaler/accumulation, FSDP2;
* :mod:`.fogzo` — FOGZO (§4); :mod:`.hyper` — HyperSTE and its methods (§3); :mod:`.pege` — PEGE
  (§7); :mod:`.jacquant` — JacQuant (§8); :mod:`.calibrated` — the calibrated surrogate (§9).
"""

from .calibrated import Calibrated
from .core import Accumulated, NonFiniteLossError, OptimizerWrapper
from .core.fsdp import fully_shard
from .fogzo import FOGZO, fogzo_estimate
from .hyper import FAGU, LGATT, PFAGU, Analytical, Delayed, HorizonMemoryError, HyperSTE, analytical_update
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
    "fully_shard",
]
