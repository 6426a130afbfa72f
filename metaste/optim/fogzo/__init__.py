"""FOGZO, first-order-guided zeroth-order gradients (docs/design.md §4): the wrapper
(:mod:`.optimizer`), its managed weights and step sizes (:mod:`.managed`), the estimate as a plain
function (:mod:`.estimator`), the smoothing table of each STE (:mod:`.smoothing`) and the fused
passes that regenerate the noise where it is used (:mod:`.passes`)."""

from .estimator import fogzo_estimate
from .optimizer import FOGZO

__all__ = ["FOGZO", "fogzo_estimate"]
