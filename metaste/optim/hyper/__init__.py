"""HyperSTE methods (docs/design.md §3): one module per method, each with an options object that
validates itself (``HyperSTE(opt, method=Delayed(window=3))``) and the runtime it builds.

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
from .horizon import HorizonMemoryError
from .horizon_options import HorizonOptions
from .lgatt import LGATT

METHODS: dict[str, type[MethodOptions]] = {cls.name: cls for cls in (Analytical, Delayed, FAGU, PFAGU, LGATT)}

__all__ = [
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
