"""HyperSTE (docs/design.md §3): the wrapper :class:`HyperSTE` (:mod:`.optimizer`) and its methods,
one module per method, each with an options object that validates itself
(``HyperSTE(opt, method=Delayed(window=3))``) and the runtime it builds; :mod:`.methods` names
them, :mod:`.diffopt` is the update as a differentiable function of θ that they differentiate.

========== ============================ ============================================
method     options                      module
========== ============================ ============================================
analytical :class:`Analytical`          :mod:`.analytical` (+ :mod:`.analytical_math`)
delayed    :class:`Delayed`             :mod:`.delayed`
fagu       :class:`FAGU`                :mod:`.fagu` (replay protocol: :mod:`.horizon`)
pfagu      :class:`PFAGU`               :mod:`.fagu`
lgatt      :class:`LGATT`               :mod:`.lgatt` (``reverse_sweep``, ``diagonal_sweep``)
========== ============================ ============================================
"""

from ._common import HyperMethod
from ._options import MethodOptions
from .analytical import Analytical
from .analytical_math import analytical_update
from .delayed import Delayed
from .fagu import FAGU, PFAGU
from .horizon_memory import HorizonMemoryError
from .horizon_options import HorizonOptions
from .lgatt import LGATT
from .methods import METHODS
from .optimizer import HyperSTE

__all__ = [
    "HyperSTE",
    "METHODS",
    "Analytical",
    "Delayed",
    "FAGU",
    "PFAGU",
    "LGATT",
    "HorizonOptions",
    "HorizonMemoryError",
    "HyperMethod",
    "MethodOptions",
    "analytical_update",
]
